"""The whole story on the vendored audio, on 2 CPU cores in under 10 minutes:
pretrain the `small` data2vec-aqc model on unlabelled audio -> fine-tune CTC on spoken digits of three speakers ->
WER on the unseen fourth speaker -> transcribe a few of its clips with stock transformers.

Each stage streams its progress bar (with the time left) to the terminal; the numbers come at the end."""

import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs"
UNSEEN = "fsdd_yweweler"


def run(title, cmd):
    """Run a stage; its progress bars (stderr) go to the terminal, its stdout is returned."""
    print(f"\n== {title}\n$ " + " ".join(str(c) for c in cmd), flush=True)
    start = time.time()
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        sys.stderr.write(result.stdout[-3000:])
        raise SystemExit(f"failed ({result.returncode}): {' '.join(str(c) for c in cmd)}")
    print(f"== done in {time.time() - start:.0f} s", flush=True)
    return result.stdout


def tagged(stdout, tag):
    return json.loads([line for line in stdout.splitlines() if line.startswith(tag + " ")][-1][len(tag) + 1:])


if __name__ == "__main__":
    py, start = sys.executable, time.time()
    out = run("1/4 pretraining data2vec-aqc (small preset, with VICReg's anti-collapse terms) on the vendored audio, "
              "labels unused (~2 min)",
              [py, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "training/pretrain.py", "configs/demo.yaml"])
    summary = tagged(out, "SUMMARY")
    out = run(f"2/4 CTC fine-tuning on 3 speakers' digits, testing on the unseen {UNSEEN} (~6.5 min)",
              [py, "training/finetune.py", "configs/demo_finetune.yaml"])
    metrics = tagged(out, "METRICS")
    clips = [f"data/demo/audio/fsdd/yweweler/{d}_yweweler_{i}.flac" for d, i in ((3, 0), (7, 1), (9, 10))]
    transcripts = run("3/4 transcribing unseen-speaker clips with stock transformers",
                      [py, "training/transcribe.py", OUT / "demo-finetune/final", *clips]).strip()
    lm_metrics = None
    if importlib.util.find_spec("pyctcdecode") and importlib.util.find_spec("kenlm"):
        # a word bigram of the *training* speakers' transcripts: it knows the ten words, nothing of the test speaker
        texts = [r["text"] for r in csv.DictReader(open(ROOT / "data/demo/metadata.csv")) if r["speaker_id"] != UNSEEN]
        (OUT / "demo-lm").mkdir(parents=True, exist_ok=True)
        (OUT / "demo-lm/train_texts.txt").write_text("\n".join(texts) + "\n")
        run("4/4 a word bigram LM of the training transcripts, then KenLM beam-search decoding of the unseen speaker",
            [py, "-m", "data2vec_aqc_hf.lm", OUT / "demo-lm/train_texts.txt", OUT / "demo-lm/lm.arpa"])
        run("   (evaluating with the LM)",
            [py, "training/evaluate_asr.py", OUT / "demo-finetune/final", "data/demo/metadata.csv", "--speakers",
             UNSEEN, "--lm", OUT / "demo-lm/lm.arpa", "--output", OUT / "demo-lm/metrics.json"])
        lm_metrics = json.loads((OUT / "demo-lm/metrics.json").read_text())
    else:
        print("\n== 4/4 LM decoding skipped: pip install -e '.[lm]' && pip install --no-deps pyctcdecode==0.5.0")
    final = summary["final"]
    print("\n" + "=" * 100)
    print(f"pretrained {summary['steps']} steps on {summary['hours_seen']:.3f} h of audio; final losses: "
          + ", ".join(f"{k}={v:.3f}" for k, v in final.items() if "loss" in k)
          + f"; target std {final.get('target_std', float('nan')):.3f}")
    rounds = metrics.get("self_training", [])  # with --self_training_rounds in the config
    print("fine-tuned on 3 FSDD speakers (360 digits)" + (
        f", then self-trained {len(rounds)} round(s) on {rounds[0]['pool']} unlabelled clips of {UNSEEN} (not the "
        "scored ones; pseudo-labels kept: " + ", ".join(str(r["selected"]) for r in rounds) + ")" if rounds else "")
        + f"; unseen speaker {UNSEEN}: WER {100 * metrics['wer']:.1f}% CER {100 * metrics['cer']:.1f}% over "
        f"{metrics['num_utterances']} utterances")
    if lm_metrics:
        print(f"  with a word bigram LM of the training transcripts: WER {100 * lm_metrics['wer']:.1f}% "
              f"CER {100 * lm_metrics['cer']:.1f}%")
    print(transcripts)
    print(f"(references: THREE, SEVEN, NINE; {(time.time() - start) / 60:.1f} min in all)")
    print(f"model card: {OUT / 'demo-finetune/final/README.md'}; plots: {OUT / 'demo-pretrain/loss.png'}, "
          f"{OUT / 'demo-finetune/final/training_curves.png'}")
