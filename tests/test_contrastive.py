import torch
import torch.nn.functional as F
from conftest import gathered_contrastive_logits

from data2vec_aqc_hf.contrastive import (
    cluster_views,
    contrastive_logits,
    contrastive_loss_sum,
    num_clusters_for,
    spherical_kmeans,
)
from data2vec_aqc_hf.masking import sample_negative_indices


def _setup():
    torch.manual_seed(0)
    anchors = torch.randn(1, 4, 3)
    targets = torch.randn(1, 4, 3)
    negatives = torch.tensor([[[1, 2], [0, 2], [0, 1], [0, 0]]])
    return anchors, targets, negatives


def test_logits_hand_computed():
    anchors, targets, negatives = _setup()
    logits = contrastive_logits(anchors, targets, negatives, kappa=0.1)
    for t in range(3):
        cands = [t] + negatives[0, t].tolist()
        expected = torch.stack([F.cosine_similarity(anchors[0, t], targets[0, c], dim=0) for c in cands]) / 0.1
        assert torch.allclose(logits[0, t], expected, atol=1e-5)
    # frame 3's negatives point at frame 0 (different vector): finite
    assert torch.isfinite(logits[0, 3]).all()


def test_negative_equal_to_positive_gets_minus_inf():
    anchors, targets, negatives = _setup()
    targets[0, 2] = targets[0, 0]  # frame 2 has the same quantized vector as frame 0
    logits = contrastive_logits(anchors, targets, negatives, kappa=0.1)
    assert logits[0, 0, 2] == float("-inf")  # frame 0's negative #2 is frame 2
    assert logits[0, 2, 1] == float("-inf")  # frame 2's negative #1 is frame 0
    assert torch.isfinite(logits[0, 1]).all()


def test_clustering_scales_exactly_the_same_cluster_negatives():
    anchors, targets, negatives = _setup()
    labels = torch.tensor([[0, 1, 0, 1]])
    plain = contrastive_logits(anchors, targets, negatives, 0.1)
    scaled = contrastive_logits(anchors, targets, negatives, 0.1, labels, 0.3)
    same = labels.reshape(-1)[negatives] == labels[:, :, None]
    assert same.any() and (~same).any()
    assert torch.equal(scaled[..., 0], plain[..., 0])  # the positive is never scaled
    assert torch.allclose(scaled[..., 1:][same], 0.3 * plain[..., 1:][same])
    assert torch.equal(scaled[..., 1:][~same], plain[..., 1:][~same])


def test_loss_sum_is_cross_entropy_over_masked_frames():
    logits = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    expected = F.cross_entropy(logits[mask], torch.zeros(int(mask.sum()), dtype=torch.long), reduction="sum")
    assert torch.allclose(contrastive_loss_sum(logits, mask), expected, atol=1e-5)
    # a row whose negatives are all -inf costs nothing
    logits[0, 0, 1:] = float("-inf")
    assert contrastive_loss_sum(logits, torch.tensor([[1, 0, 0, 0, 0], [0] * 5], dtype=torch.bool)).item() == 0.0


def test_spherical_kmeans_recovers_clusters_and_ignores_unweighted_rows():
    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    x = torch.cat([c + 0.05 * torch.randn(30, 8, generator=g) for c in centers])
    truth = torch.arange(3).repeat_interleave(30)
    outliers = 50 * torch.randn(10, 8, generator=g)
    weights = torch.cat([torch.ones(90), torch.zeros(10)])
    labels = spherical_kmeans(torch.cat([x, outliers]), weights, 3, 10, torch.Generator().manual_seed(2))[:90]
    # a perfect partition up to relabelling
    for k in range(3):
        assert labels[truth == k].unique().numel() == 1
    assert labels.unique().numel() == 3


def test_cluster_views_pools_views_and_uses_k_from_frames():
    assert num_clusters_for(20, 16) == 2 and num_clusters_for(499, 16) == 31
    q = torch.randn(2, 3, 40, 6)
    mask = torch.rand(3, 40) > 0.5
    labels = cluster_views(q, mask, 16, 5, torch.Generator().manual_seed(3))
    assert labels.shape == (2, 3, 40) and labels.max() < 2
    # identical vectors in the two views share a cluster (one k-means over both)
    q[1] = q[0]
    labels = cluster_views(q, mask, 16, 5, torch.Generator().manual_seed(3))
    assert torch.equal(labels[0], labels[1])


def test_logits_from_the_cosine_matrix_equal_the_gathered_reference_values_and_gradients():
    """The optimised path (one frames x frames matrix per utterance) against the reference's gather of K negative
    vectors per frame: same logits (same -inf entries), same gradients for anchors and targets, 3 utterances with
    repeated codes, clustering on, 100 negatives among the masked frames as the model draws them."""
    g = torch.Generator().manual_seed(0)
    batch, frames, dim = 3, 40, 16
    targets = torch.randn(batch, frames, dim, generator=g)
    targets[:, 7] = targets[:, 3]  # repeated codes: -inf negatives
    targets[1, 20:25] = targets[1, 19]
    anchors = torch.randn(batch, frames, dim, generator=g)
    mask = torch.rand(batch, frames, generator=g) < 0.5
    negatives = sample_negative_indices(mask, 100, g)
    labels = torch.randint(0, 4, (batch, frames), generator=g)
    grads = []
    for fn in (contrastive_logits, gathered_contrastive_logits):
        a, t = anchors.clone().requires_grad_(), targets.clone().requires_grad_()
        logits = fn(a, t, negatives, 0.1, labels, 0.3)
        contrastive_loss_sum(logits, mask).backward()
        grads.append((logits.detach(), a.grad, t.grad))
    (got, got_a, got_t), (want, want_a, want_t) = grads
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(want).any()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_a, want_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=1e-4)


def test_logits_stay_fp32_under_autocast():
    """Mixed-precision training runs the loss under autocast, which would lower the cosine matrix's matmul to bf16
    (logit errors ~1e-2); the logits must equal the fp32 ones."""
    g = torch.Generator().manual_seed(1)
    anchors, targets = torch.randn(2, 30, 64, generator=g), torch.randn(2, 30, 64, generator=g)
    negatives = sample_negative_indices(torch.rand(2, 30, generator=g) < 0.6, 20, g)
    want = contrastive_logits(anchors, targets, negatives, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_logits(anchors, targets, negatives, 0.1)
    assert got.dtype == torch.float32
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-6)


def test_initial_centroid_rows_are_distinct_weighted_draws():
    """k distinct rows; rows of weight 0 only when fewer than k rows are weighted; for k = 1 each row's frequency is
    its share of the weight (2000 draws: within 4 standard errors)."""
    from data2vec_aqc_hf.contrastive import initial_centroid_rows

    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    for _ in range(50):
        rows = initial_centroid_rows(weights, 3, g)
        assert len(set(rows.tolist())) == 3 and all(weights[rows] > 0)
    rows = initial_centroid_rows(weights, 6, g)  # only 5 weighted rows: all of them, plus one other
    assert len(set(rows.tolist())) == 6 and set(torch.nonzero(weights).flatten().tolist()) <= set(rows.tolist())
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    counts = torch.bincount(torch.cat([initial_centroid_rows(w, 1, g) for _ in range(2000)]), minlength=4).float()
    p = w / w.sum()
    assert torch.all((counts / 2000 - p).abs() <= 4 * torch.sqrt(p * (1 - p) / 2000)), counts
