"""data2vec 2.0's efficient pretraining with the data2vec-aqc losses (spec section 8, `config.efficient_mode`).

One step, top to bottom (`efficient_pretraining_forward`):
1. the views and CNN features as in the standard mode (clean view; with AQC one augmented view per utterance);
2. the teacher encodes each clean utterance **once**; its targets (the standard mode's) are repeated per clone;
3. each utterance's projected student features are cloned M = `num_clones` times, each clone with its own mask
   (`inverse_block_mask` by default);
4. the student encodes only each clone's kept frames (`encode_kept_frames`): masked frames are zeroed, the
   positional convolution runs over the full length (so a kept frame knows where it sits), then the kept frames
   alone go through the transformer: no mask token ever enters it, and its cost scales with the kept share;
5. `ConvDecoder` fills every position from the student's output at the kept frames plus noise mask tokens at the
   masked ones and predicts the target everywhere;
6. regression on the masked positions of every clone; with `objective="aqc"` the quantizer, both contrastive
   losses and the k-means of the standard mode (`efficient_aqc_losses`): each view is quantized once per utterance
   and its codes serve all of its clones; the k-means runs once over the utterances' frames, each weighted by the
   number of clones that mask it (the same clustering as pooling every clone's masked frames); each clone's L_s
   (anchored on the decoder's output at its masked positions) and L_t use its own mask and negatives.
   The logits come from one cosine-similarity matrix per clone (anchors x the utterance's codes, `frames x frames`)
   read at the positives and the negatives, instead of gathering `num_negatives` code vectors per anchor: with 8
   clones the gathered form took a third of the step's time on a CPU (docs/PERFORMANCE.md).

Every loss is summed over the masked frames of all clones and divided by their count, as in the standard mode.
The clone of utterance `b` numbered `c` is row `b * num_clones + c` of every cloned tensor (`repeat_interleave`).
The random draws (masks, negatives, augmented audio, cluster labels, mask tokens) can be passed in like the standard
mode's; `generator` is the fallback. `sample_efficient_randomness` (what `model.sample_step_randomness` returns in
this mode) draws all of them up front, in the forward's order, for a step compiled with `fullgraph=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .contrastive import (
    cluster_views,
    contrastive_loss_sum,
    cosine_matrix,
    feature_penalty,
    initial_centroid_rows,
    logits_from_similarity,
    num_clusters_for,
    pooled_frame_weights,
    weighted_aqc_terms,
)
from .masking import compute_span_mask, sample_negative_indices
from .profiling import profiled

__all__ = [
    "ConvDecoder",
    "EfficientStepRandomness",
    "blocks_kept",
    "efficient_aqc_losses",
    "efficient_pretraining_forward",
    "encode_kept_frames",
    "gather_kept_frames",
    "inverse_block_mask",
    "kept_frames_budget",
    "sample_clone_masks",
    "sample_efficient_randomness",
]


# ----- masking -------------------------------------------------------------------------------------------------------
def blocks_kept(frame_lengths, mask_prob: float, block_length: int):
    """Kept blocks of an utterance of `frame_lengths` valid frames (int or long tensor):
    `clamp(floor((1 - mask_prob) * L / block_length + 0.5), 1, max(1, (L - 1) // block_length))`, i.e. the kept
    share `1 - mask_prob` rounded to whole blocks, at least one block, and at least one frame left to mask."""
    if isinstance(frame_lengths, int):
        wanted = math.floor((1.0 - mask_prob) * frame_lengths / block_length + 0.5)
        return min(max(wanted, 1), max(1, (frame_lengths - 1) // block_length))
    lengths = frame_lengths.to(torch.long)
    wanted = torch.floor((1.0 - mask_prob) * lengths / block_length + 0.5).long()
    most = ((lengths - 1) // block_length).clamp(min=1)
    return torch.minimum(wanted.clamp(min=1), most)


def kept_frames_budget(frames: int, mask_prob: float, block_length: int) -> int:
    """The most frames `inverse_block_mask` keeps in any utterance of a batch padded to `frames`: that of a full-length
    one (the kept count never decreases with the length). The student's input length, known without looking at the
    data."""
    return blocks_kept(frames, mask_prob, block_length) * block_length


def inverse_block_mask(
    shape: tuple[int, int],
    mask_prob: float,
    block_length: int,
    frame_lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.BoolTensor:
    """Inverse block mask `(batch, frames)`, True = masked: each utterance of L valid frames keeps `blocks_kept(L)`
    = n non-overlapping blocks of `block_length` frames, every placement equally likely, and masks the other
    L - n * block_length valid frames (exactly `mask_prob` of them up to the rounding to whole blocks). Padded
    frames are neither kept nor masked (False). Batched, no host synchronisation.

    Placement: n blocks among L frames leave m = L - n * block_length free frames; an arrangement is a choice of n
    of the m + n "slots" (stars and bars), the i-th chosen slot s_i (in order) starting block i at
    s_i + i * (block_length - 1)."""
    batch, frames = shape
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    if frame_lengths is None:
        frame_lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
    device = frame_lengths.device
    lengths = frame_lengths.to(torch.long)
    blocks = blocks_kept(lengths, mask_prob, block_length)
    slots = (lengths - blocks * block_length).clamp(min=0) + blocks

    # choose `blocks` distinct slots uniformly: rank random scores of the admissible slots
    positions = torch.arange(frames, device=device)
    scores = torch.rand(batch, frames, generator=generator, device=device)
    scores = scores.masked_fill(positions[None, :] >= slots[:, None], 2.0)
    chosen = scores.argsort(dim=1).argsort(dim=1) < blocks[:, None]
    block_index = chosen.long().cumsum(dim=1) - 1
    starts = torch.where(chosen, positions[None, :] + block_index * (block_length - 1), frames)  # `frames`: unused
    marks = torch.zeros(batch, frames + 1, dtype=torch.long, device=device)
    marks = marks.scatter_add(1, starts, chosen.long())[:, :frames]

    # dilate each start into its block: frame t is kept if a block starts in (t - block_length, t]
    covered = marks.cumsum(dim=1)
    shifted = F.pad(covered, (block_length, 0))[:, :frames]
    valid = positions[None, :] < lengths[:, None]
    kept = ((covered - shifted) > 0) & valid
    return valid & ~kept


def sample_clone_masks(config, clones: int, frames: int, frame_lengths: torch.Tensor | None,
                       generator: torch.Generator | None = None, device=None) -> torch.BoolTensor:
    """The students' masks `(clones, frames)` (True = masked) of the kind `config.efficient_mask_kind`;
    `frame_lengths` `(clones,)` are the valid frames of each clone's utterance (all valid if None)."""
    if config.efficient_mask_kind == "inverse_block":
        return inverse_block_mask((clones, frames), config.efficient_mask_prob, config.efficient_mask_length,
                                  frame_lengths, generator, device)
    return compute_span_mask((clones, frames), config.efficient_mask_prob, config.efficient_mask_length,
                             frame_lengths, 1, generator, device=device)


# ----- the student on kept frames only -------------------------------------------------------------------------------
def gather_kept_frames(x: torch.Tensor, keep: torch.BoolTensor, num_kept: int):
    """The kept frames of `x` `(batch, frames, dim)`, in their order, packed into `(batch, num_kept, dim)`, and which
    of the packed slots hold a kept frame `(batch, num_kept)` (an utterance that keeps fewer than `num_kept` frames
    has trailing slots that hold other frames and must be ignored)."""
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :num_kept]
    packed = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    slot_valid = torch.arange(num_kept, device=x.device)[None, :] < keep.sum(dim=1, keepdim=True)
    return packed, slot_valid


@profiled("student")
def encode_kept_frames(encoder, hidden_states: torch.Tensor, keep: torch.BoolTensor, num_kept: int,
                       layer_keep: torch.BoolTensor | None = None):
    """The student's transformer (transformers' `Data2VecAudioEncoder`, its own modules) on the kept frames only.
    `hidden_states` `(batch, frames, hidden)` are the projected features of every frame; masked and padded frames are
    zeroed (data2vec 2.0's `encoder_zero_mask`), the positional convolution runs over the full length, then the kept
    frames with their positional embedding are packed (`gather_kept_frames`) and go through the layer norm, dropout
    and layers, attending only to each other. LayerDrop as in transformers (`torch.rand([]) < layerdrop` per layer),
    or `layer_keep` `(layers,)` bool: every layer runs and its output is kept where True (the form that compiles).
    Returns the packed output `(batch, num_kept, hidden)` and the valid slots `(batch, num_kept)`."""
    x = hidden_states * keep[..., None].to(hidden_states.dtype)
    x = x + encoder.pos_conv_embed(x)
    x, slot_valid = gather_kept_frames(x, keep, num_kept)
    x = encoder.dropout(encoder.layer_norm(x))
    attention_mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=x, attention_mask=slot_valid)
    layerdrop = encoder.config.layerdrop if encoder.training else 0.0
    if layer_keep is None and layerdrop > 0 and torch.compiler.is_compiling():  # no data-dependent branch in a graph
        layer_keep = torch.rand(len(encoder.layers), device=x.device) >= layerdrop
    for index, layer in enumerate(encoder.layers):
        if layer_keep is not None:
            x = torch.where(layer_keep[index], layer(x, attention_mask=attention_mask), x)
        elif layerdrop == 0.0 or not bool(torch.rand([]) < layerdrop):
            x = layer(x, attention_mask=attention_mask)
    return x, slot_valid


# ----- the decoder ---------------------------------------------------------------------------------------------------
class ConvDecoder(nn.Module):
    """data2vec 2.0's light decoder (pretraining only): fills the masked positions with noise mask tokens, then
    `decoder_layers` x (grouped conv1d, kernel `decoder_kernel`, same length -> layer norm without parameters -> GELU),
    a residual connection around each layer whose input has `decoder_dim` channels, and `proj` to `hidden_size`.
    Padded frames are zero at the input and after every layer (padding never reaches a valid frame)."""

    def __init__(self, config):
        super().__init__()
        hidden, dim = config.hidden_size, config.decoder_dim
        kernel, groups = config.decoder_kernel, config.decoder_groups
        self.convs = nn.ModuleList(
            nn.Conv1d(hidden if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(config.decoder_layers)
        )
        self.input_dropout = nn.Dropout(config.decoder_input_dropout)
        self.proj = nn.Linear(dim, hidden)
        self.mask_noise_std = config.decoder_mask_noise_std

    @profiled("decoder")
    def fill(self, student_out: torch.Tensor, keep: torch.BoolTensor, frame_valid: torch.Tensor | None,
             mask_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The decoder's input `(batch, frames, hidden)`: frame t holds the student's output for it where it was
        kept (`student_out` `(batch, num_kept, hidden)` packed as `gather_kept_frames` packs), a mask token at the
        other valid frames (`mask_noise`, drawn N(0, `mask_noise_std`) with `generator` if None) and zero at padding."""
        batch, frames = keep.shape
        student_out = self.input_dropout(student_out)
        slot = (keep.long().cumsum(dim=1) - 1).clamp(min=0, max=student_out.shape[1] - 1)
        kept_values = student_out.gather(1, slot[..., None].expand(-1, -1, student_out.shape[-1]))
        if mask_noise is None:
            mask_noise = torch.randn((batch, frames, student_out.shape[-1]), generator=generator,
                                     device=student_out.device) * self.mask_noise_std
        filled = torch.where(keep[..., None], kept_values, mask_noise.to(student_out.dtype))
        if frame_valid is not None:
            filled = filled * frame_valid[..., None].to(filled.dtype)
        return filled

    @profiled("decoder")
    def forward(self, filled: torch.Tensor, frame_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions `(batch, frames, hidden)` from the filled input `(batch, frames, hidden)` (`fill`)."""
        x = filled.transpose(1, 2)
        valid = frame_valid[:, None, :].to(x.dtype) if frame_valid is not None else None
        for conv in self.convs:
            y = F.gelu(F.layer_norm(conv(x).transpose(1, 2), (conv.out_channels,)).transpose(1, 2))
            if y.shape == x.shape:
                y = y + x
            x = y * valid if valid is not None else y
        return self.proj(x.transpose(1, 2))


# ----- the step ------------------------------------------------------------------------------------------------------
def efficient_pretraining_forward(
    model,
    input_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mask_time_indices: torch.BoolTensor | None = None,
    sampled_negative_indices: torch.LongTensor | None = None,
    augmented_input_values: torch.Tensor | None = None,
    cluster_labels: torch.LongTensor | None = None,
    deterministic_quantizer: bool | None = None,
    generator: torch.Generator | None = None,
    normalize_inputs: bool = True,
    decoder_mask_noise: torch.Tensor | None = None,
    randomness: EfficientStepRandomness | None = None,
):
    """`Data2VecAQCForPreTraining.forward` with `config.efficient_mode` (see the module docstring). The draws, all
    optional (drawn with `generator` if None), with M = `num_clones` and rows `b * M + c` for clone c of utterance b:
    `mask_time_indices` `(batch * M, frames)` bool (True = masked); `sampled_negative_indices`
    `(2, batch * M, frames, K)` or `(batch * M, frames, K)` into the flattened cloned frames; `augmented_input_values`
    `(batch, samples)` (one augmented view per utterance); `cluster_labels` `(2, batch, frames)` (per utterance:
    the clean `[0]` and augmented `[1]` codes, shared by the clones);
    `decoder_mask_noise` `(batch * M, frames, hidden)`, the decoder's mask tokens. Or `randomness`, every draw
    (`sample_efficient_randomness`), instead of all of these and `generator`.
    Returns `Data2VecAQCForPreTrainingOutput` with `mask_time_indices` `(batch * M, frames)` and `last_hidden_state`
    the student's output at the kept frames `(batch * M, kept frames, hidden)`."""
    from .modeling_data2vec_aqc import (
        validate_input_values,
    )

    config = model.config
    validate_input_values(input_values, attention_mask, config)
    augmentation_draws = gumbel_uniform = kmeans_init = None
    if randomness is not None:
        given = (generator, mask_time_indices, sampled_negative_indices, augmented_input_values, cluster_labels,
                 decoder_mask_noise)
        if any(value is not None for value in given):
            raise ValueError("randomness holds every draw of the step: give it without generator, mask_time_indices, "
                             "sampled_negative_indices, augmented_input_values, cluster_labels or decoder_mask_noise")
        mask_time_indices, sampled_negative_indices = randomness.mask_time_indices, randomness.sampled_negative_indices
        decoder_mask_noise, augmentation_draws = randomness.decoder_mask_noise, randomness.augmentation
        gumbel_uniform, kmeans_init = randomness.gumbel_uniform, randomness.kmeans_init
    batch = input_values.shape[0]
    clones = config.num_clones
    sample_valid = (attention_mask.bool() if attention_mask is not None
                    else torch.ones_like(input_values, dtype=torch.bool))

    # 1. views and CNN features, as the standard mode
    backbone = model.data2vec_audio
    clean, student_features, clean_features, frame_valid = model.views_and_features(
        input_values, attention_mask, sample_valid, augmented_input_values, generator, augmentation_draws,
        normalize_inputs)
    frames = student_features.shape[1]

    # 2. teacher: once per utterance, on the clean unmasked features
    clean_norm = backbone.feature_projection.layer_norm(clean_features)
    targets = model.clean_view_targets(clean, clean_norm, frame_valid)

    # 3. M clones per utterance, each with its own mask
    def per_clone(x):
        return x.repeat_interleave(clones, dim=0) if x is not None else None

    clone_valid = per_clone(frame_valid)
    if mask_time_indices is None:
        lengths = clone_valid.sum(-1) if clone_valid is not None else None
        mask_time_indices = sample_clone_masks(config, batch * clones, frames, lengths, generator, input_values.device)
    elif tuple(mask_time_indices.shape) != (batch * clones, frames):
        raise ValueError(f"efficient mode: mask_time_indices must have shape (batch * num_clones, frames) = "
                         f"{(batch * clones, frames)}, got {tuple(mask_time_indices.shape)}")
    mask = mask_time_indices.to(torch.bool)
    keep = ~mask
    if clone_valid is not None:
        mask, keep = mask & clone_valid, keep & clone_valid
    num_kept = _student_length(config, frames, keep)

    # 4. student: projected features of the kept frames only
    student_hidden, student_norm = backbone.feature_projection(student_features)
    student_out, _ = encode_kept_frames(backbone.encoder, per_clone(student_hidden), keep, num_kept)

    # 5. decoder: every position from the kept frames' outputs plus mask tokens
    filled = model.decoder.fill(student_out, keep, clone_valid, decoder_mask_noise, generator)
    prediction = model.decoder(filled, clone_valid)

    # 6. regression on the masked positions of every clone, against the utterance's targets
    out, denominator = model.regression_output(prediction, per_clone(targets), mask, student_out)
    loss = out.regression_loss
    if config.use_aqc:
        loss = loss + efficient_aqc_losses(model, out, clean_features, clean_norm, student_norm, prediction, targets,
                                           mask, frame_valid, sampled_negative_indices, cluster_labels,
                                           deterministic_quantizer, generator, denominator, gumbel_uniform,
                                           kmeans_init)
    out.loss = loss
    return out


def efficient_aqc_losses(model, out, clean_features, clean_norm, student_norm, prediction, targets, mask, frame_valid,
                         sampled_negative_indices, cluster_labels, deterministic_quantizer, generator, denominator,
                         gumbel_uniform=None, kmeans_init=None) -> torch.Tensor:
    """The standard mode's quantization (spec 4) and cross-contrastive losses with clustering (spec 5) for M clones
    per utterance; fills `out`, returns the weighted sum added to the regression loss. Per utterance `(batch, ...)`:
    `clean_features`, `clean_norm`, `student_norm`, `targets`, `frame_valid`; per clone `(batch * M, ...)`:
    `prediction` (the decoder's), `mask`, `sampled_negative_indices` (into the flattened cloned frames)."""
    config = model.config
    clones, frames = mask.shape
    batch = clean_norm.shape[0]
    per_utterance = clones // batch
    mask_count = mask.view(batch, per_utterance, frames).sum(1).float()  # clones masking each frame

    # quantize both views once per utterance; the diversity loss and perplexity over every clone's masked frames of
    # the clean view (frame weights = mask counts)
    quantized_clean, quantized_aug, marginal, temperature = model.quantize_views(
        clean_norm, student_norm, mask_count, deterministic_quantizer, generator, gumbel_uniform)
    penalty = feature_penalty(clean_features, frame_valid)

    # negatives: other masked frames of the same clone (its own mask), one set per loss
    if sampled_negative_indices is None:
        sampled_negative_indices = torch.stack([sample_negative_indices(mask, config.num_negatives, generator)
                                                for _ in range(2)])
    elif sampled_negative_indices.dim() == 3:
        sampled_negative_indices = sampled_negative_indices[None].expand(2, -1, -1, -1)
    negative_times = sampled_negative_indices - (torch.arange(clones, device=mask.device) * frames)[None, :, None, None]

    # clustering: one k-means over both views' frames, weighted by how many clones mask them
    if cluster_labels is None:
        cluster_labels = cluster_views(torch.stack([quantized_clean, quantized_aug]), mask_count, config.cluster_factor,
                                       config.cluster_iterations, generator, kmeans_init)

    def per_clone(x):
        return x.repeat_interleave(per_utterance, dim=0)

    kappa, cluster_scale = config.contrastive_logits_temperature, config.cluster_scale_factor
    student_anchor = model.contr_proj(prediction)  # (batch * M, frames, proj): the decoder's output
    teacher_anchor = model.contr_proj(targets.to(student_anchor.dtype))  # (batch, frames, proj): once per utterance
    # L_s: each clone's anchors against its utterance's clean codes
    similarity_s = cosine_matrix(student_anchor.view(batch, per_utterance * frames, -1), quantized_clean)
    similarity_s = similarity_s.view(clones, frames, frames) / kappa
    # L_t: the teacher's anchors against the augmented codes, one matrix per utterance read by each of its clones
    similarity_t = per_clone(cosine_matrix(teacher_anchor, quantized_aug) / kappa)
    with torch.no_grad():
        equal_clean = per_clone((quantized_clean[:, :, None] == quantized_clean[:, None]).all(-1))
        equal_aug = per_clone((quantized_aug[:, :, None] == quantized_aug[:, None]).all(-1))
    logits_s = logits_from_similarity(similarity_s, negative_times[0], equal_clean.gather(2, negative_times[0]),
                                      per_clone(cluster_labels[0]), cluster_scale)
    logits_t = logits_from_similarity(similarity_t, negative_times[1], equal_aug.gather(2, negative_times[1]),
                                      per_clone(cluster_labels[1]), cluster_scale)
    student_sum = contrastive_loss_sum(logits_s, mask)
    teacher_sum = contrastive_loss_sum(logits_t, mask)

    return weighted_aqc_terms(config, out, student_sum, teacher_sum, denominator, marginal, penalty, temperature)


def _student_length(config, frames: int, keep: torch.BoolTensor) -> int:
    """Packed length of the students' input: the inverse block mask's budget (no data needed; a given mask that
    keeps more is refused), or with span masks the batch's largest kept count (a host synchronisation)."""
    if config.efficient_mask_kind == "inverse_block":
        budget = kept_frames_budget(frames, config.efficient_mask_prob, config.efficient_mask_length)
        if not torch.compiler.is_compiling():
            most = int(keep.sum(dim=1).max())
            if most > budget:
                raise ValueError(f"a clone keeps {most} frames, more than the inverse block mask's {budget} for "
                                 f"{frames} frames (efficient_mask_prob {config.efficient_mask_prob}, length "
                                 f"{config.efficient_mask_length}); use efficient_mask_kind='span' for other masks")
        return budget
    return max(1, int(keep.sum(dim=1).max()))


# ----- the step's random draws, up front -----------------------------------------------------------------------------
@dataclass
class EfficientStepRandomness:
    """Every random draw of one efficient-mode step (`sample_efficient_randomness`), the fields of the standard mode's
    `StepRandomness` with the cloned shapes (M = `num_clones`), plus the decoder's mask tokens. AQC-only fields are
    None with `objective="data2vec"`.

    Args:
        mask_time_indices: `(batch * M, frames)` bool, each clone's mask (True = masked).
        decoder_mask_noise: `(batch * M, frames, hidden)`, the decoder's mask tokens.
        augmentation: the student view's augmentation draws (one view per utterance).
        gumbel_uniform: `(2 * batch, frames, groups, entries)`, U(0, 1) draws of the Gumbel noise (clean view, then
            augmented view, per utterance); None for a deterministic quantizer.
        sampled_negative_indices: `(2, batch * M, frames, num_negatives)`, into the flattened cloned frames.
        kmeans_init: `(num_clusters,)`, the k-means' starting rows in the pooled `(2 * batch * frames)` frames.
    """

    mask_time_indices: torch.BoolTensor
    decoder_mask_noise: torch.Tensor | None = None
    augmentation: object | None = None
    gumbel_uniform: torch.Tensor | None = None
    sampled_negative_indices: torch.LongTensor | None = None
    kmeans_init: torch.LongTensor | None = None


@torch.no_grad()
def sample_efficient_randomness(model, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                generator: torch.Generator | None = None,
                                mask_time_indices: torch.BoolTensor | None = None,
                                deterministic_quantizer: bool | None = None) -> EfficientStepRandomness:
    """Every draw `efficient_pretraining_forward` makes with `generator` for these inputs, in its order
    (augmentation, masks, mask tokens, Gumbel noise, negatives, k-means start), so that `model(x, m, generator=g)`
    and `model(x, m, randomness=sample_efficient_randomness(model, x, m, g))` give the same losses from the same
    generator state. Dropout (the decoder's input dropout included) stays on the global RNG."""
    from .modeling_data2vec_aqc import frames_for_samples

    config = model.config
    batch, samples = input_values.shape
    device = input_values.device
    clones = batch * config.num_clones
    augmentation = model.augmenter.sample((batch, samples), device, generator) if config.use_aqc else None
    frames = frames_for_samples(config, samples)
    clone_valid = (model.data2vec_audio._get_feature_vector_attention_mask(frames, attention_mask)
                   .repeat_interleave(config.num_clones, dim=0) if attention_mask is not None else None)
    if mask_time_indices is None:
        lengths = clone_valid.sum(-1) if clone_valid is not None else None
        mask_time_indices = sample_clone_masks(config, clones, frames, lengths, generator, device)
    noise = torch.randn((clones, frames, config.hidden_size), generator=generator, device=device)
    randomness = EfficientStepRandomness(mask_time_indices, noise * model.decoder.mask_noise_std, augmentation)
    if not config.use_aqc:
        return randomness
    mask = mask_time_indices.to(torch.bool)
    if clone_valid is not None:
        mask = mask & clone_valid
    quantizer = model.quantizer
    if not ((not quantizer.training) if deterministic_quantizer is None else deterministic_quantizer):
        shape = (2 * batch, frames, quantizer.groups, quantizer.entries)
        randomness.gumbel_uniform = torch.rand(shape, generator=generator, device=device)
    randomness.sampled_negative_indices = torch.stack([sample_negative_indices(mask, config.num_negatives, generator)
                                                       for _ in range(2)])
    mask_count = mask.view(batch, config.num_clones, frames).sum(1).float()
    randomness.kmeans_init = initial_centroid_rows(pooled_frame_weights(mask_count, 2),
                                                   num_clusters_for(frames, config.cluster_factor), generator)
    return randomness
