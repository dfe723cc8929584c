"""The one WER/CER function of the package (jiwer)."""

from __future__ import annotations

from pathlib import Path

import jiwer


def wer_cer(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level word and character error rates; empty references are skipped (jiwer rejects them)."""
    pairs = [(p, r) for p, r in zip(predictions, references) if r.strip()]
    if not pairs:
        return {"wer": float("nan"), "cer": float("nan")}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    return {"wer": float(jiwer.wer(refs, preds)), "cer": float(jiwer.cer(refs, preds))}


METRIC_PATH = str(Path(__file__).resolve().parent / "wer_cer_metric")


def load_metric():
    """`wer_cer` as an `evaluate` metric (batched `add_batch`/`compute`, distributed gathering), loaded from the
    package, so it works without the Hub (`evaluate.load("wer")` needs it)."""
    import evaluate

    return evaluate.load(METRIC_PATH)
