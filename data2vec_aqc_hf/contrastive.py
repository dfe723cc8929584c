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
    (the reference code re-initialises its k-means at random on every forward)."""
    # tiny mass on the other rows keeps multinomial valid when fewer than k rows are weighted
    return torch.multinomial(weights.float() + 1e-6, num_clusters, replacement=False, generator=generator)


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
def contrastive_logits(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    negative_indices: torch.LongTensor,
    kappa: float,
    cluster_labels: torch.LongTensor | None = None,
    cluster_scale: float = 1.0,
) -> torch.Tensor:
    """Logits `(batch, frames, 1 + K)`: cosine(anchor, positive) / kappa at index 0, then the K negatives
    `targets.flatten(0, 1)[negative_indices]`.

    A negative in the same cluster as its positive has its logit multiplied by `cluster_scale` (0.3): this pulls it
    toward zero, so a same-cluster negative with a *negative* cosine ends up with a higher logit. That is the
    reference implementation's behaviour and is kept on purpose. A negative whose vector equals the positive's
    gets -inf."""
    batch, frames, dim = targets.shape
    flat = targets.reshape(batch * frames, dim)
    negatives = flat[negative_indices]  # (B, T, K, D)
    candidates = torch.cat([targets[:, :, None], negatives], dim=2)
    logits = F.cosine_similarity(anchors[:, :, None].float(), candidates.float(), dim=-1, eps=1e-8) / kappa
    neg_logits = logits[..., 1:]
    if cluster_labels is not None:
        same_cluster = cluster_labels.reshape(-1)[negative_indices] == cluster_labels[:, :, None]
        neg_logits = torch.where(same_cluster, neg_logits * cluster_scale, neg_logits)
    equal_to_positive = (negatives == targets[:, :, None]).all(-1)
    neg_logits = neg_logits.masked_fill(equal_to_positive, float("-inf"))
    return torch.cat([logits[..., :1], neg_logits], dim=-1)


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
