"""CTC fine-tuning on small corpora with transformers' Trainer: text normalisation, vocabulary, data, collator,
metrics, transformer freezing, stock export with processor and model card."""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCTC,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
    set_seed,
)

from .audio import TARGET_SAMPLING_RATE, AudioError, load_audio_example
from .metrics import load_metric, wer_cer

logger = logging.getLogger(__name__)

PAD, UNK, WORD_DELIMITER = "<pad>", "<unk>", "|"
DEFAULT_CHARS_TO_REMOVE = r"[\,\?\.\!\-\;\:\"\“\%\‘\”\�]"


def normalize_text(text: str, lowercase: bool = False, chars_to_remove: str = DEFAULT_CHARS_TO_REMOVE) -> str:
    text = re.sub(chars_to_remove, "", text) if chars_to_remove else text
    text = text.lower() if lowercase else text.upper()
    return " ".join(text.split())


def build_vocab(texts: list[str]) -> dict[str, int]:
    """Characters of the training text; `<pad>` (= CTC blank) is 0, space becomes `|`, plus `<unk>`."""
    chars = sorted({c for t in texts for c in t} - {" "})
    vocab = {PAD: 0, UNK: 1, WORD_DELIMITER: 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    return vocab


def make_processor(vocab: dict[str, int], directory: str | Path) -> Wav2Vec2Processor:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token=UNK, pad_token=PAD,
                                     word_delimiter_token=WORD_DELIMITER)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLING_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def read_manifest(path: str | Path) -> list[dict]:
    """Rows `{"audio", "text", "speaker_id"}` of a CSV manifest (`file_name,text[,speaker_id]`) or an audiofolder
    directory with a `metadata.csv`."""
    path = Path(path)
    manifest = path / "metadata.csv" if path.is_dir() else path
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: no such manifest (expected file_name,text[,speaker_id])")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file_name", "text"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {sorted(missing)} (columns: {reader.fieldnames})")
        rows = list(reader)
    return [{"audio": str(manifest.parent / r["file_name"]), "text": r["text"],
             "speaker_id": r.get("speaker_id") or "unknown"} for r in rows]


def read_hub_split(dataset_name, config_name, split, audio_column="audio", text_column="text",
                   speaker_column="speaker_id", **load_kwargs) -> list[dict]:
    """A Hub dataset split as rows; audio left encoded (`Audio(decode=False)`) for the package's loader."""
    import datasets

    ds = datasets.load_dataset(dataset_name, config_name, split=split, **load_kwargs)
    ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    return [{"audio": ex[audio_column], "text": ex[text_column],
             "speaker_id": str(ex.get(speaker_column, "unknown"))} for ex in ds]


def split_by_speaker(rows: list[dict], eval_speakers: list[str] | None = None, eval_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out whole speakers (named, or a random `eval_fraction` of them, at least one) for evaluation."""
    speakers = sorted({r["speaker_id"] for r in rows})
    if eval_speakers is None:
        if len(speakers) < 2:
            raise ValueError("splitting by speaker needs at least two speakers")
        shuffled = speakers[:]
        random.Random(seed).shuffle(shuffled)
        eval_speakers = shuffled[: max(1, round(eval_fraction * len(speakers)))]
    unknown = set(eval_speakers) - set(speakers)
    if unknown:
        raise ValueError(f"eval speaker(s) {sorted(unknown)} not in the data (speakers: {speakers})")
    held = set(eval_speakers)
    return [r for r in rows if r["speaker_id"] not in held], [r for r in rows if r["speaker_id"] in held]


def _name(row) -> str:
    audio = row["audio"]
    return audio if isinstance(audio, str) else (audio or {}).get("path") or "<bytes>"


class CTCDataset(torch.utils.data.Dataset):
    """Validated examples: each file is read once up front; unreadable, silent or too short files and empty
    transcripts are skipped with a warning naming the file; characters outside the vocabulary are reported and
    mapped to `<unk>`. Audio is kept in memory (small corpora)."""

    def __init__(self, rows, processor: Wav2Vec2Processor, min_samples: int = 400, lowercase=False,
                 chars_to_remove=DEFAULT_CHARS_TO_REMOVE):
        self.examples, self.skipped = [], []
        vocab = processor.tokenizer.get_vocab()
        for row in rows:
            name = _name(row)
            text = normalize_text(row["text"] or "", lowercase, chars_to_remove)
            if not text:
                self._skip(name, "empty transcript")
                continue
            try:
                audio = load_audio_example(row, "audio", min_samples=min_samples)
            except AudioError as err:
                self._skip(name, str(err))
                continue
            oov = sorted({c for c in text if c != " " and c not in vocab})
            if oov:
                logger.warning("%s: characters %s are not in the vocabulary; they become %s", name, oov, UNK)
            labels = processor.tokenizer(text).input_ids
            self.examples.append({"input_values": audio, "labels": labels, "text": text,
                                  "speaker_id": row.get("speaker_id", "unknown"), "name": name})

    def _skip(self, name, reason):
        self.skipped.append((name, reason))
        logger.warning("skipping %s", reason if name in reason else f"{name}: {reason}")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


@dataclass
class CTCCollator:
    """Pads audio (float32, attention mask) and labels (-100 where padded)."""

    processor: Wav2Vec2Processor

    def __call__(self, features):
        audio = [np.asarray(f["input_values"], dtype=np.float32) for f in features]
        batch = self.processor.feature_extractor(audio, sampling_rate=TARGET_SAMPLING_RATE, padding=True,
                                                 return_attention_mask=True, return_tensors="pt")
        longest = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        return {"input_values": batch["input_values"].float(), "attention_mask": batch["attention_mask"],
                "labels": labels}


class FreezeTransformerCallback(TrainerCallback):
    """Keep the transformer (everything but the CNN, which stays frozen, and `lm_head`) frozen for the first
    `steps` updates (fairseq `freeze_finetune_updates`)."""

    def __init__(self, model, steps: int):
        self.model, self.steps = model, steps
        self.params = [p for n, p in model.named_parameters()
                       if not n.startswith("lm_head") and "feature_extractor" not in n]

    def on_train_begin(self, args, state, control, **kwargs):
        if self.steps > 0:
            for p in self.params:
                p.requires_grad_(False)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.steps:
            for p in self.params:
                p.requires_grad_(True)


def decode_predictions(processor, logits: np.ndarray) -> list[str]:
    ids = np.argmax(logits, axis=-1)
    return processor.batch_decode(ids)


def make_compute_metrics(processor):
    """Trainer's `compute_metrics`: greedy decoding, then WER/CER through the package's `evaluate` metric."""
    metric = load_metric()

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = pred.label_ids.copy()
        labels[labels == -100] = processor.tokenizer.pad_token_id
        predictions = decode_predictions(processor, logits)
        references = processor.batch_decode(labels, group_tokens=False)
        return metric.compute(predictions=predictions, references=references)

    return compute_metrics


def load_ctc_model(checkpoint: str, processor, mask_time_prob=0.5, mask_time_length=10, mask_feature_prob=0.25,
                   mask_feature_length=64, layerdrop=0.05, trust_remote_code=False, freeze_feature_encoder=True):
    """`AutoModelForCTC.from_pretrained(checkpoint, vocab_size=...)` with the fine-tuning recipe of spec 7."""
    model = AutoModelForCTC.from_pretrained(
        checkpoint, vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id,
        ctc_zero_infinity=True, ctc_loss_reduction="mean", mask_time_prob=mask_time_prob,
        mask_time_length=mask_time_length, mask_feature_prob=mask_feature_prob,
        mask_feature_length=mask_feature_length, layerdrop=layerdrop, trust_remote_code=trust_remote_code,
    )
    if freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model


def transcribe_arrays(model, processor, arrays: list[np.ndarray], batch_size: int = 8) -> list[str]:
    """Greedy CTC transcripts of 16 kHz arrays."""
    model.eval()
    out = []
    for i in range(0, len(arrays), batch_size):
        batch = processor.feature_extractor(arrays[i : i + batch_size], sampling_rate=TARGET_SAMPLING_RATE,
                                            padding=True, return_attention_mask=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(batch["input_values"].float().to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits
        out += decode_predictions(processor, logits.float().cpu().numpy())
    return out


def evaluate_rows(model, processor, dataset: CTCDataset, snr_db: float | None = None, seed: int = 0,
                  transcribe=None) -> dict:
    """WER/CER overall and per speaker; with `snr_db`, white noise is added at that SNR first. `transcribe` maps a
    list of 16 kHz arrays to texts (default: greedy CTC; e.g. an `lm.LMTranscriber` for KenLM decoding)."""
    from .augment import mix_at_snr

    arrays = [e["input_values"] for e in dataset.examples]
    if snr_db is not None:
        g = torch.Generator().manual_seed(seed)
        noisy = []
        for a in arrays:
            x = torch.from_numpy(a)[None]
            noise = torch.randn(x.shape, generator=g)
            noisy.append(mix_at_snr(x, noise, torch.ones_like(x), torch.tensor([float(snr_db)]))[0].numpy())
        arrays = noisy
    predictions = transcribe(arrays) if transcribe else transcribe_arrays(model, processor, arrays)
    references = [e["text"] for e in dataset.examples]
    by_speaker = defaultdict(lambda: ([], []))
    for e, p in zip(dataset.examples, predictions):
        by_speaker[e["speaker_id"]][0].append(p)
        by_speaker[e["speaker_id"]][1].append(e["text"])
    return {**wer_cer(predictions, references), "num_utterances": len(predictions),
            "per_speaker": {s: wer_cer(p, r) for s, (p, r) in sorted(by_speaker.items())},
            "examples": [{"reference": r, "prediction": p} for r, p in list(zip(references, predictions))[:5]]}


__all__ = ["normalize_text", "build_vocab", "make_processor", "read_manifest",
           "split_by_speaker", "CTCDataset", "CTCCollator", "FreezeTransformerCallback", "make_compute_metrics",
           "load_ctc_model", "transcribe_arrays", "evaluate_rows", "FinetuneArguments", "run_finetuning"]


@dataclass
class FinetuneArguments:
    """Data and model options of `training/finetune.py` (Trainer options come from `TrainingArguments`)."""

    model_name_or_path: str = field(metadata={"help": "Pretrained checkpoint (ours, local or Hub)."})
    train_manifest: str | None = field(default=None, metadata={"help": "CSV file_name,text[,speaker_id] or dir."})
    eval_manifest: str | None = field(default=None, metadata={"help": "Optional; else split off by speaker."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id instead of a manifest."})
    dataset_config_name: str | None = None
    train_split_name: str = "train"
    eval_split_name: str | None = None
    audio_column_name: str = "audio"
    text_column_name: str = "text"
    speaker_column_name: str = "speaker_id"
    eval_speakers: str | None = field(default=None, metadata={"help": "Comma-separated speakers held out."})
    eval_speaker_fraction: float = 0.2
    lowercase: bool = False
    chars_to_ignore_regex: str = DEFAULT_CHARS_TO_REMOVE
    freeze_transformer_steps: int = field(default=0, metadata={"help": "Keep the transformer frozen this long."})
    freeze_feature_encoder: bool = field(default=True, metadata={"help": "Keep the CNN feature encoder frozen (the "
                                                                         "paper's recipe; as run_speech_recognition_ctc)."})
    mask_time_prob: float = 0.5
    mask_time_length: int = 10
    mask_feature_prob: float = 0.25
    mask_feature_length: int = 64
    layerdrop: float = 0.05
    trust_remote_code: bool = False
    hub_dataset_id_for_card: str | None = None


def _rows(args: FinetuneArguments):
    if args.dataset_name:
        kw = dict(audio_column=args.audio_column_name, text_column=args.text_column_name,
                  speaker_column=args.speaker_column_name)
        train = read_hub_split(args.dataset_name, args.dataset_config_name, args.train_split_name, **kw)
        evals = (read_hub_split(args.dataset_name, args.dataset_config_name, args.eval_split_name, **kw)
                 if args.eval_split_name else None)
    else:
        if not args.train_manifest:
            raise ValueError("give --train_manifest (CSV or audiofolder dir) or --dataset_name")
        train = read_manifest(args.train_manifest)
        evals = read_manifest(args.eval_manifest) if args.eval_manifest else None
    if evals is None:
        speakers = args.eval_speakers.split(",") if args.eval_speakers else None
        train, evals = split_by_speaker(train, speakers, args.eval_speaker_fraction, seed=0)
    return train, evals


def run_finetuning(args: FinetuneArguments, training_args: TrainingArguments) -> dict:
    """Fine-tune, evaluate, save a stock data2vec-audio checkpoint + processor + card, maybe push. Returns metrics."""
    from .cards import write_card
    from .export import save_as_data2vec_audio

    output_dir = Path(training_args.output_dir)
    train_rows, eval_rows = _rows(args)
    texts = [normalize_text(r["text"] or "", args.lowercase, args.chars_to_ignore_regex) for r in train_rows]
    processor = make_processor(build_vocab([t for t in texts if t]), output_dir)
    train_set = CTCDataset(train_rows, processor, lowercase=args.lowercase, chars_to_remove=args.chars_to_ignore_regex)
    eval_set = CTCDataset(eval_rows, processor, lowercase=args.lowercase, chars_to_remove=args.chars_to_ignore_regex)
    if len(train_set) == 0:
        raise ValueError(f"no usable training examples ({len(train_set.skipped)} skipped)")
    set_seed(training_args.seed)  # before the new lm_head is initialised, as transformers' example scripts do
    model = load_ctc_model(args.model_name_or_path, processor, args.mask_time_prob, args.mask_time_length,
                           args.mask_feature_prob, args.mask_feature_length, args.layerdrop, args.trust_remote_code,
                           args.freeze_feature_encoder)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=CTCCollator(processor), compute_metrics=make_compute_metrics(processor),
                      processing_class=processor.feature_extractor,
                      callbacks=[FreezeTransformerCallback(model, args.freeze_transformer_steps)])
    train_result = trainer.train()
    model = trainer.model
    metrics = evaluate_rows(model, processor, eval_set)
    metrics["train_loss"] = train_result.training_loss
    metrics["skipped_files"] = len(train_set.skipped) + len(eval_set.skipped)

    final_dir = output_dir / "final"
    save_as_data2vec_audio(model, final_dir)
    processor.save_pretrained(final_dir)
    (final_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    from .plots import plot_curves

    plot_curves(trainer.state.log_history, [("CTC loss", ["loss", "eval_loss"]), ("error rate", ["eval_wer", "eval_cer"])],
                final_dir / "training_curves.png", f"CTC fine-tuning of {args.model_name_or_path}")
    hours_train = sum(len(e["input_values"]) for e in train_set.examples) / TARGET_SAMPLING_RATE / 3600
    write_card(final_dir, "finetuned.md", {
        "model_name": training_args.hub_model_id or final_dir.parent.name,
        "base_model": args.model_name_or_path,
        "dataset_id": args.dataset_name or args.hub_dataset_id_for_card or "custom",
        "dataset_description": args.dataset_name or args.train_manifest,
        "train_hours": f"{hours_train:.3f}",
        "num_train": len(train_set), "num_eval": len(eval_set),
        "eval_speakers": ", ".join(sorted({e["speaker_id"] for e in eval_set.examples})),
        "wer": f"{100 * metrics['wer']:.2f}", "cer": f"{100 * metrics['cer']:.2f}",
        "wer_fraction": f"{metrics['wer']:.4f}", "cer_fraction": f"{metrics['cer']:.4f}",
        "learning_rate": training_args.learning_rate, "max_steps": trainer.state.global_step,
        "batch_size": training_args.per_device_train_batch_size,
        "freeze_steps": args.freeze_transformer_steps,
        "cnn": "frozen" if args.freeze_feature_encoder else "trained",
        "repo_id": training_args.hub_model_id or str(final_dir),
    })
    if training_args.push_to_hub:
        from .hub import push_folder

        push_folder(final_dir, training_args.hub_model_id, "data2vec-aqc CTC fine-tune", training_args.hub_private_repo)
    return metrics
