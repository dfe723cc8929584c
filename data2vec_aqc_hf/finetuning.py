"""CTC fine-tuning on small corpora with transformers' Trainer: text normalisation, vocabulary, data, collator,
metrics, transformer freezing, stock export with processor and model card."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCTC,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2Processor,
    set_seed,
)

from .audio import TARGET_SAMPLING_RATE, AudioError, feature_extractor, load_audio_example, with_file_name
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
    return Wav2Vec2Processor(feature_extractor=feature_extractor(), tokenizer=tokenizer)


def read_manifest(path: str | Path) -> list[dict]:
    """Rows `{"audio", "text", "speaker_id"}` of a CSV manifest (`file_name,text[,speaker_id]`) or an audiofolder
    directory with a `metadata.csv`."""
    path = Path(path)
    manifest = path / "metadata.csv" if path.is_dir() else path
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: no such manifest (expected file_name,text[,speaker_id])")
    with open(manifest, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM (Excel) is not part of a column name
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


def num_frames(samples: int, config=None) -> int:
    """CNN output frames for `samples` input samples (`config`'s conv stack; data2vec-audio's by default, the same
    320x down-sampling in every preset)."""
    from transformers import Data2VecAudioConfig

    config = config or Data2VecAudioConfig()
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - kernel) // stride + 1 if samples >= kernel else 0
    return samples


def ctc_min_frames(labels: list[int]) -> int:
    """The fewest frames CTC can align `labels` to: one per label plus a blank between repeated labels."""
    return len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))


class CTCDataset(torch.utils.data.Dataset):
    """Validated examples: each file is read once up front; unreadable, silent or too short files and empty
    transcripts are skipped with a warning naming the file; characters outside the vocabulary are reported and
    mapped to `<unk>`; a clip with fewer CNN frames than CTC needs for its transcript is skipped (its loss would be
    infinite). Audio is kept in memory (small corpora)."""

    def __init__(self, rows, processor: Wav2Vec2Processor, min_samples: int = 400, lowercase=False,
                 chars_to_remove=DEFAULT_CHARS_TO_REMOVE, frame_config=None):
        self.examples, self.skipped = [], []
        vocab = processor.tokenizer.get_vocab()
        progress = evaluation_progress(len(rows) if hasattr(rows, "__len__") else 0, "reading and checking audio")
        for row in rows:
            progress.update(1)
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
            frames, needed = num_frames(len(audio), frame_config), ctc_min_frames(labels)
            if frames < needed:  # CTC cannot align: its loss is infinite (zeroed by ctc_zero_infinity) or NaN
                self._skip(name, f"{len(audio) / TARGET_SAMPLING_RATE:.2f} s gives {frames} frames, too few for its "
                                 f"{len(labels)} labels (CTC needs {needed})")
                continue
            self.examples.append({"input_values": audio, "labels": labels, "text": text,
                                  "speaker_id": row.get("speaker_id", "unknown"), "name": name})
        progress.close()

    def _skip(self, name, reason):
        self.skipped.append((name, reason))
        logger.warning("skipping %s", with_file_name(name, reason))

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    @classmethod
    def from_examples(cls, examples: list[dict]) -> "CTCDataset":
        """A dataset of already validated examples (the dicts `__getitem__` returns), e.g. pseudo-labelled clips."""
        new = object.__new__(cls)
        new.examples, new.skipped = list(examples), []
        return new

    def subset(self, keep) -> "CTCDataset":
        """A dataset of the examples for which `keep(example)` is true, sharing the loaded audio."""
        return CTCDataset.from_examples([e for e in self.examples if keep(e)])

    def concat(self, other: "CTCDataset") -> "CTCDataset":
        """This dataset's examples followed by `other`'s (shared, not copied)."""
        return CTCDataset.from_examples(self.examples + other.examples)


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """`audio` played `factor` times faster (tempo and pitch both scale by `factor`, as Kaldi's and ESPnet's speed
    perturbation): band-limited resampling (soxr) from `16 kHz` to `16 kHz / factor`, read back at 16 kHz. The
    length becomes `round(len / factor)`; `factor=1` returns the input."""
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    if factor == 1.0:
        return audio
    import soxr

    return soxr.resample(audio, TARGET_SAMPLING_RATE * factor, TARGET_SAMPLING_RATE, quality="HQ").astype(
        np.float32, copy=False)


def check_noise_augmentation(p: float) -> None:
    """`--noise_augmentation` is a probability."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise_augmentation must be in [0, 1], got {p}")


def speed_range(spread: float) -> tuple[float, float] | None:
    """The factor range `(1 - spread, 1 + spread)` of a `--speed_perturbation` value; `None` for 0 (off)."""
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"speed_perturbation must be in [0, 1), got {spread}")
    return (1.0 - spread, 1.0 + spread) if spread else None


@dataclass
class CTCCollator:
    """Pads audio (float32, attention mask) and labels (-100 where padded).

    `speed_perturbation=(low, high)`: each clip is first played at a random speed factor drawn uniformly from that
    range (`speed_perturb`), from torch's global RNG (so `set_seed` makes it reproducible). A change of speed moves
    pitch and formants like a different vocal tract: the one augmentation that makes three training speakers look
    like many (measured on FSDD, docs/LEARNING_NOTES.md). `None` (the default): clips unchanged, as for evaluation.
    """

    processor: Wav2Vec2Processor
    speed_perturbation: tuple[float, float] | None = None
    noise_augmentation: float = 0.0

    def __post_init__(self):
        check_noise_augmentation(self.noise_augmentation)
        self.augmenter = None
        if self.noise_augmentation:
            from .augment import WaveformAugmenter
            from .configuration_data2vec_aqc import Data2VecAQCConfig

            self.augmenter = WaveformAugmenter(Data2VecAQCConfig())

    def __call__(self, features):
        audio = [np.asarray(f["input_values"], dtype=np.float32) for f in features]
        if self.speed_perturbation is not None:
            low, high = self.speed_perturbation
            factors = (low + (high - low) * torch.rand(len(audio))).tolist()
            audio = [speed_perturb(a, f) for a, f in zip(audio, factors)]
        batch = self.processor.feature_extractor(audio, sampling_rate=TARGET_SAMPLING_RATE, padding=True,
                                                 return_attention_mask=True, return_tensors="pt")
        if self.augmenter is not None:
            batch["input_values"] = self.augment(batch["input_values"].float(), batch["attention_mask"].bool())
        longest = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), longest), -100, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
        return {"input_values": batch["input_values"].float(), "attention_mask": batch["attention_mask"],
                "labels": labels}

    def augment(self, x: torch.Tensor, valid: torch.BoolTensor) -> torch.Tensor:
        """Each clip, with probability `noise_augmentation`, replaced by data2vec-aqc's student view of it (white
        noise, reverberation, background noise at the paper's probabilities and ranges, `WaveformAugmenter`),
        normalised again to zero mean and unit variance; the others unchanged. Draws from torch's global RNG."""
        from .augment import normalize_waveform

        pick = torch.rand(x.shape[0], 1) < self.noise_augmentation
        if not bool(pick.any()):
            return x
        return torch.where(pick, normalize_waveform(self.augmenter(x, valid), valid), x)


class FreezeTransformerCallback(TrainerCallback):
    """Keep the transformer (everything but the CNN, whose freezing is `freeze_feature_encoder`'s business, and
    `lm_head`) frozen for the first `steps` updates (fairseq `freeze_finetune_updates`)."""

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


def check_weight_ema_decay(decay: float) -> None:
    """`--weight_ema_decay`: 0 (off) or a decay in (0, 1)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"weight_ema_decay must be in [0, 1) (0: off), got {decay}")


class WeightEMACallback(TrainerCallback):
    """An exponential moving average of the model's weights over the fine-tuning updates (Polyak averaging):
    `ema = decay * ema + (1 - decay) * weights` after every optimizer step, starting from the weights of the first
    update. With `apply_at_end` the model holds the average when training ends (the raw last weights stay in
    `self.raw_state`), so the saved and evaluated model is the average. Evaluations during training see the raw
    weights, and Trainer checkpoints hold the raw weights only: a resumed run restarts the average there.

    Why: on a few hundred labelled clips the last weights of a run depend strongly on the last batches (the seed
    alone moves an unseen speaker's WER by up to 15 points on FSDD, docs/LEARNING_NOTES.md session 10); the
    average over the last ~1/(1 - decay) updates is a flatter point."""

    def __init__(self, model, decay: float, apply_at_end: bool = True):
        if decay == 0.0:
            raise ValueError("weight EMA decay 0 keeps no average: leave the callback out instead")
        check_weight_ema_decay(decay)
        self.model, self.decay, self.apply_at_end = model, decay, apply_at_end
        self.ema: dict[str, torch.Tensor] | None = None
        self.raw_state: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        if self.ema is None:
            self.ema = {n: p.float().clone() for n, p in params.items()}
            return
        for n, p in params.items():
            self.ema[n].lerp_(p.float(), 1.0 - self.decay)

    def averaged_state(self) -> dict[str, torch.Tensor]:
        """The averaged parameters (the buffers are the model's own), for `model.load_state_dict(..., strict=False)`."""
        if self.ema is None:
            raise RuntimeError("no update was made: there is no weight average")
        return {n: t.clone() for n, t in self.ema.items()}

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        if self.apply_at_end and self.ema is not None:
            self.raw_state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            for n, p in self.model.named_parameters():
                p.copy_(self.ema[n].to(p.dtype))


def decode_predictions(processor, logits: np.ndarray, lengths=None) -> list[str]:
    """Greedy CTC transcripts of `logits` `(batch, frames, vocab)`. `lengths`: each row's number of valid frames
    (`valid_frame_lengths`); the frames past it belong to the padding and are never read. They must not be:
    the model never learned anything about padded positions, and their arg-max is often a letter (measured: a
    model with training loss 0.02 got 7 of 24 of its own training clips wrong in padded batches, 1 of 24 with the
    padded frames dropped)."""
    ids = np.argmax(logits, axis=-1)
    if lengths is None:
        return processor.batch_decode(ids)
    return [processor.decode(row[: int(n)]) for row, n in zip(ids, lengths)]


def valid_frame_lengths(model, attention_mask: torch.Tensor | None, frames: int, batch: int) -> torch.Tensor:
    """The number of CNN output frames of each row that come from real audio (all `frames` without a mask)."""
    if attention_mask is None:
        return torch.full((batch,), frames, dtype=torch.long)
    lengths = model._get_feat_extract_output_lengths(attention_mask.sum(-1))
    return lengths.clamp(max=frames).long().cpu()


def blank_padded_frames(logits: torch.Tensor, lengths: torch.Tensor, blank_id: int) -> torch.Tensor:
    """`logits` with every frame past its row's `lengths` replaced by a certain blank (0 for the blank, -1e4 for the
    rest), so that any greedy or beam decoding of the padded batch reads the padding as silence."""
    frames = torch.arange(logits.shape[1], device=logits.device)
    pad = frames[None, :] >= lengths.to(logits.device)[:, None]
    filler = torch.full_like(logits[0, 0], -1e4)
    filler[blank_id] = 0.0
    return torch.where(pad[..., None], filler, logits)


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


def load_ctc_model(checkpoint: str | None, processor, mask_time_prob=0.5, mask_time_length=10,
                   mask_feature_prob=0.25, mask_feature_length=64, layerdrop=0.05, trust_remote_code=False,
                   freeze_feature_encoder: bool | str = "auto", mask_time_min_masks: int = 0,
                   model_preset: str | None = None, **config_overrides):
    """A CTC model with the fine-tuning recipe of spec 7 and a new `lm_head` sized to the processor's vocabulary:
    `AutoModelForCTC.from_pretrained(checkpoint)`, or a randomly initialised `Data2VecAQCForCTC` from
    `model_preset` when `checkpoint` is None (the from-scratch baseline).

    `freeze_feature_encoder="auto"` freezes the CNN only when its weights were loaded pretrained: a CNN that starts
    random must be trained (frozen, it stays a random projection). `mask_time_min_masks=0` (transformers'
    default is 2): with 10-frame spans, two forced spans hide 50-80 % of a 0.5 s clip whatever `mask_time_prob` says.
    """
    overrides = dict(vocab_size=len(processor.tokenizer), pad_token_id=processor.tokenizer.pad_token_id,
                     ctc_zero_infinity=True, ctc_loss_reduction="mean", mask_time_prob=mask_time_prob,
                     mask_time_length=mask_time_length, mask_time_min_masks=mask_time_min_masks,
                     mask_feature_prob=mask_feature_prob, mask_feature_length=mask_feature_length,
                     layerdrop=layerdrop, **config_overrides)
    if checkpoint is None:
        if model_preset is None:
            raise ValueError("give a checkpoint (model_name_or_path) or a model_preset to start from scratch")
        from .configuration_data2vec_aqc import Data2VecAQCConfig
        from .modeling_data2vec_aqc import Data2VecAQCForCTC

        model, cnn_pretrained = Data2VecAQCForCTC(Data2VecAQCConfig.from_preset(model_preset, **overrides)), False
    else:
        model, info = AutoModelForCTC.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                                      output_loading_info=True, **overrides)
        cnn_pretrained = not any("feature_extractor" in key for key in info["missing_keys"])
    freeze = parse_freeze(freeze_feature_encoder)
    if freeze is True or (freeze == "auto" and cnn_pretrained):
        model.freeze_feature_encoder()
    return model


def parse_freeze(value: bool | str) -> bool | str:
    """`True`/`False`/`"auto"` from a bool or a flag string."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("auto", "true", "false", "1", "0", "yes", "no"):
        return "auto" if lowered == "auto" else lowered in ("true", "1", "yes")
    raise ValueError(f"freeze_feature_encoder must be true, false or auto, got {value!r}")


def masked_time_fraction(config, frame_counts: list[int], seed: int = 0) -> float:
    """The fraction of frames that time masking really hides on utterances of these frame counts (spans overlap,
    short clips get `mask_time_min_masks` spans whatever the probability): what to check against
    `mask_time_prob` before training on short clips."""
    from .masking import compute_span_mask

    counts = torch.as_tensor([c for c in frame_counts if c >= config.mask_time_length], dtype=torch.long)
    if config.mask_time_prob <= 0 or len(counts) == 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    mask = compute_span_mask((len(counts), int(counts.max())), config.mask_time_prob, config.mask_time_length,
                             counts, config.mask_time_min_masks, g)
    return float(mask.sum() / counts.sum())


PROGRESS_MIN_CLIPS = 64  # fewer clips than this: no progress bar


def evaluation_progress(total: int, desc: str):
    """The progress bar of an evaluation or transcription loop over `total` clips (stderr, with the time left);
    none for a handful of clips."""
    return tqdm(total=total, desc=desc, unit="clip", disable=total < PROGRESS_MIN_CLIPS, mininterval=2.0)


def clip_log_probs(model, processor, arrays: list[np.ndarray], batch_size: int = 8,
                   desc: str = "transcribing (greedy)") -> list[torch.Tensor]:
    """Each 16 kHz array's CTC log-probabilities over its own frames (`(frames, vocab)`, float32, CPU), in input
    order. Batches are formed from length-sorted arrays: data2vec-audio's stacked positional convolutions carry
    padding into the valid frames (each layer after the first reads the previous layer's non-zero outputs at
    padded positions), so less padding means outputs closer to unpadded, one-at-a-time inference. The padded
    frames are dropped: the model never learned anything there (their arg-max is often a letter)."""
    model.eval()
    order = sorted(range(len(arrays)), key=lambda i: len(arrays[i]))
    out: list = [None] * len(arrays)
    with evaluation_progress(len(arrays), desc) as progress:
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            batch = processor.feature_extractor([arrays[i] for i in ids], sampling_rate=TARGET_SAMPLING_RATE,
                                                padding=True, return_attention_mask=True, return_tensors="pt")
            with torch.no_grad():
                logits = model(batch["input_values"].float().to(model.device),
                               attention_mask=batch["attention_mask"].to(model.device)).logits.float().cpu()
            lengths = valid_frame_lengths(model, batch["attention_mask"], logits.shape[1], logits.shape[0])
            for k, i in enumerate(ids):
                out[i] = logits[k, : int(lengths[k])].log_softmax(-1)
            progress.update(len(ids))
    return out


def greedy_confidence(log_probs: torch.Tensor) -> float:
    """The mean over frames of the log-probability of each frame's arg-max token (`log_probs`: `(frames, vocab)`),
    i.e. the log-probability of the greedy path divided by its length; 0 = certain."""
    return float(log_probs.max(-1).values.mean()) if len(log_probs) else -math.inf


def transcribe_arrays(model, processor, arrays: list[np.ndarray], batch_size: int = 8,
                      desc: str = "transcribing (greedy)", with_confidence: bool = False) -> list:
    """Greedy CTC transcripts of 16 kHz arrays, in their order (`clip_log_probs`: length-sorted batches, each clip's
    own frames only). `with_confidence=True` returns `(text, greedy_confidence)` pairs instead."""
    texts = []
    for lp in clip_log_probs(model, processor, arrays, batch_size, desc):
        text = processor.decode(lp.argmax(-1).numpy())
        texts.append((text, greedy_confidence(lp)) if with_confidence else text)
    return texts


def babble_noise(length: int, bank: list[np.ndarray], talkers: int = 4, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Babble: the sum of `talkers` random segments of `length` samples from different clips of `bank` (16 kHz
    speech of other speakers), each scaled to unit power first (clips shorter than `length` repeat)."""
    if len(bank) < talkers:
        raise ValueError(f"babble needs at least {talkers} clips in the bank, got {len(bank)}")
    picks = torch.randperm(len(bank), generator=generator)[:talkers].tolist()
    total = torch.zeros(length)
    for k in picks:
        clip = torch.from_numpy(np.asarray(bank[k], dtype=np.float32))
        if len(clip) < length:
            clip = clip.repeat(length // len(clip) + 1)
        start = int(torch.randint(0, len(clip) - length + 1, (1,), generator=generator))
        segment = clip[start : start + length]
        total += segment / segment.square().mean().clamp(min=1e-10).sqrt()
    return total


def add_noise(arrays: list[np.ndarray], kind: str, snr_db: float, seed: int = 0,
              babble_bank: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Each array mixed with `kind` noise (`"white"` Gaussian or `"babble"` from `babble_bank`) at the true SNR
    `snr_db` over the whole clip; seeded, so every model is tested on the same noisy audio."""
    from .augment import mix_at_snr

    if kind not in ("white", "babble"):
        raise ValueError(f"noise kind must be 'white' or 'babble', got {kind!r}")
    if kind == "babble" and not babble_bank:
        raise ValueError("babble noise needs a babble_bank of speech clips")
    g = torch.Generator().manual_seed(seed)
    noisy = []
    for a in arrays:
        x = torch.from_numpy(np.asarray(a, dtype=np.float32))[None]
        noise = torch.randn(x.shape, generator=g) if kind == "white" else babble_noise(x.shape[1], babble_bank,
                                                                                        generator=g)[None]
        noisy.append(mix_at_snr(x, noise, torch.ones_like(x), torch.tensor([float(snr_db)]))[0].numpy())
    return noisy


def evaluate_rows(model, processor, dataset: CTCDataset, snr_db: float | None = None, seed: int = 0,
                  transcribe=None, noise: str = "white", babble_bank: list[np.ndarray] | None = None) -> dict:
    """WER/CER overall and per speaker; with `snr_db`, `noise` (white, or babble from `babble_bank`) is added at
    that SNR first. `transcribe` maps a list of 16 kHz arrays to texts (default: greedy CTC; e.g. an
    `lm.LMTranscriber` for KenLM decoding)."""
    arrays = [e["input_values"] for e in dataset.examples]
    if snr_db is not None:
        arrays = add_noise(arrays, noise, snr_db, seed, babble_bank)
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
           "split_by_speaker", "CTCDataset", "CTCCollator", "CTCTrainer", "speed_perturb", "speed_range", "check_noise_augmentation", "valid_frame_lengths", "blank_padded_frames", "decode_predictions", "FreezeTransformerCallback", "WeightEMACallback", "check_weight_ema_decay", "make_compute_metrics",
           "load_ctc_model", "parse_freeze", "masked_time_fraction", "train_ctc", "transcribe_arrays", "clip_log_probs", "greedy_confidence", "babble_noise", "add_noise", "evaluate_rows", "FinetuneArguments", "run_finetuning"]


@dataclass
class FinetuneArguments:
    """Data and model options of `training/finetune.py` (Trainer options come from `TrainingArguments`)."""

    # HfArgumentParser lists these in their own group, before transformers' ~150 TrainingArguments
    _argument_group_name = "data2vec-aqc fine-tuning options (the Trainer's own options follow)"

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained checkpoint (ours, local or Hub); leave out and give --model_preset to train from scratch."})
    model_preset: str | None = field(default=None, metadata={
        "help": "Start from a randomly initialised model of this preset ('small', 'tiny', 'base') instead."})
    train_manifest: str | None = field(default=None, metadata={"help": "CSV file_name,text[,speaker_id] or dir."})
    eval_manifest: str | None = field(default=None, metadata={"help": "Optional; else split off by speaker."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id instead of a manifest."})
    dataset_config_name: str | None = field(default=None, metadata={"help": 'Hub dataset config (with --dataset_name).'})
    train_split_name: str = field(default="train", metadata={"help": 'Hub split to train on.'})
    eval_split_name: str | None = field(default=None, metadata={"help": 'Hub split to evaluate on (default: hold out speakers of the training split).'})
    audio_column_name: str = field(default="audio", metadata={"help": 'Audio column of the dataset.'})
    text_column_name: str = field(default="text", metadata={"help": 'Transcript column of the dataset.'})
    speaker_column_name: str = field(default="speaker_id", metadata={"help": 'Speaker column (held-out speakers are never trained on).'})
    eval_speakers: str | None = field(default=None, metadata={"help": "Comma-separated speakers held out."})
    eval_speaker_fraction: float = field(default=0.2, metadata={"help": 'Share of speakers held out for evaluation when --eval_speakers is not given.'})
    lowercase: bool = field(default=False, metadata={"help": 'Lower-case the transcripts (default: upper case, as LibriSpeech).'})
    chars_to_ignore_regex: str = field(default=DEFAULT_CHARS_TO_REMOVE, metadata={"help": 'Characters removed from transcripts before building the vocabulary.'})
    freeze_transformer_steps: int = field(default=0, metadata={"help": "Train only the CNN (if not frozen) and lm_head for this many first updates (fairseq's freeze_finetune_updates: 10000 of 20000 for 10 h, 0 for 100 h)."})
    freeze_feature_encoder: str = field(default="auto", metadata={
        "help": "Keep the CNN feature encoder frozen: true (the paper's recipe for a pretrained CNN), false, or auto "
                "(default: frozen when its weights were loaded from the checkpoint, trained when it starts random)."})
    mask_time_prob: float = field(default=0.5, metadata={"help": "SpecAugment time masking: share of frames starting a span (the authors' fairseq fine-tuning configs, 10 h and 100 h: 0.65; use ~0.05 on short clips)."})
    mask_time_length: int = field(default=10, metadata={"help": 'Frames per time-mask span (paper: 10).'})
    mask_time_min_masks: int = field(default=0, metadata={
        "help": "Spans every utterance gets whatever mask_time_prob says (transformers' default 2 hides 50-80 %% of "
                "a short clip); the real masked fraction on the training set is logged."})
    mask_feature_prob: float = field(default=0.25, metadata={"help": 'Channel masking probability (fairseq configs, 10 h and 100 h: 0.5).'})
    mask_feature_length: int = field(default=64, metadata={"help": 'Channels per channel-mask span (paper: 64).'})
    layerdrop: float = field(default=0.05, metadata={"help": 'Probability of skipping a transformer layer in training (fairseq configs: 0.05 for 10 h, 0.1 for 100 h).'})
    speed_perturbation: float = field(default=0.0, metadata={
        "help": "Play each training clip at a random speed in [1 - s, 1 + s] (tempo and pitch; evaluation audio is "
                "never changed). 0 (default, the paper's recipe) is off; ~0.15 helps a corpus of few speakers."})
    noise_augmentation: float = field(default=0.0, metadata={
        "help": "Probability that a training clip is replaced by data2vec-aqc's student view of it (white noise, "
                "reverberation, background noise at the paper's pretraining probabilities and ranges; evaluation audio "
                "is never changed). 0 (default, the paper's recipe) is off. On spoken digits 0.5 left clean WER on unseen "
                "speakers level, cut it in white noise by 15-19 points, and can delay the escape from CTC's "
                "all-blank plateau (docs/LEARNING_NOTES.md, session 14)."})
    weight_ema_decay: float = field(default=0.0, metadata={
        "help": "Keep an exponential moving average of the weights over the updates and save / evaluate it instead "
                "of the last weights (0: off; e.g. 0.99 averages over the last ~100 updates; keep 1 / (1 - decay) well "
                "below --max_steps). The initial fine-tuning only: self-training rounds keep their last weights. Not "
                "with --load_best_model_at_end."})
    unlabelled_data: str | None = field(default=None, metadata={
        "help": "Audio without transcripts for self-training after fine-tuning (a directory, a .csv with file_name or "
                "a fairseq .tsv), e.g. recordings of the speakers the model is for; used with --self_training_rounds."})
    self_training_rounds: int = field(default=0, metadata={
        "help": "Rounds of self-training: transcribe --unlabelled_data with the model, then continue training on the "
                "labelled clips plus the most confident pseudo-labelled ones (0: off)."})
    self_training_steps: int = field(default=400, metadata={"help": "Updates per self-training round (a fresh optimizer and linear schedule, 10 %% warm-up)."})
    self_training_learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of each self-training round."})
    self_training_keep_fraction: float = field(default=0.5, metadata={"help": "Share of the unlabelled clips kept as pseudo-labelled, most confident first."})
    self_training_labels: str = field(default="greedy", metadata={
        "help": "Pseudo-labels: 'greedy' CTC transcripts; 'lexicon': greedy ones whose words all occur in the training "
                "transcripts; 'closed_set': for each clip the most likely of the training set's distinct transcripts "
                "(closed sets of phrases: digits, commands). On spoken digits (dev split, docs/LEARNING_NOTES.md, "
                "session 12) lexicon did best: 2 rounds took one model from 69.0 to 58.0 %% WER, closed_set to 67.0."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the checkpoint's own modeling code (only for checkpoints you trust)."})
    hub_dataset_id_for_card: str | None = field(default=None, metadata={"help": "Hub dataset id named in the model card's metadata (for a local manifest)."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_preset is None):
            raise ValueError("give exactly one of --model_name_or_path (pretrained) or --model_preset (from scratch)")
        self.freeze_feature_encoder = parse_freeze(self.freeze_feature_encoder)
        speed_range(self.speed_perturbation)  # validates
        check_noise_augmentation(self.noise_augmentation)
        check_weight_ema_decay(self.weight_ema_decay)
        if self.self_training_rounds < 0 or self.self_training_steps < 1:
            raise ValueError("self_training_rounds must be >= 0 and self_training_steps >= 1")
        if self.self_training_rounds and not self.unlabelled_data:
            raise ValueError("--self_training_rounds needs --unlabelled_data (audio of the kind the model is for)")
        if self.unlabelled_data and not self.self_training_rounds:
            raise ValueError("--unlabelled_data is only used for self-training: give --self_training_rounds too")
        check_pseudo_label_mode(self.self_training_labels)
        if not 0.0 < self.self_training_keep_fraction <= 1.0:
            raise ValueError(f"self_training_keep_fraction must be in (0, 1], got {self.self_training_keep_fraction}")


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


class CTCTrainer(Trainer):
    """`Trainer` whose evaluation batches come from `eval_data_collator` (clean audio) while training batches come from
    `data_collator` (which may augment): evaluation must never see speed-perturbed clips."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def _with_eval_collator(self, build, dataset):
        if self.eval_data_collator is None:
            return build(dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return build(dataset)
        finally:
            self.data_collator = train_collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As `Trainer`'s, with the logits of padded frames turned into blanks (`blank_padded_frames`): the metrics
        see each clip's own frames only, as when it is transcribed alone."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if logits is not None and not isinstance(logits, tuple) and logits.dim() == 3:
            lengths = valid_frame_lengths(self.accelerator.unwrap_model(model), inputs.get("attention_mask"),
                                          logits.shape[1], logits.shape[0])
            logits = blank_padded_frames(logits, lengths, model.config.pad_token_id)
        return loss, logits, labels

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)


def train_ctc(model, processor, train_set: CTCDataset, eval_set: CTCDataset | None,
              training_args: TrainingArguments, freeze_transformer_steps: int = 0, callbacks=(), print_logs=True,
              speed_perturbation: tuple[float, float] | None = None, weight_ema_decay: float = 0.0,
              noise_augmentation: float = 0.0):
    """Fine-tune `model` with transformers' `Trainer` (CTC, greedy WER/CER on `eval_set` at each evaluation); logs
    the fraction of frames time masking really hides on the training clips. Returns the trainer (its model is
    the best checkpoint when `load_best_model_at_end`, the weight average when `weight_ema_decay` > 0:
    `WeightEMACallback`)."""
    if weight_ema_decay and training_args.load_best_model_at_end:
        raise ValueError("weight_ema_decay and load_best_model_at_end both choose the final weights: use one")
    if weight_ema_decay:
        callbacks = (*callbacks, WeightEMACallback(model, weight_ema_decay))
    frames = [int(model._get_feat_extract_output_lengths(len(e["input_values"]))) for e in train_set.examples]
    hidden = masked_time_fraction(model.config, frames, seed=training_args.seed)
    logger.warning("time masking hides %.1f %% of the training frames (mask_time_prob=%s, mask_time_length=%s, "
                   "mask_time_min_masks=%s; median clip %d frames)", 100 * hidden, model.config.mask_time_prob,
                   model.config.mask_time_length, model.config.mask_time_min_masks, int(np.median(frames)))
    trainer = CTCTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                      data_collator=CTCCollator(processor, speed_perturbation, noise_augmentation),
                      eval_data_collator=CTCCollator(processor), compute_metrics=make_compute_metrics(processor),
                      processing_class=processor.feature_extractor,
                      callbacks=[FreezeTransformerCallback(model, freeze_transformer_steps), NonFiniteWeightsCallback(model),
                                 *callbacks])
    if not print_logs:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    trainer.train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    return trainer


@dataclass
class TrainerOptions(TrainingArguments):
    """`TrainingArguments`, listed in `--help` as their own group after ours; one default differs: `report_to` is
    `tensorboard` (logs under `output_dir/runs`, as pretraining writes them), not transformers' `none`."""

    _argument_group_name = "Trainer options (transformers.TrainingArguments)"
    report_to: None | str | list[str] = field(default="tensorboard", metadata={
        "help": "Integrations to log to (default here: tensorboard, in output_dir/runs; 'none' for none)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "Continue an interrupted run: a checkpoint-N folder, or 'latest' for the newest checkpoint-N in "
                "output_dir (weights, optimizer, schedule and RNG states, as the Trainer saved them)."})


def card_base_model(model_name_or_path: str | None, preset: str | None) -> dict:
    """Card values for where the weights came from: `base_model` in the card's metadata only for a Hub id (a local
    path means nothing to a reader of the Hub page)."""
    if model_name_or_path is None:
        return {"base_model_line": "", "base_model_text": f"a random initialisation (preset `{preset}`, no pretraining)"}
    if Path(model_name_or_path).exists():
        return {"base_model_line": "",
                "base_model_text": f"a local data2vec-aqc checkpoint (`{Path(model_name_or_path).name}`, not on the Hub)"}
    return {"base_model_line": f"base_model: {model_name_or_path}\n",
            "base_model_text": f"the pretrained encoder [`{model_name_or_path}`](https://huggingface.co/{model_name_or_path})"}


def weights_step(trainer) -> str:
    """Which update the saved weights are from: the best checkpoint's when the Trainer reloaded it, else the last."""
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best:
        return f"{best.rsplit('-', 1)[-1]} (best checkpoint by {trainer.args.metric_for_best_model})"
    averages = [c for c in trainer.callback_handler.callbacks if isinstance(c, WeightEMACallback) and c.raw_state]
    if averages:
        return f"an exponential moving average (decay {averages[0].decay}) of updates 1-{trainer.state.global_step}"
    return f"{trainer.state.global_step} (the last update)"


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or `latest` (the newest `checkpoint-N` of `output_dir`)."""
    value = training_args.resume_from_checkpoint
    if not value:
        return None
    if str(value).lower() in ("latest", "last", "true"):
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        if found is None:
            raise FileNotFoundError(f"{training_args.output_dir}: no checkpoint-N folder to resume from (--resume_from_checkpoint latest)")
        return found
    if not Path(value).is_dir():
        raise FileNotFoundError(f"{value}: no such checkpoint folder (--resume_from_checkpoint)")
    return str(value)


class NonFiniteWeightsCallback(TrainerCallback):
    """Stop fine-tuning with an error the moment an update leaves a non-finite weight: before the Trainer can save
    it or rotate good checkpoints out (`save_total_limit`). The checkpoints already written stay as they are."""

    def __init__(self, model):
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad]).all()
        if not bool(finite):
            raise FloatingPointError(
                f"fine-tuning step {state.global_step}: the update made weights NaN/inf (learning rate "
                f"{args.learning_rate:g} too high, or bad data); stopped before saving it. The checkpoints in "
                f"{args.output_dir} are untouched; resume from one with a lower --learning_rate")


PSEUDO_LABEL_MODES = ("greedy", "lexicon", "closed_set")


def check_pseudo_label_mode(mode: str) -> str:
    """`mode` if it is one of `PSEUDO_LABEL_MODES` (see `self_training.label_constraints`), else a ValueError."""
    if mode not in PSEUDO_LABEL_MODES:
        raise ValueError(f"self_training_labels must be greedy, lexicon or closed_set, got {mode!r}")
    return mode


def read_unlabelled(path: str | Path, min_samples: int = 400) -> tuple[list[np.ndarray], list[str]]:
    """16 kHz arrays and file names of the audio of a directory, `.csv` (`file_name`) or fairseq `.tsv`; unreadable,
    silent or too short files are skipped with a warning naming them."""
    from .data import local_items

    arrays, names = [], []
    for item in local_items(path):
        try:
            arrays.append(load_audio_example(item, "audio", min_samples=min_samples))
            names.append(item["audio"])
        except AudioError as err:
            logger.warning("skipping %s", with_file_name(item["audio"], str(err)))
    if not arrays:
        raise ValueError(f"{path}: no usable unlabelled audio for self-training")
    return arrays, names


def self_training_summary(history: list[dict], args: FinetuneArguments) -> str:
    """The model card's self-training entry: none, or each round's pseudo-labelled clips and updates."""
    if not history:
        return "none"
    rounds = "; ".join(f"round {r['round']}: {r['selected']} of {r['pool']} clips" for r in history)
    return (f"{len(history)} round(s) of {args.self_training_steps} updates on the labelled clips plus pseudo-labelled "
            f"clips of `{args.unlabelled_data}` ({args.self_training_labels} labels; {rounds})")


def _self_train(args, training_args, model, processor, train_set, eval_set):
    """`self_training.self_train` with the CLI's options; each round's Trainer writes under output_dir/self-training."""
    from .self_training import label_constraints, round_arguments, self_train

    arrays, names = read_unlabelled(args.unlabelled_data)
    scored = {str(Path(e["name"]).resolve()) for e in eval_set.examples if isinstance(e["name"], str)}
    overlap = sum(str(Path(n).resolve()) in scored for n in names)
    if overlap:
        logger.warning("%d of the %d unlabelled files are also evaluation files: the evaluation then scores clips "
                       "the model was self-trained on (without their transcripts)", overlap, len(names))
    lexicon, candidates = label_constraints(args.self_training_labels, [e["text"] for e in train_set.examples])
    round_args = round_arguments(training_args, args.self_training_steps, args.self_training_learning_rate,
                                 Path(training_args.output_dir) / "self-training")
    return self_train(model, processor, train_set, arrays, round_args, args.self_training_rounds,
                      args.self_training_keep_fraction, lexicon, names, speed_range(args.speed_perturbation),
                      eval_set=eval_set, candidates=candidates, noise_augmentation=args.noise_augmentation)


def run_finetuning(args: FinetuneArguments, training_args: TrainingArguments) -> dict:
    """Fine-tune, evaluate, save a stock data2vec-audio checkpoint + processor + card, maybe push. Returns metrics."""
    from .cards import datasets_line, write_card
    from .export import save_as_data2vec_audio

    output_dir = Path(training_args.output_dir)
    train_rows, eval_rows = _rows(args)
    texts = [normalize_text(r["text"] or "", args.lowercase, args.chars_to_ignore_regex) for r in train_rows]
    processor = make_processor(build_vocab([t for t in texts if t]), output_dir)
    train_set = CTCDataset(train_rows, processor, lowercase=args.lowercase, chars_to_remove=args.chars_to_ignore_regex)
    eval_set = CTCDataset(eval_rows, processor, lowercase=args.lowercase, chars_to_remove=args.chars_to_ignore_regex)
    if len(train_set) == 0:
        raise ValueError(f"no usable training examples ({len(train_set.skipped)} skipped)")
    if len(eval_set) == 0:  # WER over nothing is NaN, and would go into the metrics and the model card
        raise ValueError(f"no usable evaluation examples ({len(eval_rows)} rows, {len(eval_set.skipped)} skipped): "
                         f"check --eval_speakers / --eval_split_name")
    set_seed(training_args.seed)  # before the new lm_head is initialised, as transformers' example scripts do
    model = load_ctc_model(args.model_name_or_path, processor, args.mask_time_prob, args.mask_time_length,
                           args.mask_feature_prob, args.mask_feature_length, args.layerdrop, args.trust_remote_code,
                           args.freeze_feature_encoder, args.mask_time_min_masks, args.model_preset)
    cnn_trained = any(p.requires_grad for p in model.data2vec_audio.feature_extractor.parameters())
    trainer = train_ctc(model, processor, train_set, eval_set, training_args, args.freeze_transformer_steps,
                        speed_perturbation=speed_range(args.speed_perturbation),
                        weight_ema_decay=args.weight_ema_decay, noise_augmentation=args.noise_augmentation)
    model = trainer.model
    self_training = []
    if args.self_training_rounds:
        trainer, self_training = _self_train(args, training_args, model, processor, train_set, eval_set)
        model = trainer.model
    metrics = evaluate_rows(model, processor, eval_set)
    metrics["train_loss"] = trainer.train_result.training_loss
    if self_training:
        metrics["self_training"] = self_training
    metrics["skipped_files"] = len(train_set.skipped) + len(eval_set.skipped)

    final_dir = output_dir / "final"
    save_as_data2vec_audio(model, final_dir)
    processor.save_pretrained(final_dir)
    (final_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    from .plots import plot_curves

    plot_curves(trainer.state.log_history, [("CTC loss", ["loss", "eval_loss"]), ("error rate", ["eval_wer", "eval_cer"])],
                final_dir / "training_curves.png", f"CTC fine-tuning of {args.model_name_or_path or args.model_preset}")
    hours_train = sum(len(e["input_values"]) for e in train_set.examples) / TARGET_SAMPLING_RATE / 3600
    write_card(final_dir, "finetuned.md", {
        "model_name": training_args.hub_model_id or final_dir.parent.name,
        **card_base_model(args.model_name_or_path, args.model_preset),
        "weights_step": weights_step(trainer),
        "datasets_line": datasets_line(args.dataset_name or args.hub_dataset_id_for_card),
        "dataset_id": args.dataset_name or args.hub_dataset_id_for_card or "custom",  # model-index needs a type
        "dataset_description": args.dataset_name or args.train_manifest,
        "train_hours": f"{hours_train:.3f}",
        "num_train": len(train_set), "num_eval": len(eval_set),
        "eval_speakers": ", ".join(sorted({e["speaker_id"] for e in eval_set.examples})),
        "wer": f"{100 * metrics['wer']:.2f}", "cer": f"{100 * metrics['cer']:.2f}",
        "wer_fraction": f"{metrics['wer']:.4f}", "cer_fraction": f"{metrics['cer']:.4f}",
        "learning_rate": training_args.learning_rate, "max_steps": trainer.state.global_step,
        "batch_size": training_args.per_device_train_batch_size,
        "freeze_steps": args.freeze_transformer_steps,
        "cnn": "trained" if cnn_trained else "frozen",
        "self_training": self_training_summary(self_training, args),
        "repo_id": training_args.hub_model_id or str(final_dir),
    })
    if training_args.push_to_hub:
        from .hub import push_folder

        push_folder(final_dir, training_args.hub_model_id, "data2vec-aqc CTC fine-tune", training_args.hub_private_repo)
    return metrics
