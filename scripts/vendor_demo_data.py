"""Copy the small demo subset of ../shared/speech_corpus into data/demo (run once by maintainers; the result is
committed). FSDD: 12 utterances per digit per speaker; LibriSpeech train-clean-100: 8 unlabeled utterances; 20 more
takes per digit of the demo's unseen speaker, listed without their transcripts in unlabelled_digits.csv (a
self-training pool for the demo's fine-tuning, disjoint from the 120 clips it scores; README, "Self-training")."""

import csv
import shutil
import sys
from collections import defaultdict
from pathlib import Path

PER_DIGIT = 12  # utterances per digit per speaker (480 clips, ~2.9 MB)
UNSEEN, UNLABELLED_PER_DIGIT = "fsdd_yweweler", 20  # the demo's test speaker: 200 more clips, ~0.9 MB, no transcripts
src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/speech_corpus")
dst = Path("data/demo")
rows = list(csv.DictReader(open(src / "metadata.csv")))
prov = {r["file_name"]: r for r in csv.DictReader(open(src / "provenance.csv"))}
picked, digits, count = [], [], defaultdict(int)
for r in rows:
    if r["file_name"].startswith("audio/fsdd/"):
        key = (r["speaker_id"], r["text"])
        count[key] += 1
        if count[key] <= PER_DIGIT:
            picked.append(r)
        elif r["speaker_id"] == UNSEEN and count[key] <= PER_DIGIT + UNLABELLED_PER_DIGIT:
            digits.append({"file_name": r["file_name"], "speaker_id": r["speaker_id"]})
unlabeled = list(csv.DictReader(open(src / "unlabeled.csv")))[:8]
for r in picked + unlabeled + digits:
    (dst / r["file_name"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / r["file_name"], dst / r["file_name"])
with open(dst / "metadata.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["file_name", "text", "speaker_id"])
    w.writeheader()
    w.writerows(picked)
with open(dst / "unlabeled.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["file_name", "speaker_id"])
    w.writeheader()
    w.writerows(unlabeled)
with open(dst / "unlabelled_digits.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["file_name", "speaker_id"])
    w.writeheader()
    w.writerows(digits)
with open(dst / "provenance.csv", "w", newline="") as f:
    fields = list(next(iter(prov.values())).keys())
    w = csv.DictWriter(f, fields)
    w.writeheader()
    w.writerows(prov[r["file_name"]] for r in picked + unlabeled + digits)
print(len(picked), "labelled,", len(unlabeled) + len(digits), "unlabelled files")
with open(dst / "pretrain_audio.csv", "w", newline="") as f:  # the demo's pretraining audio: everything, no labels
    w = csv.writer(f)
    w.writerow(["file_name"])
    w.writerows([r["file_name"]] for r in unlabeled + picked)
