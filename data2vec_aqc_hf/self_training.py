"""Self-training of a CTC model on unlabelled audio (pseudo-labelling, "noisy student" style).

A fine-tuned model transcribes unlabelled clips (for example recordings of the new speakers it will be used on);
its most confident transcripts become training labels, and fine-tuning continues on the labelled set plus those
clips, with the training augmentation (speed perturbation, masking) as the "noise". One round:

    labels = pseudo_label(model, processor, arrays, keep_fraction=0.5, lexicon=training_words)
    extra = pseudo_labelled_dataset(processor, arrays, labels)
    trainer = train_ctc(model, processor, labelled.concat(extra), eval_set, training_args, ...)

`self_train` runs that loop for a number of rounds. Nothing here reads a reference transcript of the unlabelled
clips: `PseudoLabels.accuracy` is for reporting only, when the caller happens to have references.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import TARGET_SAMPLING_RATE
from .finetuning import (CTCDataset, check_pseudo_label_mode, clip_log_probs, ctc_min_frames, greedy_confidence,
                         num_frames, train_ctc)

logger = logging.getLogger(__name__)


@dataclass
class PseudoLabels:
    """Greedy transcripts of a pool of clips, their confidences, and which of them were selected for training."""

    texts: list[str]
    confidences: list[float]
    selected: list[int]
    rejected_by_lexicon: int = 0
    names: list[str] = field(default_factory=list)

    def accuracy(self, references: list[str]) -> dict:
        """Share of exactly right transcripts among the selected clips and over the whole pool (reporting only)."""
        right = [t == r for t, r in zip(self.texts, references)]
        chosen = [right[i] for i in self.selected]
        return {"selected": len(self.selected), "pool": len(self.texts),
                "selected_accuracy": sum(chosen) / max(1, len(chosen)), "pool_accuracy": sum(right) / max(1, len(right))}


def select_confident(texts: list[str], confidences: list[float], keep_fraction: float,
                     lexicon: set[str] | None = None) -> tuple[list[int], int]:
    """Indices (ascending) of the `round(keep_fraction * len(texts))` most confident non-empty transcripts whose
    words are all in `lexicon` (any words when `lexicon` is None), and how many the lexicon rejected."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if len(texts) != len(confidences):
        raise ValueError(f"{len(texts)} transcripts but {len(confidences)} confidences")
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    in_lexicon = [i for i in nonempty if lexicon is None or all(w in lexicon for w in texts[i].split())]
    in_lexicon.sort(key=lambda i: (-confidences[i], i))
    return sorted(in_lexicon[: round(keep_fraction * len(texts))]), len(nonempty) - len(in_lexicon)


def closed_set_labels(log_probs: list[torch.Tensor], processor, candidates: list[str]) -> tuple[list[str], list[float]]:
    """For each clip's CTC log-probabilities (`finetuning.clip_log_probs`), the candidate transcript with the
    highest CTC likelihood and, as its confidence, its log posterior among the candidates from their per-frame
    log-likelihoods (the softmax of log-likelihood / frames; 0 = certain). For closed sets of phrases (digits,
    commands): every clip gets a well-formed label, chosen by all its frames rather than the arg-max of each.
    (The softmax of the clip's total log-likelihoods saturates: candidates differ by tens of nats, so nearly every
    clip had posterior 1.0 and the confident selection fell back to file order; measured in session 12.)"""
    if not candidates:
        raise ValueError("closed-set labelling needs at least one candidate transcript")
    targets = [processor.tokenizer(c).input_ids for c in candidates]
    flat = torch.tensor([t for ids in targets for t in ids], dtype=torch.long)
    target_lengths = torch.tensor([len(ids) for ids in targets], dtype=torch.long)
    blank = processor.tokenizer.pad_token_id
    texts, confidences = [], []
    for lp in log_probs:
        frames = lp.shape[0]
        nll = torch.nn.functional.ctc_loss(lp[:, None].expand(frames, len(targets), lp.shape[-1]), flat,
                                           torch.full((len(targets),), frames, dtype=torch.long), target_lengths,
                                           blank=blank, reduction="none", zero_infinity=False)
        if torch.isinf(nll).all():  # the clip is too short for every candidate: no label
            texts.append("")
            confidences.append(-math.inf)
            continue
        log_posterior = (-nll / frames).log_softmax(0)  # a transcript too long for the clip: likelihood 0 (nll inf)
        best = int(log_posterior.argmax())
        texts.append(candidates[best])
        confidences.append(float(log_posterior[best]))
    return texts, confidences


def pseudo_label(model, processor, arrays: list[np.ndarray], keep_fraction: float = 0.5,
                 lexicon: set[str] | None = None, names: list[str] | None = None, batch_size: int = 8,
                 candidates: list[str] | None = None) -> PseudoLabels:
    """Transcripts of `arrays` (16 kHz) with their confidences, and the selection `select_confident` makes.
    Greedy CTC transcripts (`finetuning.greedy_confidence`), or with `candidates` the most likely of those
    transcripts for each clip (`closed_set_labels`)."""
    log_probs = clip_log_probs(model, processor, arrays, batch_size, desc="pseudo-labelling")
    if candidates:
        texts, confidences = closed_set_labels(log_probs, processor, candidates)
    else:
        texts = [processor.decode(lp.argmax(-1).numpy()) for lp in log_probs]
        confidences = [greedy_confidence(lp) for lp in log_probs]
    selected, rejected = select_confident(texts, confidences, keep_fraction, lexicon)
    return PseudoLabels(texts, confidences, selected, rejected, list(names or []))


def pseudo_labelled_dataset(processor, arrays: list[np.ndarray], labels: PseudoLabels,
                            speaker_id: str = "pseudo-labelled", frame_config=None) -> CTCDataset:
    """A `CTCDataset` of the selected clips with their pseudo-labels as transcripts (clips too short for CTC to
    align their transcript are left out, as `CTCDataset` does for real labels)."""
    examples = []
    for i in labels.selected:
        ids = processor.tokenizer(labels.texts[i]).input_ids
        if num_frames(len(arrays[i]), frame_config) < ctc_min_frames(ids):
            continue
        name = labels.names[i] if labels.names else f"unlabelled clip {i}"
        examples.append({"input_values": np.asarray(arrays[i], dtype=np.float32), "labels": ids,
                         "text": labels.texts[i], "speaker_id": speaker_id, "name": name})
    return CTCDataset.from_examples(examples)


def label_constraints(labels: str, texts: list[str]) -> tuple[set[str] | None, list[str] | None]:
    """The `lexicon` and `candidates` of `pseudo_label` for a labelling mode and the labelled set's transcripts:
    greedy (neither), lexicon (their words) or closed_set (the distinct transcripts)."""
    check_pseudo_label_mode(labels)
    lexicon = {w for t in texts for w in t.split()} if labels == "lexicon" else None
    return lexicon, sorted(set(texts)) if labels == "closed_set" else None


def round_arguments(training_args, steps: int, learning_rate: float, output_dir):
    """The Trainer options of a self-training round: `training_args` with its own length, peak LR (10 % warm-up)
    and output folder, never resuming the labelled run's checkpoint."""
    import dataclasses

    logging_steps = training_args.logging_steps  # a ratio (< 1) or a count; a count at most a tenth of the round
    if logging_steps > max(1, steps // 10):
        logging_steps = max(1, steps // 10)
    return dataclasses.replace(training_args, max_steps=steps, learning_rate=learning_rate,
                               warmup_steps=max(1, steps // 10), logging_steps=logging_steps,
                               resume_from_checkpoint=None, output_dir=str(output_dir))


def self_train(model, processor, labelled: CTCDataset, arrays: list[np.ndarray], training_args, rounds: int = 1,
               keep_fraction: float = 0.5, lexicon: set[str] | None = None, names: list[str] | None = None,
               speed_perturbation: tuple[float, float] | None = None, references: list[str] | None = None,
               print_logs: bool = True, eval_set: CTCDataset | None = None, candidates: list[str] | None = None,
               noise_augmentation: float = 0.0):
    """`rounds` rounds of: pseudo-label `arrays` with the current model, then continue fine-tuning it on
    `labelled` + the selected clips for `training_args.max_steps` updates (a fresh optimizer and LR schedule each
    round; `candidates`: closed-set labels, see `pseudo_label`; `speed_perturbation` and `noise_augmentation` as in
    `finetuning.train_ctc`; `eval_set` only for the Trainer's periodic evaluation, never for selection). Returns the last trainer and one record per round (pool size, selected, rejected by the lexicon,
    and, when `references` are given for reporting, the pseudo-labels' accuracy)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not arrays:
        raise ValueError("self-training needs unlabelled clips; the pool is empty")
    history, trainer = [], None
    for r in range(rounds):
        labels = pseudo_label(model, processor, arrays, keep_fraction, lexicon, names, candidates=candidates)
        extra = pseudo_labelled_dataset(processor, arrays, labels)
        record = {"round": r + 1, "pool": len(arrays), "selected": len(extra),
                  "rejected_by_lexicon": labels.rejected_by_lexicon,
                  "mean_confidence_selected": float(np.mean([labels.confidences[i] for i in labels.selected]))
                  if labels.selected else math.nan,
                  "pseudo_hours": sum(len(e["input_values"]) for e in extra.examples) / TARGET_SAMPLING_RATE / 3600}
        if references is not None:
            record.update(labels.accuracy(references))
        logger.warning("self-training round %d: %d of %d unlabelled clips pseudo-labelled (%d rejected by the lexicon)",
                       r + 1, len(extra), len(arrays), labels.rejected_by_lexicon)
        trainer = train_ctc(model, processor, labelled.concat(extra), eval_set, training_args, print_logs=print_logs,
                            speed_perturbation=speed_perturbation, noise_augmentation=noise_augmentation)
        model = trainer.model
        history.append(record)
    return trainer, history


__all__ = ["PseudoLabels", "select_confident", "closed_set_labels", "pseudo_label", "pseudo_labelled_dataset",
           "label_constraints", "round_arguments", "self_train"]
