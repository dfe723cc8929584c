"""Self-training probe for the learning issue: continue a fine-tuned model (from `probe_recipe.py --save`) for
`--steps` updates on its labelled clips plus pseudo-labelled clips of the development speaker, and compare the
development WER with the same continuation on the labelled clips alone (`--pool none`, the control).

The pool is the development speaker's clips that are *not* scored (its 500 clips minus the 200 dev clips), read
without their transcripts; the references are used only to report how accurate the selected pseudo-labels were.
Default split as probe_recipe.py: train jackson + lucas, develop on nicolas; yweweler is never read.

    python scripts/probe_self_training.py --model outputs/s11/scratch_seed0 --seed 0 --steps 400
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from probe_recipe import probe_training_args, record  # scripts/ is first on sys.path when run as a script
from transformers import AutoModelForCTC, Wav2Vec2Processor, set_seed

import data2vec_aqc_hf  # noqa: F401  (registers data2vec-aqc)
from data2vec_aqc_hf.experiment import load_corpus, low_resource_subset
from data2vec_aqc_hf.finetuning import CTCDataset, evaluate_rows, speed_range, train_ctc
from data2vec_aqc_hf.self_training import self_train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--corpus_dir", default="../shared/speech_corpus")
    p.add_argument("--model", required=True, help="a folder saved by probe_recipe.py --save")
    p.add_argument("--train_speakers", default="fsdd_jackson,fsdd_lucas")
    p.add_argument("--dev_speaker", default="fsdd_nicolas")
    p.add_argument("--per_speaker", type=int, default=50, help="as the probe_recipe run that made --model")
    p.add_argument("--seed", type=int, default=0, help="as the probe_recipe run that made --model")
    p.add_argument("--pool", default="dev_rest", choices=["dev_rest", "none"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--speed", type=float, default=0.15)
    p.add_argument("--keep", type=float, default=0.5, help="share of the pool kept, most confident first")
    p.add_argument("--labels", default="lexicon", choices=["greedy", "lexicon", "closed_set"],
                   help="greedy transcripts; greedy ones made of training-set words only; or the most likely of the "
                        "training set's distinct transcripts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="outputs/self_training_probes.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    processor = Wav2Vec2Processor.from_pretrained(a.model)
    model = AutoModelForCTC.from_pretrained(a.model)
    rows, _, _ = load_corpus(Path(a.corpus_dir))
    train_speakers = a.train_speakers.split(",")
    data = CTCDataset([r for r in rows if r["speaker_id"] in train_speakers + [a.dev_speaker]], processor)
    train = data.subset(lambda e: e["speaker_id"] in train_speakers)
    if a.per_speaker:
        train = low_resource_subset(train, a.per_speaker, a.seed)
    dev = low_resource_subset(data.subset(lambda e: e["speaker_id"] == a.dev_speaker), 200, 0)
    scored = {id(e) for e in dev.examples}
    pool = [e for e in data.examples if e["speaker_id"] == a.dev_speaker and id(e) not in scored]
    before = evaluate_rows(model, processor, dev)
    lexicon = {w for e in train.examples for w in e["text"].split()} if a.labels == "lexicon" else None
    candidates = sorted({e["text"] for e in train.examples}) if a.labels == "closed_set" else None
    set_seed(a.seed)
    args = probe_training_args(a.steps, a.batch, a.lr, a.seed)
    history = []
    if a.pool == "none":
        trainer = train_ctc(model, processor, train, None, args, print_logs=False, speed_perturbation=speed_range(a.speed))
    else:
        trainer, history = self_train(model, processor, train, [e["input_values"] for e in pool], args, a.rounds,
                                      a.keep, lexicon, [e["name"] for e in pool], speed_range(a.speed),
                                      references=[e["text"] for e in pool], print_logs=False,
                                      candidates=candidates)
    after = evaluate_rows(trainer.model, processor, dev)
    out = {"tag": a.tag, **{k: v for k, v in vars(a).items() if k not in ("out", "corpus_dir")},
           "dev_wer_before": round(100 * before["wer"], 1), "dev_wer": round(100 * after["wer"], 1),
           "dev_cer": round(100 * after["cer"], 1), "rounds_log": history, "train_s": round(time.time() - start),
           "curve": [(h["step"], round(h["loss"], 3)) for h in trainer.state.log_history if "loss" in h]}
    record(out, a.out)


if __name__ == "__main__":
    main()
