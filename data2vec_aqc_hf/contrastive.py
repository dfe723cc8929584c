"""Cross-contrastive losses with clustering (data2vec-aqc, spec section 5).

All functions work on the padded `(batch, frames, dim)` layout with a boolean frame mask instead of gathering the
masked frames, so the step has data-independent shapes and never synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .profiling import profiled
from .quantizer import diversity_loss, perplexity_per_group


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor,
    weights: torch.Tensor,
    num_clusters: int,
    iterations: int = 10,
    generator: torch.Generator | None = None,
    init: torch.LongTensor | None = None,
) -> torch.LongTensor:
    """Cosine k-means of the rows of `x` `(N, D)`; rows with weight 0 (unmasked frames) are assigned a label but
    do not move the centroids. Centroids start at the rows `init` `(k,)` (then `num_clusters` is not used), by
    default `num_clusters` rows drawn with `generator` (`initial_centroid_rows`). Returns the label of every row."""
    x = F.normalize(x.float(), dim=-1)
    weights = weights.float()
    if init is None:
        init = initial_centroid_rows(weights, num_clusters, generator)
    centroids = x[init]
    # the cluster count as the start's size (not `num_clusters`): it stays symbolic under torch.compile
    clusters = torch.arange(centroids.shape[0], device=x.device)
    for _ in range(iterations):
        labels = (x @ centroids.T).argmax(dim=-1)
        one_hot = (labels[:, None] == clusters).to(x.dtype) * weights[:, None]
        sums = one_hot.T @ x
        counts = one_hot.sum(0)[:, None]
        centroids = torch.where(counts > 0, F.normalize(sums, dim=-1), centroids)
    return (x @ centroids.T).argmax(dim=-1)


def initial_centroid_rows(weights: torch.Tensor, num_clusters: int, generator=None) -> torch.LongTensor:
    """`num_clusters` distinct rows drawn with probability proportional to `weights` `(N,)`: k-means' random start
    (the reference code re-initialises its k-means at random on every forward).

    Drawn as the k largest `w / E` with `E ~ Exp(1)` per row (Efraimidis-Spirakis: the same distribution as
    `torch.multinomial(w, k, replacement=False)`), because CUDA's multinomial checks its input with two host syncs
    (`.item()`), and the training step makes none (tests/test_device.py). A tiny mass on the other rows keeps the draw
    valid when fewer than k rows are weighted."""
    keys = (weights.float() + 1e-6) / torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    return keys.topk(num_clusters).indices


def pooled_frame_weights(mask: torch.Tensor, views: int) -> torch.Tensor:
    """The k-means row weights of `views` views pooled: the frame mask `(batch, frames)` repeated, flattened."""
    return mask[None].expand(views, -1, -1).reshape(-1)


def num_clusters_for(frames: int, cluster_factor: int) -> int:
    """k = max(2, frames // cluster_factor), with frames the padded frame count of the batch."""
    return max(2, frames // cluster_factor)


@profiled("kmeans")
def cluster_views(
    quantized_views: torch.Tensor, mask: torch.Tensor, cluster_factor: int, iterations: int, generator=None,
    init: torch.LongTensor | None = None,
) -> torch.LongTensor:
    """One k-means over the masked frames of all views `(views, batch, frames, dim)` pooled; labels
    `(views, batch, frames)`. `init`: the starting centroids' rows in the pooled `(views * batch * frames)` frames
    (`initial_centroid_rows` of `pooled_frame_weights`), drawn with `generator` if None."""
    views, batch, frames, dim = quantized_views.shape
    labels = spherical_kmeans(
        quantized_views.detach().reshape(-1, dim),
        pooled_frame_weights(mask, views),
        num_clusters_for(frames, cluster_factor),
        iterations,
        generator,
        init,
    )
    return labels.view(views, batch, frames)


@profiled("contrastive")
def cosine_matrix(anchors: torch.Tensor, targets: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every anchor with every target, `(n, a, d) x (n, t, d) -> (n, a, t)` in fp32, also
    under autocast (which would run the matmul in half precision; `F.cosine_similarity` stays fp32 there too):
    `x . y / (max(|x|, eps) max(|y|, eps))`, as `F.cosine_similarity`."""
    with torch.autocast(anchors.device.type, enabled=False):
        anchors, targets = anchors.float(), targets.float()
        norms = anchors.norm(dim=-1).clamp(min=eps)[:, :, None] * targets.norm(dim=-1).clamp(min=eps)[:, None, :]
        return (anchors @ targets.transpose(1, 2)) / norms


@profiled("contrastive")
def logits_from_similarity(
    similarity: torch.Tensor,
    negative_times: torch.LongTensor,
    equal_negatives: torch.BoolTensor,
    cluster_labels: torch.LongTensor | None = None,
    cluster_scale: float = 1.0,
) -> torch.Tensor:
    """Contrastive logits `(n, frames, 1 + K)` read from a similarity matrix: the positive `similarity[r, t, t]` at
    index 0, the negatives `similarity[r, t, negative_times[r, t]]`, with `contrastive_logits`' rules.

    similarity: `(n, frames, frames)` cosine / kappa of row r's anchor at frame t with its target at frame s.
    negative_times: `(n, frames, K)` time indices of the negatives within the row's own frames.
    equal_negatives: `(n, frames, K)` whether a negative's target vector equals the positive's (its logit is -inf).
    cluster_labels: `(n, frames)` k-means labels of the targets; a negative in its positive's cluster has its logit
        multiplied by `cluster_scale`."""
    positive = similarity.diagonal(dim1=1, dim2=2)[..., None]
    negatives = similarity.gather(2, negative_times)
    if cluster_labels is not None:
        rows, frames, count = negative_times.shape
        negative_labels = cluster_labels.gather(1, negative_times.reshape(rows, -1)).view(rows, frames, count)
        negatives = torch.where(negative_labels == cluster_labels[..., None], negatives * cluster_scale, negatives)
    negatives = negatives.masked_fill(equal_negatives, float("-inf"))
    return torch.cat([positive, negatives], dim=-1)


@profiled("contrastive")
def contrastive_logits(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    negative_indices: torch.LongTensor,
    kappa: float,
    cluster_labels: torch.LongTensor | None = None,
    cluster_scale: float = 1.0,
) -> torch.Tensor:
    """Logits `(batch, frames, 1 + K)`: cosine(anchor, positive) / kappa at index 0, then the K negatives
    `targets.flatten(0, 1)[negative_indices]`. A masked frame's negatives must be frames of its own utterance (as
    `masking.sample_negative_indices` and transformers' `_sample_negative_indices` draw them); the entries of the
    other frames are never read by the loss and may hold anything (transformers fills them with `b * frames`).

    A negative in the same cluster as its positive has its logit multiplied by `cluster_scale` (0.3): this pulls it
    toward zero, so a same-cluster negative with a *negative* cosine ends up with a higher logit. That is the
    reference implementation's behaviour and is kept on purpose. A negative whose vector equals the positive's
    gets -inf.

    Computed as one `frames x frames` cosine matrix per utterance read at the positives and negatives (the efficient
    mode's form): the reference gathers K target vectors per frame and differentiates through that gather, 4-5x the
    cost; the values are the same up to float rounding (`tests/test_contrastive.py` compares both)."""
    batch, frames, dim = targets.shape
    times = negative_indices - (torch.arange(batch, device=negative_indices.device) * frames)[:, None, None]
    times = times.clamp(0, frames - 1)  # the identity for every entry the loss reads (see above)
    with torch.no_grad():
        detached = targets.detach()
        equal = (detached.reshape(batch * frames, dim)[negative_indices] == detached[:, :, None]).all(-1)
    similarity = cosine_matrix(anchors, targets) / kappa
    return logits_from_similarity(similarity, times, equal, cluster_labels, cluster_scale)


@profiled("contrastive")
def contrastive_loss_sum(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive at index 0, summed over the masked frames."""
    per_frame = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    return (per_frame * mask.to(per_frame.dtype)).sum()


def feature_penalty(features: torch.Tensor, frame_valid: torch.Tensor | None = None) -> torch.Tensor:
    """wav2vec 2.0's feature penalty: the mean square of the CNN features `(batch, frames, channels)` over the valid
    frames (`frame_valid` `(batch, frames)`, all frames when None)."""
    squared = features.float().square().mean(-1)
    if frame_valid is None:
        return squared.mean()
    return (squared * frame_valid).sum() / frame_valid.sum().clamp(min=1)


def variance_covariance_terms(hidden: torch.Tensor, frame_valid: torch.Tensor | None = None,
                              eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms (Bardes, Ponce and LeCun 2022) of `hidden` `(batch, frames, dim)` over
    its valid frames (`frame_valid` `(batch, frames)`, all when None), each frame one sample: variance = mean over
    channels of relu(1 - sqrt(var + eps)) (zero once every channel has std >= 1), covariance = sum of the squared
    off-diagonal entries of the channels' covariance matrix / dim (zero for decorrelated channels). Both are zero
    for a representation that uses every direction, and grow as it collapses onto a few."""
    rows = hidden.float().reshape(-1, hidden.shape[-1])
    dim = rows.shape[-1]
    # padded rows get weight 0 (no boolean indexing: the shapes stay static for torch.compile)
    weight = (frame_valid.reshape(-1, 1).to(rows.dtype) if frame_valid is not None
              else torch.ones_like(rows[:, :1]))
    count = weight.sum()
    centred = (rows - (rows * weight).sum(0) / count.clamp(min=1.0)) * weight
    variance = centred.square().sum(0) / (count - 1.0).clamp(min=1.0)
    variance_term = torch.relu(1.0 - torch.sqrt(variance + eps)).mean()
    covariance = centred.T @ centred / (count - 1.0).clamp(min=1.0)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return variance_term, off_diagonal.square().sum() / dim


def weighted_aqc_terms(config, out, student_sum, teacher_sum, denominator, marginal, penalty, temperature):
    """Store the AQC loss terms on the output `out` (contrastive losses per masked frame, diversity loss, feature
    penalty, codebook perplexity, Gumbel temperature) and return their weighted sum (spec 6), which the regression
    loss is added to. `marginal`: the clean view's code marginal `(groups, entries)`."""
    out.student_contrastive_loss = student_sum / denominator
    out.teacher_contrastive_loss = teacher_sum / denominator
    out.diversity_loss = diversity_loss(marginal)
    out.feature_penalty = penalty
    out.codebook_perplexity = perplexity_per_group(marginal).detach()
    out.gumbel_temperature = temperature.float()
    return (
        (config.student_contrastive_weight * student_sum + config.teacher_contrastive_weight * teacher_sum)
        / denominator
        + config.diversity_loss_weight * out.diversity_loss
        + config.feature_penalty_weight * penalty
    )
