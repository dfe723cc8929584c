import numpy as np
import pytest
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from data2vec_aqc_hf.masking import compute_span_mask, sample_negative_indices


def test_span_mask_matches_transformers_distribution():
    """Same per-utterance statistics as transformers' numpy implementation (mean masked fraction, span count)."""
    batch, frames, p, span = 400, 250, 0.65, 10
    g = torch.Generator().manual_seed(0)
    ours = compute_span_mask((batch, frames), p, span, min_masks=2, generator=g).float()
    np.random.seed(0)
    ref = torch.from_numpy(_compute_mask_indices((batch, frames), p, span, min_masks=2)).float()
    assert abs(ours.mean().item() - ref.mean().item()) < 0.01
    # the expected number of spans is p * T / span; overlaps make the masked fraction smaller than p
    assert 0.40 < ours.mean().item() < 0.60
    assert abs(ours.std(1).mean().item() - ref.std(1).mean().item()) < 0.01


def test_span_mask_has_expected_number_of_starts_and_span_length():
    g = torch.Generator().manual_seed(1)
    mask = compute_span_mask((2000, 200), 0.1, 5, generator=g)  # low p: few overlaps
    # every maximal run is at least one span long
    m = torch.nn.functional.pad(mask.int(), (1, 1))
    starts = (m[:, 1:] - m[:, :-1]) == 1
    ends = (m[:, 1:] - m[:, :-1]) == -1
    run_lengths = ends.nonzero()[:, 1] - starts.nonzero()[:, 1]
    assert run_lengths.min().item() >= 5
    # expected spans per row is p * T / span = 4 (probabilistic rounding keeps the mean exact)
    masked = mask.float().sum(1).mean().item()
    assert 4 * 5 * 0.9 < masked <= 4 * 5 + 0.5


def test_padding_is_never_masked_and_short_rows_are_safe():
    lengths = torch.tensor([100, 37, 12, 5])
    g = torch.Generator().manual_seed(2)
    mask = compute_span_mask((4, 100), 0.65, 10, lengths, min_masks=2, generator=g)
    for row, length in zip(mask, lengths):
        assert not row[length:].any()
    assert not mask[3].any()  # shorter than one span
    assert mask[2].sum() >= 10  # min_masks: one span fits
    # reproducible from the seed
    again = compute_span_mask((4, 100), 0.65, 10, lengths, 2, torch.Generator().manual_seed(2))
    assert torch.equal(mask, again)


def test_span_longer_than_sequence_is_an_error():
    with pytest.raises(ValueError, match="longer than the sequence"):
        compute_span_mask((1, 5), 0.5, 10)


def test_negatives_are_other_masked_frames_of_same_utterance():
    g = torch.Generator().manual_seed(3)
    mask = compute_span_mask((6, 80), 0.5, 5, torch.tensor([80, 80, 60, 40, 30, 80]), 2, g)
    negs = sample_negative_indices(mask, 50, g)
    flat_mask = mask.reshape(-1)
    for b in range(6):
        for t in mask[b].nonzero()[:, 0].tolist():
            idx = negs[b, t]
            assert (idx // 80 == b).all(), "negative from another utterance"
            assert flat_mask[idx].all(), "negative is not a masked frame"
            assert (idx != b * 80 + t).all(), "negative equals the positive"


def test_negatives_cover_the_other_masked_frames_uniformly():
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, [2, 3, 4, 10, 11]] = True
    negs = sample_negative_indices(mask, 20000, torch.Generator().manual_seed(4))[0, 3]
    counts = torch.bincount(negs, minlength=20).float()
    assert counts[3] == 0 and counts[[2, 4, 10, 11]].min() > 0
    assert torch.allclose(counts[[2, 4, 10, 11]] / 20000, torch.full((4,), 0.25), atol=0.02)


def test_require_same_masks_trims_every_row_to_the_fewest_masked_frames():
    """fairseq's `require_same_masks`: each row keeps exactly the batch's smallest masked-frame count, and only
    frames it had masked (a subset of the untrimmed mask drawn from the same generator state)."""
    lengths = torch.tensor([200, 120, 60, 200])
    untrimmed = compute_span_mask((4, 200), 0.65, 10, lengths, 1, torch.Generator().manual_seed(3))
    trimmed = compute_span_mask((4, 200), 0.65, 10, lengths, 1, torch.Generator().manual_seed(3),
                                require_same_masks=True)
    counts = untrimmed.sum(1)
    assert len(set(counts.tolist())) > 1  # the case is not trivial
    assert trimmed.sum(1).tolist() == [counts.min().item()] * 4
    assert not (trimmed & ~untrimmed).any()
    # which frames a long row keeps is random, not its first ones
    kept = trimmed[0].nonzero()[:, 0]
    assert kept.max() > untrimmed[0].nonzero()[:, 0][counts.min() - 1]
