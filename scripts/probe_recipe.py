"""Recipe probe for the learning issue: one CTC fine-tuning on some FSDD speakers, WER on a development speaker.

Used to choose the fine-tuning recipe without touching the experiment's test speakers' results: the default split
trains on jackson + lucas and evaluates on nicolas (fold yweweler's inner split; yweweler itself is never read).

    python scripts/probe_recipe.py --init none --per_speaker 50 --steps 400 --speed 0.15
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from data2vec_aqc_hf.experiment import load_corpus, low_resource_subset
from data2vec_aqc_hf.finetuning import (CTCDataset, build_vocab, evaluate_rows, load_ctc_model, make_processor,
                                        normalize_text, speed_range, train_ctc, WeightEMACallback)


def probe_training_args(steps: int, batch: int, lr: float, seed: int) -> TrainingArguments:
    """The probes' Trainer options: linear schedule with 10 % warm-up, no checkpoints, no evaluation."""
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.01, adam_beta2=0.98,
        max_grad_norm=5.0, logging_steps=max(1, steps // 10), save_strategy="no", eval_strategy="no",
        report_to="none", seed=seed, use_cpu=True, train_sampling_strategy="group_by_length", disable_tqdm=True)


def record(out: dict, path: str) -> None:
    """Print a probe's result as one JSON line and append it to `path`."""
    print(json.dumps(out), flush=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(out) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--corpus_dir", default="../shared/speech_corpus")
    p.add_argument("--init", default="none", help="'none' or a pretrained checkpoint folder")
    p.add_argument("--preset", default="small")
    p.add_argument("--train_speakers", default="fsdd_jackson,fsdd_lucas")
    p.add_argument("--dev_speaker", default="fsdd_nicolas")
    p.add_argument("--per_speaker", type=int, default=50, help="0: all")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--speed", type=float, default=0.0, help="speed factors in [1-s, 1+s]; 0 = off")
    p.add_argument("--noise_aug", type=float, default=0.0,
                   help="probability that a training clip gets data2vec-aqc's student-view augmentation")
    p.add_argument("--mask_time_prob", type=float, default=0.05)
    p.add_argument("--mask_time_length", type=int, default=4)
    p.add_argument("--mask_feature_prob", type=float, default=0.0)
    p.add_argument("--mask_feature_length", type=int, default=64)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--freeze_cnn", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze_transformer_steps", type=int, default=0)
    p.add_argument("--config_overrides", default="{}", help="JSON of config fields for a scratch model (--init none)")
    p.add_argument("--reinit_top_layers", type=int, default=0,
                   help="re-initialise the top N transformer layers of a pretrained --init before fine-tuning")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fit_all", action="store_true",
                   help="score the fit on every training utterance (default: 20 per speaker)")
    p.add_argument("--weight_ema_decays", default="",
                   help="comma-separated decays: also score each weight average of the same run (dev_wer_ema_<decay>)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="outputs/probes.jsonl")
    p.add_argument("--save", default=None, help="save the fine-tuned model and processor here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    rows, _, _ = load_corpus(Path(a.corpus_dir))
    train_speakers = a.train_speakers.split(",")
    rows = [r for r in rows if r["speaker_id"] in train_speakers + [a.dev_speaker]]
    processor = make_processor(build_vocab([normalize_text(r["text"]) for r in rows]), tempfile.mkdtemp())
    data = CTCDataset(rows, processor)
    train = data.subset(lambda e: e["speaker_id"] in train_speakers)
    if a.per_speaker:
        train = low_resource_subset(train, a.per_speaker, a.seed)
    dev = data.subset(lambda e: e["speaker_id"] == a.dev_speaker)
    dev = low_resource_subset(dev, 200, 0)
    set_seed(a.seed)
    overrides = json.loads(a.config_overrides)
    if a.dropout is not None:
        overrides |= dict(hidden_dropout=a.dropout, attention_dropout=a.dropout, activation_dropout=a.dropout,
                         feat_proj_dropout=a.dropout)
    model = load_ctc_model(None if a.init == "none" else a.init, processor, mask_time_prob=a.mask_time_prob,
                           mask_time_length=a.mask_time_length, mask_time_min_masks=0,
                           mask_feature_prob=a.mask_feature_prob, mask_feature_length=a.mask_feature_length,
                           layerdrop=0.0, freeze_feature_encoder=a.freeze_cnn,
                           model_preset=a.preset if a.init == "none" else None, **overrides)
    if a.reinit_top_layers:  # keep the CNN and lower layers of the pretrained encoder, the top ones fresh
        for module in model.data2vec_audio.encoder.layers[-a.reinit_top_layers:].modules():
            if isinstance(module, torch.nn.Linear):  # transformers' init for these layers (its _init_weights
                torch.nn.init.normal_(module.weight, std=model.config.initializer_range)  # skips loaded ones)
                torch.nn.init.zeros_(module.bias)
            elif isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)
    args = probe_training_args(a.steps, a.batch, a.lr, a.seed)
    averages = {d: WeightEMACallback(model, float(d), apply_at_end=False)
                for d in a.weight_ema_decays.split(",") if d}
    trainer = train_ctc(model, processor, train, None, args, a.freeze_transformer_steps, print_logs=False,
                        speed_perturbation=speed_range(a.speed), noise_augmentation=a.noise_aug,
                        callbacks=list(averages.values()))
    train_s = time.time() - start
    if a.save:
        trainer.model.save_pretrained(a.save)
        processor.save_pretrained(a.save)
    fit = evaluate_rows(trainer.model, processor, train if a.fit_all else low_resource_subset(train, 20, 1))
    res = evaluate_rows(trainer.model, processor, dev)
    scores = {}
    if averages:
        raw = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        for d, callback in averages.items():
            trainer.model.load_state_dict(callback.averaged_state(), strict=False)
            r = evaluate_rows(trainer.model, processor, dev)
            scores[f"dev_wer_ema_{d}"], scores[f"dev_cer_ema_{d}"] = round(100 * r["wer"], 1), round(100 * r["cer"], 1)
        trainer.model.load_state_dict(raw, strict=False)
    curve = [(h["step"], round(h["loss"], 3)) for h in trainer.state.log_history if "loss" in h]
    out = {"tag": a.tag, **{k: v for k, v in vars(a).items() if k not in ("out", "corpus_dir")},
           "dev_wer": round(100 * res["wer"], 1), "dev_cer": round(100 * res["cer"], 1),
           **scores, "fit_wer": round(100 * fit["wer"], 1), "train_s": round(train_s), "curve": curve,
           "examples": res["examples"][:3]}
    record(out, a.out)


if __name__ == "__main__":
    main()
