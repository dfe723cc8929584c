"""Span masking and negative sampling, batched on the model's device (no numpy, no host synchronisation).

`compute_span_mask` draws the same distribution as transformers' `_compute_mask_indices` (wav2vec 2.0 / data2vec
span masking) but with torch ops and an optional `torch.Generator`: each utterance of valid length L gets
`n = max(min_masks, floor(mask_prob * L / span + u))` spans (u ~ U(0, 1)), whose starts are drawn without
replacement from `[0, L - span]`; spans may overlap, so the masked fraction is below `mask_prob`.
"""

from __future__ import annotations

import torch


def compute_span_mask(
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    frame_lengths: torch.Tensor | None = None,
    min_masks: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    require_same_masks: bool = False,
) -> torch.BoolTensor:
    """Boolean `(batch, frames)` span mask; frames at or beyond `frame_lengths[b]` are never masked.
    `require_same_masks`: trim every row to the batch's smallest masked-frame count (fairseq's option, on in the
    data2vec recipes; see `trim_to_fewest_masked`)."""
    batch, frames = shape
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    if mask_length > frames:
        raise ValueError(f"mask_length={mask_length} is longer than the sequence ({frames} frames)")
    if frame_lengths is None:
        frame_lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
    device = frame_lengths.device
    lengths = frame_lengths.to(torch.long)

    # number of spans per utterance, probabilistic rounding as in transformers/fairseq
    jitter = torch.rand(batch, generator=generator, device=device)
    num_spans = torch.floor(mask_prob * lengths / mask_length + jitter).long().clamp(min=min_masks)
    num_starts = (lengths - mask_length + 1).clamp(min=0)  # admissible start positions
    num_spans = torch.minimum(num_spans, num_starts)
    num_spans = torch.minimum(num_spans, lengths // mask_length)

    # choose `num_spans` distinct starts uniformly: rank random scores of the admissible positions
    scores = torch.rand(batch, frames, generator=generator, device=device)
    positions = torch.arange(frames, device=device)
    scores = scores.masked_fill(positions[None, :] >= num_starts[:, None], 2.0)  # inadmissible sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    starts = (ranks < num_spans[:, None]).to(torch.int32)

    # dilate each start into a span of `mask_length` frames: frame t is masked if a start lies in (t-span, t]
    covered = starts.cumsum(dim=1)
    shifted = torch.nn.functional.pad(covered, (mask_length, 0))[:, :frames]
    mask = (covered - shifted) > 0
    if require_same_masks:
        mask = trim_to_fewest_masked(mask, generator)
    return mask


def trim_to_fewest_masked(mask: torch.BoolTensor, generator: torch.Generator | None = None) -> torch.BoolTensor:
    """fairseq's `require_same_masks`: every row keeps the batch's smallest number of masked frames, the frames
    it keeps drawn uniformly without replacement among its masked frames (`np.random.choice(..., replace=False)`
    in fairseq's `compute_mask_indices`)."""
    fewest = mask.sum(dim=1).min()
    scores = torch.rand(mask.shape, generator=generator, device=mask.device).masked_fill(~mask, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return mask & (ranks < fewest)


def sample_negative_indices(
    mask: torch.BoolTensor, num_negatives: int, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """For every frame, `num_negatives` indices into the flattened `(batch * frames)` sequence, drawn uniformly
    (with replacement) from the *other* masked frames of the same utterance, in the format of
    `Wav2Vec2ForPreTraining`'s `sampled_negative_indices`. Rows of unmasked frames are filled but unused.
    An utterance with a single masked frame has no other frame to draw: its negatives point at the frame itself,
    which the contrastive loss removes (a negative equal to the positive gets logit -inf)."""
    batch, frames = mask.shape
    device = mask.device
    num_masked = mask.sum(dim=1)  # (B,)
    rank = mask.long().cumsum(dim=1) - 1  # rank of each masked frame among its utterance's masked frames
    # masked frame positions in order, first `num_masked[b]` entries of each row
    order = (~mask).to(torch.int8).argsort(dim=1, stable=True)

    pool = (num_masked - 1).clamp(min=1)  # number of *other* masked frames to choose from
    u = torch.rand(batch, frames, num_negatives, generator=generator, device=device)
    draw = torch.floor(u * pool[:, None, None]).long()
    draw = draw + (draw >= rank[:, :, None]).long()  # skip the anchor's own rank
    draw = torch.minimum(draw, (num_masked - 1).clamp(min=0)[:, None, None])
    time_index = torch.gather(order, 1, draw.view(batch, -1)).view(batch, frames, num_negatives)
    return time_index + (torch.arange(batch, device=device) * frames)[:, None, None]
