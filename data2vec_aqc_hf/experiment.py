"""The learning experiment: does self-supervised pretraining (data2vec-aqc, data2vec) help a small CTC recognizer
transcribe speakers it has never heard, with little labelled speech, in clean and noisy conditions?

Design (one command, `python training/experiments/fsdd_ssl.py`; about an hour on 2 CPU cores at `--scale 1`):

1. Pretrain the same `small` model with `objective="aqc"` and `objective="data2vec"` on the corpus's unlabelled
   audio: 12 min of LibriSpeech train-clean-100 (60 speakers), 3.7 min of LJ Speech and the FSDD recordings of all
   four speakers *without their transcripts* (the low-resource setting SSL is for: a new speaker's audio is
   cheap, its labels are not; `--pretrain_on_test_speaker_audio false` pretrains once per fold without it).
2. Fine-tune each pretrained model and a randomly initialised one ("none") with CTC on three FSDD speakers: a
   low-resource set (`--low_resource_per_speaker` utterances per speaker, balanced over digits, drawn per seed)
   and the full set (500 per speaker). Same recipe for every initialisation, no model selection (there is no
   development speaker to select on without touching the test speaker), fixed number of updates.
3. Test on the held-out fourth speaker, rotating it over the four speakers, for every seed: clean (all 500
   utterances) and with white and babble noise at each SNR (`--noisy_per_digit` utterances per digit; babble is
   four LibriSpeech test-other talkers, audio never seen in pretraining).
4. Write `RESULTS.md` (mean and standard deviation over folds x seeds, per-fold numbers, the relative
   improvements the targets ask about), `results.png`, `results.json` and each pretraining run's diagnostics plot.

Every run's result is saved as it finishes (`runs/*/result.json`); a second invocation skips finished runs, so an
interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainingArguments, set_seed

from .audio import AudioError, load_audio
from .finetuning import (
    CTCDataset,
    build_vocab,
    check_noise_augmentation,
    check_pseudo_label_mode,
    check_weight_ema_decay,
    evaluate_rows,
    load_ctc_model,
    make_processor,
    normalize_text,
    read_manifest,
    speed_range,
    train_ctc,
)

logger = logging.getLogger(__name__)

NOISE_KINDS = ("white", "babble")
FSDD_PREFIX = "fsdd_"
PRETRAINING_SOURCES = ("librispeech_train-clean-100", "ljspeech")  # plus FSDD audio, never test-other (babble)
BABBLE_SOURCE = "librispeech_test-other"


# pretrained arms: name -> (objective, config overrides of the pretraining run)
ARMS = {
    "aqc": ("aqc", {}),
    "data2vec": ("data2vec", {}),
    "aqc-efficient": ("aqc", {"efficient_mode": True}),
    "data2vec-efficient": ("data2vec", {"efficient_mode": True}),
    # not part of the method: VICReg's variance and covariance terms against the early rank collapse (issue 7)
    # (weights chosen from two candidates, 5/0.2 and 1/0.04, on the development split: docs/LEARNING_NOTES.md, session 10)
    "aqc-vicreg": ("aqc", {"variance_loss_weight": 5.0, "covariance_loss_weight": 0.2}),
    "aqc-vicreg-weak": ("aqc", {"variance_loss_weight": 1.0, "covariance_loss_weight": 0.04}),
    "data2vec-vicreg": ("data2vec", {"variance_loss_weight": 5.0, "covariance_loss_weight": 0.2}),
}


@dataclass
class ExperimentArguments:
    """Options of `training/experiments/fsdd_ssl.py`; the defaults are the one-hour CPU design."""

    corpus_dir: str = field(default="../shared/speech_corpus", metadata={"help": "The shared speech corpus."})
    output_dir: str = field(default="outputs/fsdd_ssl", metadata={"help": "Runs, models, plots (resumable)."})
    results_md: str = field(default="docs/RESULTS.md", metadata={
        "help": "Where to copy the report and its plots too (--results_md '' to skip); the plots are named "
                "fsdd_ssl_*.png beside a RESULTS.md, <name>_*.png beside any other <name>.md."})
    model_preset: str = field(default="small", metadata={"help": "Model for every arm."})
    scale: float = field(default=1.0, metadata={
        "help": "Multiply every step count (pretraining and fine-tuning) by this: the same design, larger (e.g. 10 "
                "where a GPU is lent)."})
    objectives: str = field(default="aqc,data2vec,none", metadata={
        "help": "Initialisations: aqc, data2vec (pretrained with that objective), aqc-efficient, data2vec-efficient "
                "(the same in data2vec 2.0's efficient mode, efficient_mode=True), aqc-vicreg, aqc-vicreg-weak, "
                "data2vec-vicreg (with VICReg's variance and covariance terms against the early rank collapse: not "
                "part of the method, an experiment of the learning issue), none (scratch)."})
    test_speakers: str | None = field(default=None, metadata={"help": "Folds (default: all four FSDD speakers)."})
    seeds: str = field(default="0,1", metadata={"help": "Fine-tuning seeds (each fold x seed is one sample)."})
    label_sets: str = field(default="low,full", metadata={"help": "'low' and/or 'full' labelled training sets."})
    low_resource_per_speaker: int = field(default=50, metadata={"help": "Labelled utterances per speaker in 'low'."})
    pretrain_on_test_speaker_audio: bool = field(default=True, metadata={
        "help": "Pretrain on the unlabelled audio of all four speakers (one pretraining per objective); false: one "
                "pretraining per fold without the test speaker's audio (4x the pretraining time)."})
    pretrain_steps: int = field(default=600, metadata={"help": "Pretraining updates per objective (x --scale)."})
    pretrain_learning_rate: float = field(default=1e-3, metadata={
        "help": "Peak pretraining learning rate (paper, base model: 5e-4)."})
    pretrain_warmup_ratio: float = field(default=0.2, metadata={
        "help": "Share of the pretraining run warming up (then hold, 7 %% decay). Measured (docs/LEARNING_NOTES.md): "
                "with the paper's 3 %% a short run came out with layers that held less of the spoken digit than a "
                "random init (linear probe 12-20 vs 25 %%); with 20 %% about as much (22-26 %%)."})
    pretrain_batch_seconds: float = field(default=8.0, metadata={"help": "Padded audio per pretraining batch."})
    pretrain_max_seconds: float = field(default=4.0, metadata={"help": "Longer pretraining clips are cropped."})
    finetune_steps_low: int = field(default=800, metadata={
        "help": "CTC updates on the low-resource labelled set (x --scale)."})
    finetune_steps_full: int = field(default=1200, metadata={
        "help": "CTC updates on the full labelled set (x --scale)."})
    finetune_learning_rate: float = field(default=1e-3, metadata={"help": "Peak fine-tuning learning rate."})
    finetune_batch_size: int = field(default=16, metadata={"help": "Labelled clips per fine-tuning update."})
    sanity_steps: int = field(default=3000, metadata={
        "help": "Also fine-tune from scratch on all three training speakers of the last fold this long and report "
                "WER on all their training utterances (the recipe can fit its data); 0 skips it. Measured "
                "(docs/LEARNING_NOTES.md, session 7): 3000 updates fit them to 1.9 %% WER, 1200 left 51 %%."})
    freeze_feature_encoder: bool = field(default=False, metadata={
        "help": "Freeze the CNN when fine-tuning pretrained models (scratch always trains it)."})
    freeze_transformer_steps: int = field(default=0, metadata={
        "help": "Train only the CNN and lm_head for the first updates of every fine-tuning (fairseq's "
                "freeze_finetune_updates; fairseq's 10 h config freezes half the run, its 100 h config none)."})
    mask_time_prob: float = field(default=0.05, metadata={
        "help": "Fine-tuning time masking: about this share of frames masked, in spans of --mask_time_length "
                "(no forced spans: a spoken digit is 10-60 frames)."})
    mask_time_length: int = field(default=4, metadata={"help": "Fine-tuning time-mask span, in frames."})
    speed_perturbation: float = field(default=0.15, metadata={
        "help": "Fine-tuning clips play at a random speed in [1 - s, 1 + s] (0: off); test audio is never changed."})
    noise_augmentation: float = field(default=0.0, metadata={
        "help": "Probability that a fine-tuning clip gets data2vec-aqc's student-view augmentation (white noise, "
                "reverberation, background noise; finetuning.CTCCollator); 0: off. Test audio is never changed."})
    weight_ema_decay: float = field(default=0.0, metadata={
        "help": "Evaluate an exponential moving average of each fine-tuning's weights instead of its last weights "
                "(0: off; finetuning.WeightEMACallback)."})
    jobs: int = field(default=2, metadata={
        "help": "Runs in parallel, one thread each (a model this small uses 2 cores better as 2 runs than as 1 run "
                "with 2 threads); 1 on a GPU."})
    snrs: str = field(default="10,5,0", metadata={"help": "SNRs (dB) of the noisy test conditions."})
    probe_representations: bool = field(default=True, metadata={
        "help": "Before fine-tuning, a linear probe of the spoken digit on each pretrained (and a random) encoder's "
                "layers, fitted on the training speakers, scored on the test speaker (a minute per model)."})
    lm_decoding: bool = field(default=True, metadata={
        "help": "Also decode the clean test set with a word bigram LM of the *training* transcripts (column "
                "`clean_lm`; KenLM beam search, needs the [lm] extra; skipped with a warning without it). Greedy "
                "decoding stays the primary number."})
    self_training_rounds: int = field(default=0, metadata={
        "help": "After fine-tuning, rounds of self-training on unlabelled clips of the test speaker (0: off). The "
                "speaker's first --self_training_pool_per_digit takes of each digit become the pool (transcribed by "
                "the model, never by their transcripts) and are left out of every arm's test set, so the scored "
                "clips are never trained on. Column `before_st`: the same runs' clean WER before self-training."})
    self_training_pool_per_digit: int = field(default=20, metadata={
        "help": "Takes per digit of the test speaker in the self-training pool (the other takes are scored)."})
    self_training_steps: int = field(default=400, metadata={"help": "Updates per self-training round (x --scale)."})
    self_training_learning_rate: float = field(default=5e-4, metadata={"help": "Peak LR of each self-training round."})
    self_training_labels: str = field(default="lexicon", metadata={
        "help": "Pseudo-labels: closed_set (the most likely of the training transcripts), lexicon (greedy, only "
                "transcripts of training words kept; the best on the dev split) or greedy (see finetune.py "
                "--self_training_labels)."})
    noisy_per_digit: int = field(default=50, metadata={
        "help": "Test utterances per digit in each noisy condition (50 = all of FSDD's, the clean set; fewer makes "
                "noisy and clean numbers come from different utterances)."})

    def __post_init__(self):
        check_weight_ema_decay(self.weight_ema_decay)
        check_noise_augmentation(self.noise_augmentation)
        self.objectives_list = [o.strip() for o in self.objectives.split(",") if o.strip()]
        unknown = set(self.objectives_list) - set(ARMS) - {"none"}
        if unknown:
            raise ValueError(f"unknown objective(s) {sorted(unknown)}; choose from {', '.join(ARMS)}, none")
        self.seed_list = [int(s) for s in self.seeds.split(",")]
        self.label_set_list = [s.strip() for s in self.label_sets.split(",")]
        if set(self.label_set_list) - {"low", "full"}:
            raise ValueError(f"label_sets must be 'low' and/or 'full', got {self.label_sets!r}")
        self.snr_list = [float(s) for s in self.snrs.split(",")]
        check_pseudo_label_mode(self.self_training_labels)
        if self.self_training_rounds < 0 or (self.self_training_rounds and self.self_training_pool_per_digit < 1):
            raise ValueError("self_training_rounds must be >= 0, with self_training_pool_per_digit >= 1")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")

    def steps(self, n: int) -> int:
        return max(1, round(n * self.scale))


def conditions(snrs: list[float], lm: bool = False, self_training: bool = False) -> list[str]:
    """Test condition names: (`before_st`: clean, before self-training), `clean`, (`clean_lm`), then `white_10`,
    `babble_10`, ... per SNR."""
    return ((["before_st"] if self_training else []) + ["clean"] + (["clean_lm"] if lm else [])
            + [f"{kind}_{snr:g}" for snr in snrs for kind in NOISE_KINDS])


def lm_transcriber(model, processor, texts: list[str], path: Path):
    """A KenLM beam-search transcriber scored by a word bigram of `texts` (the run's training transcripts), or None
    when pyctcdecode/kenlm are not installed."""
    try:
        from .lm import LMTranscriber, write_bigram_arpa

        return LMTranscriber(model, processor, write_bigram_arpa(texts, path)).transcribe_arrays
    except ImportError as err:
        logger.warning("clean_lm skipped: %s", err)
        return None


# ----- data -------------------------------------------------------------------------------------------------------
def load_corpus(corpus_dir: Path):
    """FSDD rows (labelled), the pretraining audio list and the babble bank of the shared corpus."""
    rows = read_manifest(corpus_dir / "metadata.csv")
    fsdd = [r for r in rows if r["speaker_id"].startswith(FSDD_PREFIX)]
    if len({r["speaker_id"] for r in fsdd}) < 2:
        raise ValueError(f"{corpus_dir}: the experiment needs the FSDD speakers of metadata.csv")
    babble_files = [r["audio"] for r in rows if f"/{BABBLE_SOURCE}/" in r["audio"]]
    pretrain_files = [r["audio"] for r in rows if any(f"/{s}/" in r["audio"] for s in PRETRAINING_SOURCES)]
    with open(corpus_dir / "unlabeled.csv", newline="") as f:
        pretrain_files += [str(corpus_dir / r["file_name"]) for r in csv.DictReader(f)]
    return fsdd, pretrain_files, babble_files


def low_resource_subset(dataset: CTCDataset, per_speaker: int, seed: int) -> CTCDataset:
    """`per_speaker` utterances of each speaker, balanced over transcripts (digits), drawn with `seed`."""
    rng = random.Random(seed)
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, e in enumerate(dataset.examples):
        by_key.setdefault((e["speaker_id"], e["text"]), []).append(i)
    keep = set()
    for speaker in sorted({s for s, _ in by_key}):
        texts = sorted(t for s, t in by_key if s == speaker)
        pools = {t: rng.sample(by_key[(speaker, t)], len(by_key[(speaker, t)])) for t in texts}
        for k in range(per_speaker):
            text = texts[k % len(texts)]
            if pools[text]:
                keep.add(pools[text].pop())
    ids = {id(dataset.examples[i]) for i in keep}
    return dataset.subset(lambda e: id(e) in ids)


def per_digit_subset(dataset: CTCDataset, per_text: int) -> CTCDataset:
    """The first `per_text` utterances of each transcript (a fixed, balanced subset for the noisy conditions)."""
    counts: dict[str, int] = {}

    def keep(e):
        counts[e["text"]] = counts.get(e["text"], 0) + 1
        return counts[e["text"]] <= per_text

    return dataset.subset(keep)


# ----- pretraining ------------------------------------------------------------------------------------------------
def pretrain_settings(args: ExperimentArguments) -> dict:
    """What a pretraining run depends on (a finished one is reused only when these match)."""
    return {k: getattr(args, k) for k in ("model_preset", "scale", "pretrain_steps", "pretrain_learning_rate",
                                          "pretrain_warmup_ratio", "pretrain_batch_seconds", "pretrain_max_seconds")}


def finetune_settings(args: ExperimentArguments) -> dict:
    """What a fine-tuning run depends on besides its arm (a finished one is reused only when these match)."""
    return {**pretrain_settings(args), **{k: getattr(args, k) for k in (
        "low_resource_per_speaker", "pretrain_on_test_speaker_audio", "finetune_steps_low", "finetune_steps_full",
        "finetune_learning_rate", "finetune_batch_size", "freeze_feature_encoder", "freeze_transformer_steps",
        "mask_time_prob",
        "mask_time_length", "speed_perturbation", "snrs", "noisy_per_digit", "lm_decoding", "self_training_rounds")},
        **({k: getattr(args, k) for k in ("self_training_pool_per_digit", "self_training_steps",
                                          "self_training_learning_rate", "self_training_labels")}
           if args.self_training_rounds else {}),
        **({"weight_ema_decay": args.weight_ema_decay} if args.weight_ema_decay else {}),
        **({"noise_augmentation": args.noise_augmentation} if args.noise_augmentation else {})}


def _finished(path: Path, settings: dict) -> bool:
    return path.exists() and json.loads(path.read_text()).get("settings") == json.loads(json.dumps(settings))


def pretrain_command(args: ExperimentArguments, objective: str, audio_files: list[str], out_dir: Path):
    """The `python -m data2vec_aqc_hf.pretraining` command (its own process and accelerate state) for one
    objective, or None when a finished model with the same settings is already there."""
    if (out_dir / "summary.json").exists() and _finished(out_dir / "experiment_settings.json",
                                                         pretrain_settings(args)):
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    manifest = out_dir / "pretrain_audio.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name"])
        writer.writerows([str(Path(a).resolve())] for a in audio_files)
    objective, overrides = ARMS[objective]
    flags = dict(output_dir=out_dir, model_preset=args.model_preset, objective=objective, train_data=manifest,
                 min_duration_in_seconds=0.2, max_duration_in_seconds=args.pretrain_max_seconds,
                 max_batch_duration_in_seconds=args.pretrain_batch_seconds, learning_rate=args.pretrain_learning_rate,
                 warmup_ratio=args.pretrain_warmup_ratio, hold_ratio=round(0.93 - args.pretrain_warmup_ratio, 6),
                 decay_ratio=0.07,
                 max_steps=args.steps(args.pretrain_steps), logging_steps=10, save_steps=10 ** 9, save_total_limit=1,
                 seed=0)
    if overrides:
        flags["config_overrides"] = json.dumps(overrides)
    cmd = [sys.executable, "-m", "data2vec_aqc_hf.pretraining"]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def last_progress(log: Path) -> str:
    """The newest progress-bar state (tqdm's `step/total [elapsed<left, ...]`) written to `log`, or "starting"."""
    try:
        tail = log.read_bytes()[-20000:].decode("utf-8", "replace")
    except OSError:
        return "starting"
    found = re.findall(r"pretraining:[^|]*\|[^|]*\|\s*(\d+/\d+) \[([0-9:]+)<([0-9:?]+)", tail)
    if not found:
        return "starting"
    done, elapsed, left = found[-1]
    return f"update {done}, {elapsed} elapsed, {left} left"


def run_commands(commands: list[tuple[str, list[str]]], jobs: int, log_dir: Path, report_every: float = 60.0) -> None:
    """Run `(name, command)` pairs, `jobs` at a time, one thread each when several run; each one's output goes to
    `log_dir/<name>.log`, and every `report_every` seconds each running one's progress (`last_progress`) is printed.
    Raises naming the first that failed."""
    import os

    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if jobs > 1 and len(commands) > 1 else {})}
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running = list(commands), []
    last_report = time.time()
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            log = open(log_dir / f"{name}.log", "w")
            print(f"[pretrain] {name}: started (log {log_dir / (name + '.log')})", flush=True)
            running.append((name, cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        if time.time() - last_report >= report_every:
            last_report = time.time()
            for name, _, _, _ in running:
                print(f"[pretrain] {name}: {last_progress(log_dir / f'{name}.log')}", flush=True)
        for item in list(running):
            name, cmd, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode:
                for _, _, other, _ in running:
                    other.kill()
                raise RuntimeError(f"{name} failed (exit {proc.returncode}), see {log_dir / (name + '.log')}: "
                                   + " ".join(cmd))
            print(f"[pretrain] {name}: done", flush=True)


# ----- pretraining diagnostic: a linear probe ---------------------------------------------------------------------
def pooled_hidden_states(model, arrays: list[np.ndarray]) -> torch.Tensor:
    """Time-averaged hidden states of every layer (the input to the first transformer layer, then each layer's
    output) of a `Data2VecAudioModel` for each 16 kHz array, one clip at a time: `(clips, layers + 1, hidden)`."""
    from .audio import feature_extractor

    extractor = feature_extractor()
    pooled = []
    model.eval()
    with torch.no_grad():
        for audio in arrays:
            x = extractor(audio, sampling_rate=16000, return_tensors="pt")["input_values"]
            hidden = model(x.to(model.device), output_hidden_states=True).hidden_states
            pooled.append(torch.stack([h[0].mean(0) for h in hidden]).float().cpu())
    return torch.stack(pooled)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          steps: int = 300, seed: int = 0) -> float:
    """Accuracy on `test_x` of a softmax regression fitted on `train_x` (features standardised with the training
    statistics; Adam, weight decay 1e-3, full batch): how linearly the classes can be read from the features."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = (0.01 * torch.randn(train_x.shape[1], classes, generator=g)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(train_x @ w + b, train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((test_x @ w + b).argmax(-1) == test_y).float().mean())


def representation_probe(encoders: dict, fsdd: CTCDataset, folds: list[str], every: int = 2) -> dict:
    """For each encoder (`name -> Data2VecAudioModel`): per fold, a linear probe of the spoken digit on the
    time-averaged hidden states of each layer, fitted on the other speakers' clips and scored on the fold's
    speaker (every `every`-th clip). Chance is 10 %. Returns `{name: {"by_layer": [mean accuracy over folds per
    layer], "per_fold": {fold: [...]}}}`: whether pretraining put the word, in a form that carries over to a new
    speaker, into the representation before any label was seen."""
    examples = fsdd.examples[::every]
    texts = sorted({e["text"] for e in examples})
    labels = torch.tensor([texts.index(e["text"]) for e in examples])
    speakers = np.array([e["speaker_id"] for e in examples])
    out = {}
    for name, model in encoders.items():
        pooled = pooled_hidden_states(model, [e["input_values"] for e in examples])
        per_fold = {}
        for fold in folds:
            test = torch.from_numpy(speakers == fold)
            per_fold[fold] = [round(linear_probe_accuracy(pooled[~test, k], labels[~test], pooled[test, k],
                                                          labels[test]), 4) for k in range(pooled.shape[1])]
        out[name] = {"by_layer": [float(np.mean([v[k] for v in per_fold.values()]))
                                  for k in range(pooled.shape[1])], "per_fold": per_fold}
    return out


def run_representation_probe(args, out: Path, pretrained: dict, fsdd_rows: list[dict], folds: list[str]) -> dict:
    """`representation_probe` of a randomly initialised encoder ("none") and each pretrained one, cached in
    `out/representation_probe.json` (redone when the pretraining settings change). Only for the shared pretraining
    (`pretrain_on_test_speaker_audio`); per-fold pretrainings are not probed."""
    if not args.pretrain_on_test_speaker_audio:
        return {}
    cache = out / "representation_probe.json"
    settings = {**pretrain_settings(args), "folds": folds, "arms": sorted({o for o, _ in pretrained})}
    if _finished(cache, settings):
        return json.loads(cache.read_text())["probe"]
    from transformers import Data2VecAudioModel

    from .configuration_data2vec_aqc import Data2VecAQCConfig
    from .modeling_data2vec_aqc import Data2VecAQCForPreTraining

    print("linear probe of the digit on each encoder's layers (random init and each pretrained model)", flush=True)
    set_seed(0)
    encoders = {"none": Data2VecAudioModel(Data2VecAQCConfig.from_preset(args.model_preset).to_data2vec_audio_config())}
    for (objective, _), path in sorted(pretrained.items()):
        if objective not in encoders:
            encoders[objective] = Data2VecAQCForPreTraining.from_pretrained(path).data2vec_audio
    import tempfile

    processor = make_processor(build_vocab([normalize_text(r["text"]) for r in fsdd_rows]), tempfile.mkdtemp())
    probe = representation_probe(encoders, CTCDataset(fsdd_rows, processor), folds)
    cache.write_text(json.dumps({"settings": settings, "probe": probe}, indent=1))
    return probe


# ----- one fine-tuning run ----------------------------------------------------------------------------------------
def finetune_and_test(args, init: str, checkpoint: Path | None, train_set, test_set, noisy_set, fit_set, processor,
                      babble_bank, seed: int, steps: int, run_dir: Path, labels: str = "", pool=None) -> dict:
    """Fine-tune one initialisation with CTC (then, given a `pool` CTCDataset of the test speaker's other clips,
    self-train on their audio: its transcripts only report the pseudo-labels' accuracy), then WER/CER on the test
    speaker in every condition and on a sample of the training utterances (fit). Returns the result dict (also
    saved as `run_dir/result.json`)."""
    start = time.time()
    set_seed(seed)
    model = load_ctc_model(
        None if checkpoint is None else str(checkpoint), processor, mask_time_prob=args.mask_time_prob,
        mask_time_length=args.mask_time_length, mask_time_min_masks=0, mask_feature_prob=0.0, layerdrop=0.0,
        freeze_feature_encoder=args.freeze_feature_encoder if checkpoint is not None else False,
        model_preset=args.model_preset if checkpoint is None else None,
    )
    training_args = TrainingArguments(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=args.finetune_batch_size,
        learning_rate=args.finetune_learning_rate, warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", weight_decay=0.01,
        adam_beta2=0.98, max_grad_norm=5.0, logging_steps=max(1, steps // 20), save_strategy="no",
        eval_strategy="no", report_to="none", seed=seed, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length", disable_tqdm=True,
    )
    trainer = train_ctc(model, processor, train_set, None, training_args, args.freeze_transformer_steps,
                        print_logs=False, speed_perturbation=speed_range(args.speed_perturbation),
                        weight_ema_decay=args.weight_ema_decay, noise_augmentation=args.noise_augmentation)
    model = trainer.model
    loss_curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    metrics, self_training = {}, []
    if pool is not None and args.self_training_rounds:
        metrics["before_st"] = evaluate_rows(model, processor, test_set)
        trainer, self_training = self_train_arm(args, model, processor, train_set, pool, training_args, run_dir)
        model = trainer.model
    train_seconds = time.time() - start
    metrics["clean"] = evaluate_rows(model, processor, test_set)
    if args.lm_decoding:
        transcribe = lm_transcriber(model, processor, [e["text"] for e in train_set.examples], run_dir / "lm.arpa")
        if transcribe is not None:
            metrics["clean_lm"] = evaluate_rows(model, processor, test_set, transcribe=transcribe)
    for snr in args.snr_list:
        for kind in NOISE_KINDS:
            metrics[f"{kind}_{snr:g}"] = evaluate_rows(model, processor, noisy_set, snr_db=snr, seed=seed,
                                                       noise=kind, babble_bank=babble_bank)
    fit = evaluate_rows(model, processor, fit_set)
    result = {
        "init": init, "labels": labels, "seed": seed, "steps": steps, "num_train": len(train_set),
        "test_speaker": test_set.examples[0]["speaker_id"],
        "wer": {k: v["wer"] for k, v in metrics.items()}, "cer": {k: v["cer"] for k, v in metrics.items()},
        "train_fit_wer": fit["wer"], "examples": metrics["clean"]["examples"],
        "train_loss": trainer.train_result.training_loss,
        "loss_curve": loss_curve, "self_training": self_training,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - start, 1),
        "threads": torch.get_num_threads(), "num_test": len(test_set), "num_noisy_test": len(noisy_set),
        "settings": finetune_settings(args),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def self_train_arm(args, model, processor, train_set, pool, training_args, run_dir: Path):
    """`self_training.self_train` for one run: `args.self_training_rounds` rounds on the audio of `pool`, most
    confident half kept, labels as `args.self_training_labels`. Returns the last trainer and the rounds' records."""
    from .self_training import label_constraints, round_arguments, self_train

    round_args = round_arguments(training_args, args.steps(args.self_training_steps), args.self_training_learning_rate,
                                 run_dir / "self-training")
    lexicon, candidates = label_constraints(args.self_training_labels, [e["text"] for e in train_set.examples])
    return self_train(model, processor, train_set, [e["input_values"] for e in pool.examples], round_args,
                      args.self_training_rounds, 0.5, lexicon, [str(e["name"]) for e in pool.examples],
                      speed_range(args.speed_perturbation), references=[e["text"] for e in pool.examples],
                      print_logs=False, candidates=candidates, noise_augmentation=args.noise_augmentation)


_WORKER: dict = {}


def _worker_init(args_dict: dict, threads: int) -> None:
    """Load the corpus once per worker process."""
    import transformers

    logging.basicConfig(level=logging.ERROR)
    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    args = ExperimentArguments(**args_dict)
    fsdd_rows, _, babble_files = load_corpus(Path(args.corpus_dir))
    import tempfile

    processor = make_processor(build_vocab([normalize_text(r["text"]) for r in fsdd_rows]), tempfile.mkdtemp())
    babble_bank = []
    for path in babble_files:
        try:
            babble_bank.append(load_audio(path))
        except AudioError as err:
            logger.warning("babble bank: skipping %s", err)
    _WORKER.update(args=args, processor=processor, fsdd=CTCDataset(fsdd_rows, processor, min_samples=400),
                   babble_bank=babble_bank)


def _worker_run(arm: dict) -> dict:
    args, fsdd = _WORKER["args"], _WORKER["fsdd"]
    fold, labels, seed = arm["fold"], arm["labels"], arm["seed"]
    test_set, pool = fsdd.subset(lambda e: e["speaker_id"] == fold), None
    if args.self_training_rounds:  # the pool's clips are never scored
        pool = per_digit_subset(test_set, args.self_training_pool_per_digit)
        in_pool = {id(e) for e in pool.examples}
        test_set = test_set.subset(lambda e: id(e) not in in_pool)
    train_full = fsdd.subset(lambda e: e["speaker_id"] != fold)
    train_set = (train_full if labels in ("full", "sanity")
                 else low_resource_subset(train_full, args.low_resource_per_speaker, seed))
    steps = {"full": args.steps(args.finetune_steps_full), "low": args.steps(args.finetune_steps_low),
             "sanity": args.steps(args.sanity_steps)}[labels]
    # fit: WER on utterances the run trained on (all of them for the sanity run, 60 otherwise)
    fit_set = train_set if labels == "sanity" else low_resource_subset(train_set, 20, 1234)
    return finetune_and_test(
        args, arm["init"], Path(arm["checkpoint"]) if arm["checkpoint"] else None, train_set, test_set,
        per_digit_subset(test_set, args.noisy_per_digit), fit_set,
        _WORKER["processor"], _WORKER["babble_bank"], seed, steps, Path(arm["run_dir"]), labels,
        pool=None if labels == "sanity" else pool)


# ----- the whole experiment ---------------------------------------------------------------------------------------
def run_experiment(args: ExperimentArguments) -> dict:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus_dir)
    started = time.time()
    fsdd_rows, pretrain_files, babble_files = load_corpus(corpus)
    make_processor(build_vocab([normalize_text(r["text"]) for r in fsdd_rows]), out / "processor")  # for reference
    speakers = sorted({r["speaker_id"] for r in fsdd_rows})
    folds = [s.strip() for s in args.test_speakers.split(",")] if args.test_speakers else speakers
    missing = set(folds) - set(speakers)
    if missing:
        raise ValueError(f"test speaker(s) {sorted(missing)} not among the FSDD speakers {speakers}")

    # 1. pretraining (labels never read: the FSDD files enter as audio only)
    pretrained: dict[tuple[str, str], Path] = {}
    commands = []
    for objective in [o for o in args.objectives_list if o != "none"]:
        variants = ([("all", [r["audio"] for r in fsdd_rows], folds)] if args.pretrain_on_test_speaker_audio else
                    [(f"without-{fold}", [r["audio"] for r in fsdd_rows if r["speaker_id"] != fold], [fold])
                     for fold in folds])
        for tag, fsdd_audio, for_folds in variants:
            path = out / "pretrain" / (objective if tag == "all" else f"{objective}-{tag}")
            pretrained.update({(objective, fold): path for fold in for_folds})
            cmd = pretrain_command(args, objective, pretrain_files + fsdd_audio, path)
            if cmd:
                commands.append((path.name, cmd))
    print(f"pretraining {len(commands)} model(s), {args.steps(args.pretrain_steps)} updates each", flush=True)
    run_commands(commands, args.jobs, out / "logs")
    for path in set(pretrained.values()):
        (path / "experiment_settings.json").write_text(json.dumps({"settings": pretrain_settings(args)}))

    probe = run_representation_probe(args, out, pretrained, fsdd_rows, folds) if args.probe_representations else {}

    # 2-3. fine-tune and test every arm, `jobs` at a time in worker processes
    arms = [dict(seed=seed, fold=fold, labels=labels, init=init) for seed in args.seed_list for fold in folds
            for labels in args.label_set_list for init in args.objectives_list]
    results, todo = [], []
    for arm in arms:
        run_dir = out / "runs" / "{init}-{labels}-{fold}-seed{seed}".format(**arm)
        arm.update(run_dir=str(run_dir), checkpoint=str(pretrained[(arm["init"], arm["fold"])])
                   if arm["init"] != "none" else None)
        if _finished(run_dir / "result.json", finetune_settings(args)):
            results.append(json.loads((run_dir / "result.json").read_text()))
        else:
            todo.append(arm)
    if args.sanity_steps > 0:
        arm = dict(seed=0, fold=folds[-1], labels="sanity", init="none", checkpoint=None,
                   run_dir=str(out / "runs" / f"sanity-none-full-{folds[-1]}"))
        arms.append(arm)
        path = Path(arm["run_dir"]) / "result.json"
        if _finished(path, finetune_settings(args)) and json.loads(path.read_text())["steps"] == args.steps(
                args.sanity_steps):
            results.append(json.loads((Path(arm["run_dir"]) / "result.json").read_text()))
        else:
            todo.insert(0, arm)  # the longest run first
    print(f"{len(arms)} fine-tuning runs ({len(arms) - len(todo)} already done), {args.jobs} at a time", flush=True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if todo:
        pool = ProcessPoolExecutor(max_workers=min(args.jobs, len(todo)),
                                   mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                   initargs=(asdict(args), 1 if args.jobs > 1 else 0))
        try:
            futures = [pool.submit(_worker_run, arm) for arm in todo]
            result_times = []
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                result_times.append(result["total_seconds"])
                print(f"[{len(results)}/{len(arms)}] {result['init']:8s} {result['labels']:6s} test "
                      f"{result['test_speaker']} seed {result['seed']}: WER clean {100 * result['wer']['clean']:.1f} %, "
                      + ", ".join(f"{k} {100 * v:.1f}" for k, v in result["wer"].items() if k != "clean")
                      + f"; training speakers {100 * result['train_fit_wer']:.1f} % ({result['total_seconds']:.0f} s;"
                      f" elapsed {(time.time() - started) / 60:.1f} min, {eta_minutes(result_times, len(todo), args.jobs)})",
                      flush=True)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    # 4. report
    sanity = [r for r in results if r["labels"] == "sanity"]
    results = [r for r in results if r["labels"] != "sanity"]
    summary = summarize(results, conditions(args.snr_list, args.lm_decoding, args.self_training_rounds > 0))
    report = {"arguments": {k: v for k, v in asdict(args).items()}, "summary": summary, "runs": results,
              "sanity": sanity[0] if sanity else None, "representation_probe": probe,
              "machine": machine_description(), "command": " ".join(["python", *sys.argv]), "wall_minutes": round((time.time() - started) / 60, 1),
              "pretraining": {p.name: json.loads((p / "summary.json").read_text())
                              for p in sorted(set(pretrained.values()))}}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    plot_results(summary, args, out / "results.png")
    markdown = results_markdown(report, args, out)
    (out / "RESULTS.md").write_text(re.sub(r"\(pretrain_([^)]+)\.png\)", r"(pretrain/\1/loss.png)", markdown))
    if args.results_md:
        target = Path(args.results_md)
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = "fsdd_ssl_" if target.name == "RESULTS.md" else f"{target.stem.lower()}_"  # one report's plots
        for png in [out / "results.png", *sorted((out / "pretrain").glob("*/loss.png"))]:
            name = "results.png" if png.name == "results.png" else f"pretrain_{png.parent.name}.png"
            shutil.copyfile(png, target.parent / f"{prefix}{name}")
        target.write_text(markdown.replace("](", f"]({prefix}").replace(f"{prefix}http", "http"))
    print(f"results: {out / 'RESULTS.md'}" + (f" and {args.results_md}" if args.results_md else ""), flush=True)
    return report


def eta_minutes(durations: list[float], total: int, jobs: int) -> str:
    """"about N min left" for `total` runs of which `durations` (seconds each) are done, `jobs` at a time."""
    left = total - len(durations)
    if left <= 0:
        return "done"
    return f"about {float(np.mean(durations)) * math.ceil(left / max(1, jobs)) / 60:.0f} min left"


def summarize(results: list[dict], condition_names: list[str]) -> dict:
    """Mean and standard deviation of WER and CER over folds x seeds for each (labels, init, condition)."""
    summary: dict = {}
    for labels in sorted({r["labels"] for r in results}):
        for init in sorted({r["init"] for r in results}):
            runs = [r for r in results if r["labels"] == labels and r["init"] == init]
            if not runs:
                continue
            entry = {"n": len(runs), "train_fit_wer": _stats([r["train_fit_wer"] for r in runs])}
            for metric in ("wer", "cer"):
                entry[metric] = {c: _stats([r[metric][c] for r in runs]) for c in condition_names
                                 if all(c in r[metric] for r in runs)}
            summary.setdefault(labels, {})[init] = entry
    return summary


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def relative_gain(baseline: float, new: float) -> float:
    """Relative WER reduction of `new` over `baseline` (positive = better)."""
    return (baseline - new) / baseline if baseline > 0 else math.nan


def machine_description() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.processor() or platform.machine()}, {device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def plot_results(summary: dict, args: ExperimentArguments, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = conditions(args.snr_list, args.lm_decoding, args.self_training_rounds > 0)
    label_sets = [l for l in ("low", "full") if l in summary]
    fig, axes = plt.subplots(1, len(label_sets), figsize=(7 * len(label_sets), 4.2), squeeze=False)
    for ax, labels in zip(axes[0], label_sets):
        inits = list(summary[labels])
        width = 0.8 / len(inits)
        for k, init in enumerate(inits):
            wer = summary[labels][init]["wer"]
            xs = [i + (k - (len(inits) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [100 * wer[c]["mean"] if c in wer else 0.0 for c in names], width,
                   yerr=[100 * wer[c]["std"] if c in wer else 0.0 for c in names],
                   capsize=2, label="scratch" if init == "none" else init)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30)
        ax.set_ylabel("WER on the unseen speaker (%)")
        ax.set_ylim(0, 105)
        n = next(iter(summary[labels].values()))["n"]
        ax.set_title(f"{labels} labelled set: mean ± std over {n} fold x seed runs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(report: dict, args: ExperimentArguments, out: Path) -> str:
    summary, names = report["summary"], conditions(args.snr_list, args.lm_decoding, args.self_training_rounds > 0)
    lines = [
        "# Learning experiment: does pretraining help on unseen speakers? (FSDD, CPU scale)",
        "",
        f"Written by `{report['command']}` on {report['machine']}, "
        f"{args.jobs} run(s) at a time with {sorted({r.get('threads', '?') for r in report['runs']})} thread(s) each; "
        f"{report['wall_minutes']} min wall clock for the last invocation (finished runs are reused); one run takes "
        f"{np.mean([r['total_seconds'] for r in report['runs']]) / 60:.1f} min on average. Numbers are from that run; "
        "CPU results differ slightly across machines and thread counts.",
        "",
        f"Design: model preset `{args.model_preset}`; pretraining {args.steps(args.pretrain_steps)} updates per "
        f"objective (lr {args.pretrain_learning_rate:g}, {100 * args.pretrain_warmup_ratio:g} % warm-up, "
        f"{args.pretrain_batch_seconds:g} s of padded audio per batch) "
        "on unlabelled audio: LibriSpeech train-clean-100 (60 speakers, 12 min), LJ Speech (3.7 min) and FSDD "
        + ("*including the test speaker's audio, never its transcripts*" if args.pretrain_on_test_speaker_audio
           else "without the test speaker") +
        f". CTC fine-tuning: `low` = {args.low_resource_per_speaker} utterances per training speaker "
        f"({args.steps(args.finetune_steps_low)} updates), `full` = all of them (500 per speaker) "
        f"({args.steps(args.finetune_steps_full)} updates); batch {args.finetune_batch_size}, lr "
        f"{args.finetune_learning_rate:g}, time masking {args.mask_time_prob:g} x {args.mask_time_length} frames, "
        f"speed perturbation of the training clips {1 - args.speed_perturbation:g}-{1 + args.speed_perturbation:g}x"
        + (f", data2vec-aqc's noise / reverberation augmentation on {100 * args.noise_augmentation:g} % of them"
           if args.noise_augmentation else "") + ", CNN "
        f"{'frozen' if args.freeze_feature_encoder else 'trained'}; the same recipe for every initialisation, no "
        "checkpoint selection. Test: the held-out speaker, rotated over "
        f"{len({r['test_speaker'] for r in report['runs']})} speakers, seeds {args.seeds}; clean = all "
        f"{report['runs'][0].get('num_test', '?')} utterances of the speaker, noisy = "
        f"{report['runs'][0].get('num_noisy_test', '?')} (white Gaussian, or babble of 4 LibriSpeech test-other "
        "talkers never used in pretraining). Greedy CTC decoding, no LM"
        + ("; `clean_lm`: the clean set decoded with a word bigram LM of the run's own training transcripts (KenLM "
           "beam search: it knows the ten digit words, nothing about the test speaker)." if args.lm_decoding else ".")
        + (f" Self-training: after fine-tuning, {args.self_training_rounds} round(s) of "
           f"{args.steps(args.self_training_steps)} updates (lr {args.self_training_learning_rate:g}) on the labelled "
           f"set plus the most confident half of a pool of {args.self_training_pool_per_digit} takes per digit of the "
           f"test speaker, labelled by the model ({args.self_training_labels}; their transcripts never read); those "
           "takes are left out of every test set, and `before_st` is the clean WER of the same runs before "
           "self-training." if args.self_training_rounds else ""),
        "",
        *reduced_design_note(report, args),
        "## WER on the unseen speaker (%), mean ± std over folds x seeds",
        "",
    ]
    for labels in [l for l in ("low", "full") if l in summary]:
        lines += [f"### `{labels}` labelled set", "",
                  "| init | runs | " + " | ".join(names) + " | training speakers |",
                  "|---|---:|" + "---:|" * (len(names) + 1)]
        for init, entry in summary[labels].items():
            cells = [f"{100 * entry['wer'][c]['mean']:.1f} ± {100 * entry['wer'][c]['std']:.1f}"
                     if c in entry["wer"] else "n/a" for c in names]
            fit = entry["train_fit_wer"]
            lines.append(f"| {'scratch' if init == 'none' else init} | {entry['n']} | " + " | ".join(cells)
                         + f" | {100 * fit['mean']:.1f} |")
        lines.append("")
    lines += ["![WER by condition](results.png)", "", "## Against the targets", ""]
    sanity = report.get("sanity")
    if sanity:
        lines.append(f"* Sanity: from scratch on all {sanity['num_train']} utterances of the three training speakers, "
                     f"{sanity['steps']} updates, WER on those training utterances <= 5 %: "
                     f"{100 * sanity['train_fit_wer']:.1f} % -> {'met' if sanity['train_fit_wer'] <= 0.05 else 'NOT met'}"
                     f" (unseen {sanity['test_speaker']}: {100 * sanity['wer']['clean']:.1f} %; "
                     f"{sanity['train_seconds'] / 60:.1f} min with {sanity.get('threads', '?')} thread(s))")
    lines += target_lines(summary, names)
    lines += ["", "## Pretraining diagnostics", ""]
    probe = report.get("representation_probe") or {}
    if probe:
        layers = len(next(iter(probe.values()))["by_layer"])
        lines += ["Linear probe of the spoken digit (10 classes, chance 10 %) on each layer's time-averaged hidden "
                  "states, before any fine-tuning: fitted on the three training speakers' clips, accuracy (%) on the "
                  "unseen speaker, mean over folds. Layer 0 is the transformer's input (CNN + projection), "
                  f"1-{layers - 1} the transformer layers' outputs.", "",
                  "| encoder | " + " | ".join(f"layer {k}" for k in range(layers)) + " |",
                  "|---|" + "---:|" * layers]
        for name, entry in probe.items():
            lines.append(f"| {'random init' if name == 'none' else name} | "
                         + " | ".join(f"{100 * a:.1f}" for a in entry["by_layer"]) + " |")
        lines.append("")
    for objective, info in report["pretraining"].items():
        final = info.get("final", {})
        keys = ["loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "target_std",
                "prediction_std", "representation_rank", "variance_loss", "covariance_loss", "codebook_perplexity_0",
                "codebook_perplexity_1", "gumbel_temperature", "ema_decay"]
        lines.append(f"* `{objective}`: {info['steps']} updates, {info['hours_seen']:.2f} h of audio seen; final "
                     + ", ".join(f"{k} {final[k]:.3g}" for k in keys if k in final))
    for png in sorted((out / "pretrain").glob("*/loss.png")):
        lines += ["", f"![{png.parent.name} pretraining](pretrain_{png.parent.name}.png)"]
    lines += ["", "## Per run", "", "| init | labels | test speaker | seed | clean WER | worst noisy WER | "
              "training speakers WER | train s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(report["runs"], key=lambda r: (r["labels"], r["init"], r["test_speaker"], r["seed"])):
        noisy = max(v for k, v in r["wer"].items() if k.startswith(NOISE_KINDS))
        lines.append(f"| {r['init']} | {r['labels']} | {r['test_speaker']} | {r['seed']} | "
                     f"{100 * r['wer']['clean']:.1f} | {100 * noisy:.1f} | {100 * r['train_fit_wer']:.1f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def reduced_design_note(report: dict, args: ExperimentArguments) -> list[str]:
    """A warning paragraph when the run covered less than the full design (4 folds, 2 seeds, both label sets)."""
    folds = sorted({r["test_speaker"] for r in report["runs"]})
    seeds = sorted({r["seed"] for r in report["runs"]})
    labels = sorted({r["labels"] for r in report["runs"]})
    if len(folds) >= 4 and len(seeds) >= 2 and len(labels) == 2:
        return []
    return [f"**Reduced design**: this run covers test speaker(s) {', '.join(folds)}, seed(s) "
            f"{', '.join(map(str, seeds))} and the `{'`, `'.join(labels)}` labelled set(s) only, not the full design "
            "(4 folds x 2 seeds x low and full); a mean over one run has no spread.", ""]


def target_lines(summary: dict, names: list[str]) -> list[str]:
    """The issue's targets, each with the measured numbers and whether it is met."""
    lines = []

    def mean(labels, init, cond="clean"):
        try:
            return summary[labels][init]["wer"][cond]["mean"]
        except KeyError:
            return None

    best = [(mean(l, i), l, i) for l in summary for i in summary[l] if i != "none" and mean(l, i) is not None]
    if best:
        value, labels, init = min(best)
        lines.append(f"* Best pretrained model, clean WER <= 10 %: {init} / {labels} = {100 * value:.1f} % "
                     f"-> {'met' if value <= 0.10 else 'NOT met'}")
    scratch = mean("low", "none")
    for init in ARMS:
        value = mean("low", init)
        if scratch is not None and value is not None:
            gain = relative_gain(scratch, value)
            lines.append(f"* Low-resource, {init} vs scratch, >= 30 % relative: {100 * value:.1f} vs "
                         f"{100 * scratch:.1f} % = {100 * gain:+.0f} % -> {'met' if gain >= 0.30 else 'NOT met'}")
    for labels in summary:
        for suffix in ("", "-efficient", "-vicreg"):
            aqc_arm, d2v_arm = "aqc" + suffix, "data2vec" + suffix
            aqc, d2v = mean(labels, aqc_arm), mean(labels, d2v_arm)
            if aqc is None or d2v is None:
                continue
            parts = [f"clean {100 * aqc:.1f} vs {100 * d2v:.1f}"]
            for cond in [c for c in names if c.endswith(("_5", "_0"))]:
                a, d = mean(labels, aqc_arm, cond), mean(labels, d2v_arm, cond)
                if a is None or d is None:
                    continue
                parts.append(f"{cond} {100 * a:.1f} vs {100 * d:.1f} ({'better' if a < d else 'not better'})")
            lines.append(f"* `{labels}`: {aqc_arm} vs {d2v_arm} (AQC should match clean, beat at 5 and 0 dB): "
                         + "; ".join(parts))
    return lines
