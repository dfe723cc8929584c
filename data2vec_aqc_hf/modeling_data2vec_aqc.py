"""data2vec-aqc models: the data2vec-audio backbone of transformers plus the AQC pretraining objective.

The backbone modules (`Data2VecAudioModel`, `Data2VecAudioEncoder`, ...) are transformers' own, imported, not
copied; the state-dict names are the stock ones (`data2vec_audio.*`), so a fine-tuned `Data2VecAQCForCTC` exports
to a stock `data2vec-audio` checkpoint with identical weights (see `export.py`).

`Data2VecAQCForPreTraining.forward` follows the paper (spec sections 2-6) top to bottom:
student view (augmented, masked) -> student encoder -> predictions; clean view -> EMA teacher -> targets;
both views' CNN features -> Gumbel quantizer; cross-contrastive losses with k-means down-weighting.

Compiling the step. `torch.compile(model, fullgraph=True)` traces the whole training forward and loss as one graph
when the step's random draws are passed in: `randomness = model.sample_step_randomness(input_values,
attention_mask, generator)` (eager, outside the compiled region) draws everything the forward would draw with
`generator` (augmentation, span mask, Gumbel noise, negatives, k-means start), in the same order, and
`model(input_values, attention_mask, randomness=randomness)` then makes no random draw of its own. Trade-off: the
draws are made eagerly, a few small kernels (and the impulse responses and coloured noise built from them) outside
the compiled graph, in exchange for the same losses as the eager step for the same seed, bit for bit in eager and
within float rounding compiled; drawing inside the graph from the global RNG instead would compile too, but its
random streams differ between eager and compiled (inductor has its own) and a run would not be reproducible across
the two. Dropout and LayerDrop stay on the global RNG as in transformers (under compile inductor's RNG draws them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Data2VecAudioForCTC, Data2VecAudioModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.data2vec.modeling_data2vec_audio import (
    Data2VecAudioEncoder,
    Data2VecAudioFeatureEncoder,
    Data2VecAudioFeatureProjection,
    Data2VecAudioPreTrainedModel,
)
from transformers.utils import ModelOutput

from .augment import AugmentationDraws, WaveformAugmenter, normalize_waveform
from .configuration_data2vec_aqc import Data2VecAQCConfig
from .contrastive import (
    cluster_views,
    contrastive_logits,
    contrastive_loss_sum,
    feature_penalty,
    variance_covariance_terms,
    initial_centroid_rows,
    num_clusters_for,
    pooled_frame_weights,
    weighted_aqc_terms,
)
from .efficient import ConvDecoder, efficient_pretraining_forward, sample_efficient_randomness
from .masking import compute_span_mask, sample_negative_indices
from .profiling import profiled
from .quantizer import (
    GumbelProductQuantizer,
    gumbel_temperature,
    masked_mean_probs,
)
from .teacher import FeedForwardRecorder, average_layer_targets, ema_decay, ema_update_

__all__ = [
    "Data2VecAQCPreTrainedModel",
    "Data2VecAQCModel",
    "Data2VecAQCForPreTraining",
    "Data2VecAQCForCTC",
    "Data2VecAQCForPreTrainingOutput",
    "StepRandomness",
    "receptive_field",
    "frames_for_samples",
    "samples_for_frames",
    "minimum_pretraining_samples",
    "validate_input_values",
]

# Weights that exist only in pretraining checkpoints; a CTC or base model drops them silently on load.
PRETRAINING_ONLY_KEYS = [r"^teacher(\.|_feature_)", r"^quantizer\.", r"^project_q\.", r"^final_proj\.", r"^contr_proj\.",
                         r"^decoder\.", r"^num_updates$"]


AUTO_MAP = {
    "AutoConfig": "configuration_data2vec_aqc.Data2VecAQCConfig",
    "AutoModel": "modeling_data2vec_aqc.Data2VecAQCModel",
    "AutoModelForPreTraining": "modeling_data2vec_aqc.Data2VecAQCForPreTraining",
    "AutoModelForCTC": "modeling_data2vec_aqc.Data2VecAQCForCTC",
}


def receptive_field(config) -> int:
    """Samples seen by one output frame of the CNN feature encoder (400 for the base model)."""
    field, jump = 1, 1
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * jump
        jump *= stride
    return field


def frames_for_samples(config, samples: int) -> int:
    """Output frames of the CNN feature encoder for `samples` input samples (`floor((L - kernel) / stride) + 1` per
    layer, as transformers' `_get_feat_extract_output_lengths`)."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = (samples - kernel) // stride + 1
    return samples


def samples_for_frames(config, frames: int) -> int:
    """The fewest input samples for which the CNN feature encoder gives `frames` output frames (inverse of its
    output-length formula, `floor((L - kernel) / stride) + 1` per layer)."""
    samples = max(1, frames)
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        samples = (samples - 1) * stride + kernel
    return samples


def minimum_pretraining_samples(config) -> int:
    """The shortest clip pretraining can use: enough frames for one mask span of `mask_time_length` plus one
    unmasked frame (and two masked frames, so that a frame has a negative)."""
    return samples_for_frames(config, max(config.mask_time_length + 1, 3))


def validate_input_values(input_values, attention_mask, config) -> None:
    """Raise a `ValueError` that names the problem for inputs the model cannot use: wrong rank, empty batch, audio
    shorter than the CNN's receptive field, NaN or infinite samples. Data-dependent checks cost one host sync and
    are skipped while compiling."""
    if not isinstance(input_values, torch.Tensor):
        raise ValueError(f"input_values must be a torch.Tensor of shape (batch, samples), got {type(input_values)}")
    if input_values.dim() != 2:
        raise ValueError(
            f"input_values must have shape (batch, samples) (mono audio at {config.sampling_rate} Hz), "
            f"got rank {input_values.dim()} with shape {tuple(input_values.shape)}"
        )
    if input_values.shape[0] == 0:
        raise ValueError("input_values is an empty batch (batch size 0)")
    field = receptive_field(config)
    if input_values.shape[1] < field:
        raise ValueError(
            f"audio of {input_values.shape[1]} samples is shorter than the feature encoder's receptive field "
            f"({field} samples, {1000 * field / config.sampling_rate:.0f} ms at {config.sampling_rate} Hz)"
        )
    if attention_mask is not None and attention_mask.shape != input_values.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_values {tuple(input_values.shape)}"
        )
    if torch.compiler.is_compiling():
        return
    finite = torch.isfinite(input_values).all()
    shortest = attention_mask.sum(-1).min() if attention_mask is not None else torch.tensor(field)
    finite, shortest = torch.stack([finite.long().cpu(), shortest.long().cpu()]).tolist()
    if not finite:
        raise ValueError("input_values contains NaN or infinite samples")
    if shortest < field:
        raise ValueError(
            f"an utterance has {shortest} valid samples (attention_mask), fewer than the feature encoder's "
            f"receptive field of {field} samples"
        )


@profiled("cnn")
def conv_features(feature_encoder: Data2VecAudioFeatureEncoder, waveform: torch.Tensor) -> torch.Tensor:
    """CNN features `(batch, frames, channels)` of `waveform` `(batch, samples)`: transformers'
    `Data2VecAudioFeatureEncoder` conv layers applied in turn. Its own `forward` sets `requires_grad = True` on the
    waveform in training (for reentrant gradient checkpointing), which `torch.compile` cannot trace (a graph break)
    and which makes autograd compute a gradient of the waveform that nothing uses; with gradient checkpointing on,
    the stock `forward` runs."""
    if any(layer.gradient_checkpointing for layer in feature_encoder.conv_layers):
        return feature_encoder(waveform).transpose(1, 2)
    hidden_states = waveform[:, None]
    for conv_layer in feature_encoder.conv_layers:
        hidden_states = conv_layer(hidden_states)
    return hidden_states.transpose(1, 2)


def encode_with_layer_mask(encoder: Data2VecAudioEncoder, hidden_states: torch.Tensor,
                           attention_mask: torch.Tensor | None, keep: torch.BoolTensor) -> torch.Tensor:
    """transformers' `Data2VecAudioEncoder.forward` (same modules, same operations) with LayerDrop as a mask: layer
    `i` runs on every step and its output is kept where `keep[i]`, else its input passes on. transformers' own
    `if torch.rand([]) < layerdrop` is data-dependent control flow that `torch.compile(fullgraph=True)` cannot trace;
    the cost is the dropped layers' compute, and their parameters get a zero gradient instead of none (AdamW then
    still applies its momentum and weight decay to them that step). Returns the last hidden state."""
    if attention_mask is not None:  # padded frames are zero, as in transformers
        hidden_states = hidden_states.masked_fill(~attention_mask.bool()[..., None], 0.0)
    attention_mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden_states,
                                               attention_mask=attention_mask)
    hidden_states = hidden_states + encoder.pos_conv_embed(hidden_states)
    hidden_states = encoder.dropout(encoder.layer_norm(hidden_states))
    for index, layer in enumerate(encoder.layers):
        hidden_states = torch.where(keep[index], layer(hidden_states, attention_mask=attention_mask), hidden_states)
    return hidden_states


class Data2VecAQCPreTrainedModel(Data2VecAudioPreTrainedModel):
    """Shared config class and weight initialisation; the backbone prefix stays `data2vec_audio` (stock names)."""

    config_class = Data2VecAQCConfig
    config: Data2VecAQCConfig
    base_model_prefix = "data2vec_audio"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`; the config's `auto_map` names every class of the package (not just
        the saved one), so that with `trust_remote_code=True` and without this package installed, `AutoModel`,
        `AutoModelForPreTraining` and `AutoModelForCTC` all load any of our checkpoints."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GumbelProductQuantizer):
            std = self.config.quantizer_init_std
            init.normal_(module.weight_proj.weight, mean=0.0,
                         std=module.weight_proj.in_features ** -0.5 if std is None else std)
            init.zeros_(module.weight_proj.bias)
            init.uniform_(module.codevectors)


class Data2VecAQCModel(Data2VecAQCPreTrainedModel, Data2VecAudioModel):
    """The bare data2vec-aqc encoder: transformers' `Data2VecAudioModel` with a `Data2VecAQCConfig`."""

    _keys_to_ignore_on_load_unexpected = PRETRAINING_ONLY_KEYS

    def forward(self, input_values, attention_mask=None, mask_time_indices=None, **kwargs):
        validate_input_values(input_values, attention_mask, self.config)
        return super().forward(input_values, attention_mask=attention_mask, mask_time_indices=mask_time_indices,
                               **kwargs)


class Data2VecAQCForCTC(Data2VecAQCPreTrainedModel, Data2VecAudioForCTC):
    """CTC head on the data2vec-aqc backbone; weight-identical to transformers' `Data2VecAudioForCTC` and exportable
    as one with `data2vec_aqc_hf.export.save_as_data2vec_audio`. Loading a pretraining checkpoint drops the
    teacher and pretraining heads and initialises only `lm_head`."""

    _keys_to_ignore_on_load_unexpected = PRETRAINING_ONLY_KEYS

    def forward(self, input_values, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        validate_input_values(input_values, attention_mask, self.config)
        if input_values.dtype != self.dtype:  # int16 PCM, float64 arrays: cast as the pretraining model does
            input_values = input_values.to(self.dtype)
        return super().forward(input_values, attention_mask=attention_mask, labels=labels, **kwargs)


@dataclass
class Data2VecAQCForPreTrainingOutput(ModelOutput):
    """Output of [`Data2VecAQCForPreTraining`]. Losses are per masked frame unless stated; AQC-only terms are
    `None` with `objective="data2vec"`.

    Args:
        loss: total loss `(L_reg_sum + w_s CE_s_sum + w_t CE_t_sum) / N_masked + w_div L_div + w_pen L_pen`
            (+ the weighted VICReg terms when `variance_loss_weight` / `covariance_loss_weight` is set).
        regression_loss: sum over masked frames of ||pred - target||^2 * scale, divided by N_masked.
        student_contrastive_loss: L_s summed over masked frames / N_masked (student vs clean codes).
        teacher_contrastive_loss: L_t summed over masked frames / N_masked (teacher vs augmented codes).
        diversity_loss: (G*V - perplexity) / (G*V) over the clean view's masked frames (the authors' code).
        feature_penalty: mean square of the clean view's CNN features (valid frames).
        variance_loss / covariance_loss: VICReg's terms of the student's last hidden state over the valid frames
            (only when `variance_loss_weight` / `covariance_loss_weight` is set; not part of the method).
        num_masked_frames: N_masked.
        target_std / prediction_std: std over masked frames per channel, averaged over channels (collapse -> 0).
        codebook_perplexity: perplexity of each codebook group `(G,)` (clean view, masked frames).
        gumbel_temperature: the current Gumbel temperature. ema_decay: the decay of the EMA step that made the
            current teacher (decay(num_updates)).
        mask_time_indices: the student's mask `(batch, frames)`; efficient mode: every clone's `(batch * num_clones,
            frames)`.
        last_hidden_state: the student's last hidden state `(batch, frames, hidden)`; efficient mode: at the kept
            frames only, packed `(batch * num_clones, kept frames, hidden)` (`efficient.gather_kept_frames`).
    """

    loss: torch.FloatTensor | None = None
    regression_loss: torch.FloatTensor | None = None
    student_contrastive_loss: torch.FloatTensor | None = None
    teacher_contrastive_loss: torch.FloatTensor | None = None
    diversity_loss: torch.FloatTensor | None = None
    feature_penalty: torch.FloatTensor | None = None
    variance_loss: torch.FloatTensor | None = None
    covariance_loss: torch.FloatTensor | None = None
    num_masked_frames: torch.Tensor | None = None
    target_std: torch.FloatTensor | None = None
    prediction_std: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    gumbel_temperature: torch.FloatTensor | None = None
    ema_decay: torch.FloatTensor | None = None
    mask_time_indices: torch.BoolTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class StepRandomness:
    """Every random draw of one pretraining step, from [`Data2VecAQCForPreTraining.sample_step_randomness`]; passed
    to the forward as `randomness`, it makes the step a pure function of weights and inputs (and the global RNG's
    dropout), which is what lets `torch.compile(fullgraph=True)` trace it whole. AQC-only fields are None with
    `objective="data2vec"`.

    Args:
        mask_time_indices: `(batch, frames)` bool, the student's span mask (before removing padded frames).
        sampled_negative_indices: `(2, batch, frames, num_negatives)`, negatives for L_s `[0]` and L_t `[1]`.
        augmentation: the student view's augmentation draws.
        gumbel_uniform: `(2 * batch, frames, groups, entries)`, U(0, 1) draws of the Gumbel noise (clean view, then
            augmented view); None for a deterministic quantizer.
        kmeans_init: `(num_clusters,)`, the k-means' starting rows in the pooled `(2 * batch * frames)` frames.
    """

    mask_time_indices: torch.BoolTensor
    sampled_negative_indices: torch.LongTensor | None = None
    augmentation: AugmentationDraws | None = None
    gumbel_uniform: torch.Tensor | None = None
    kmeans_init: torch.LongTensor | None = None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; the gradient flowing back through it is multiplied by `factor` (fairseq's GradMultiply)."""
    if factor == 1.0:
        return x
    return x * factor + x.detach() * (1.0 - factor)


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sqrt(var over masked frames + 1e-6) per channel, averaged over channels (data2vec's `compute_var`)."""
    w = mask.to(torch.float32)[..., None]
    count = w.sum().clamp(min=2.0)
    x = x.float()
    mean = (x * w).sum((0, 1)) / count
    var = ((x - mean).square() * w).sum((0, 1)) / (count - 1)
    return torch.sqrt(var + 1e-6).mean()


class Data2VecAQCForPreTraining(Data2VecAQCPreTrainedModel):
    """Student (`data2vec_audio`, a stock `Data2VecAudioModel`), EMA teacher (`teacher`, a stock
    `Data2VecAudioEncoder`, never trained by the optimizer), augmenter, quantizer and heads.

    After each optimizer step call `model.update_teacher()`: it moves the teacher toward the student (EMA) and
    advances `num_updates`, which drives the EMA decay and Gumbel temperature schedules and is saved with the
    model so that training resumes exactly.
    """

    def __init__(self, config: Data2VecAQCConfig):
        super().__init__(config)
        self.data2vec_audio = Data2VecAudioModel(config)
        self.teacher = Data2VecAudioEncoder(config)
        if config.teacher_feature_encoder:  # the teacher's own EMA copy of the CNN and projection
            self.teacher_feature_extractor = Data2VecAudioFeatureEncoder(config)
            self.teacher_feature_projection = Data2VecAudioFeatureProjection(config)
        if config.efficient_mode:  # data2vec 2.0: the decoder predicts the targets (efficient.py)
            self.decoder = ConvDecoder(config)
        else:
            self.final_proj = nn.Linear(config.hidden_size, config.hidden_size)
        if config.use_aqc:
            self.augmenter = WaveformAugmenter(config)
            self.quantizer = GumbelProductQuantizer(
                config.conv_dim[-1], config.num_codevector_groups, config.num_codevectors_per_group,
                config.codevector_dim,
            )
            self.project_q = nn.Linear(config.codevector_dim, config.proj_codevector_dim)
            self.contr_proj = nn.Linear(config.hidden_size, config.proj_codevector_dim)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.post_init()
        self.reset_teacher()
        top = self.teacher.layers[-config.num_target_layers:]
        self._target_recorder = FeedForwardRecorder([layer.feed_forward for layer in top])

    # ----- teacher ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher an exact copy of the student's encoder (and, with `teacher_feature_encoder`, of its
        CNN and feature projection) (start of pretraining)."""
        for teacher, student in self._teacher_pairs():
            teacher.load_state_dict(student.state_dict())
            teacher.requires_grad_(False)
            teacher.eval()

    def _teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.teacher, self.data2vec_audio.encoder)]
        if self.config.teacher_feature_encoder:
            pairs += [(self.teacher_feature_extractor, self.data2vec_audio.feature_extractor),
                      (self.teacher_feature_projection, self.data2vec_audio.feature_projection)]
        return pairs

    def train(self, mode: bool = True):
        super().train(mode)
        for teacher, _ in self._teacher_pairs():
            teacher.eval()  # the teacher never uses dropout or layerdrop
        return self

    def current_ema_decay(self) -> torch.Tensor:
        c = self.config
        return ema_decay(self.num_updates, c.ema_decay_start, c.ema_decay_end, c.ema_anneal_steps)

    def current_gumbel_temperature(self) -> torch.Tensor:
        c = self.config
        return gumbel_temperature(self.num_updates, c.max_gumbel_temperature, c.min_gumbel_temperature,
                                  c.gumbel_temperature_decay)

    @torch.no_grad()
    def update_teacher(self) -> float:
        """`num_updates += 1`, then the EMA step `teacher <- tau teacher + (1 - tau) student` with
        tau = decay(num_updates) (positional conv copied, not averaged). Call after every optimizer step. As the
        authors' code: after its k-th update fairseq calls `set_num_updates(k)`, which steps the EMA with decay(k).
        Returns the tau used (also what the next forward reports as `ema_decay`)."""
        self.num_updates += 1
        decay = float(self.current_ema_decay())
        ema_update_(self.teacher, self.data2vec_audio.encoder, decay, copy_prefixes=("pos_conv_embed.",))
        for teacher, student in self._teacher_pairs()[1:]:
            ema_update_(teacher, student, decay)
        return decay

    @torch.no_grad()
    def teacher_targets(self, projected_features: torch.Tensor, frame_valid: torch.Tensor | None) -> torch.Tensor:
        """data2vec targets `(batch, frames, hidden)` in fp32: the teacher encodes the clean, unmasked projected
        features; the FFN outputs (before the residual add) of its top K layers are instance-normalised over time
        (padding excluded) and averaged."""
        self.teacher(projected_features.detach().clone(), attention_mask=frame_valid)
        return average_layer_targets(self._target_recorder.pop(), frame_valid,
                                     self.config.instance_norm_target_layers)

    def student_parameters(self):
        """The trainable parameters (everything but the teacher): what the optimizer should get."""
        return [p for n, p in self.named_parameters() if not n.startswith("teacher") and p.requires_grad]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a checkpoint without teacher weights (a stock data2vec-audio or CTC
        model) starts the teacher as a copy of the loaded student."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if any(key.startswith("teacher") for key in info["missing_keys"]):
            model.reset_teacher()
        model.teacher.requires_grad_(False)
        return (model, info) if want_info else model

    def freeze_feature_encoder(self):
        self.data2vec_audio.freeze_feature_encoder()

    # ----- the step's random draws ------------------------------------------------------------------------------
    def _draw_span_mask(self, batch: int, frames: int, frame_valid, generator, device) -> torch.BoolTensor:
        config = self.config
        frame_lengths = frame_valid.sum(-1) if frame_valid is not None else None
        return compute_span_mask(
            (batch, frames), config.mask_time_prob, config.mask_time_length, frame_lengths,
            config.mask_time_min_masks, generator, device=device, require_same_masks=config.mask_require_same_masks,
        )

    @profiled("contrastive")
    def _draw_negatives(self, mask: torch.BoolTensor, generator) -> torch.LongTensor:
        return torch.stack([sample_negative_indices(mask, self.config.num_negatives, generator) for _ in range(2)])

    @torch.no_grad()
    def sample_step_randomness(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        mask_time_indices: torch.BoolTensor | None = None,
        deterministic_quantizer: bool | None = None,
    ) -> StepRandomness:
        """Every random draw the forward makes for these inputs, drawn here with `generator` (the global RNG if None)
        in the forward's own order: `model(x, m, generator=g)` and `model(x, m, randomness=model.
        sample_step_randomness(x, m, g))` give the same losses bit for bit from the same generator state. Run it
        eagerly and pass the result into a compiled forward: it holds the draws that need a `torch.Generator`, which
        `torch.compile` cannot trace, and the k-means start, which depends on the mask. `mask_time_indices`: use
        this mask and draw the rest; `deterministic_quantizer`: as in the forward (no Gumbel noise drawn).
        With `config.efficient_mode`: `efficient.sample_efficient_randomness` (the cloned shapes)."""
        config = self.config
        if config.efficient_mode:
            return sample_efficient_randomness(self, input_values, attention_mask, generator, mask_time_indices,
                                               deterministic_quantizer)
        batch, samples = input_values.shape
        device = input_values.device
        augmentation = self.augmenter.sample((batch, samples), device, generator) if config.use_aqc else None
        frames = frames_for_samples(config, samples)
        frame_valid = (self.data2vec_audio._get_feature_vector_attention_mask(frames, attention_mask)
                       if attention_mask is not None else None)
        if mask_time_indices is None:
            mask_time_indices = self._draw_span_mask(batch, frames, frame_valid, generator, device)
        randomness = StepRandomness(mask_time_indices=mask_time_indices, augmentation=augmentation)
        if not config.use_aqc:
            return randomness
        mask = mask_time_indices.to(torch.bool)
        if frame_valid is not None:
            mask = mask & frame_valid
        quantizer = self.quantizer
        if not ((not quantizer.training) if deterministic_quantizer is None else deterministic_quantizer):
            shape = (2 * batch, frames, quantizer.groups, quantizer.entries)
            randomness.gumbel_uniform = torch.rand(shape, generator=generator, device=device)
        randomness.sampled_negative_indices = self._draw_negatives(mask, generator)
        randomness.kmeans_init = initial_centroid_rows(pooled_frame_weights(mask, 2),
                                                       num_clusters_for(frames, config.cluster_factor), generator)
        return randomness

    @profiled("student")
    def _encode_student(self, hidden_states: torch.Tensor, frame_valid: torch.Tensor | None) -> torch.Tensor:
        """The student's transformer: transformers' encoder; while compiling a training step with LayerDrop, the
        same computation with the layer choice as a mask (`encode_with_layer_mask`), drawn from the global RNG."""
        encoder = self.data2vec_audio.encoder
        layerdrop = self.config.layerdrop
        if torch.compiler.is_compiling() and encoder.training and layerdrop > 0:
            keep = torch.rand(len(encoder.layers), device=hidden_states.device) >= layerdrop
            return encode_with_layer_mask(encoder, hidden_states, frame_valid, keep)
        return encoder(hidden_states, attention_mask=frame_valid).last_hidden_state

    # ----- the objective -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.BoolTensor | None = None,
        sampled_negative_indices: torch.LongTensor | None = None,
        augmented_input_values: torch.Tensor | None = None,
        cluster_labels: torch.LongTensor | None = None,
        deterministic_quantizer: bool | None = None,
        generator: torch.Generator | None = None,
        normalize_inputs: bool = True,
        randomness: StepRandomness | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Data2VecAQCForPreTrainingOutput:
        r"""
        input_values (`(batch, samples)`): raw or normalised 16 kHz audio, zero-padded; each view is normalised
            per utterance inside the model.
        attention_mask (`(batch, samples)`, optional): 1 for real samples, 0 for padding.
        mask_time_indices (`(batch, frames)` bool, optional): the student's mask; drawn with `generator` if None.
        sampled_negative_indices (`(2, batch, frames, K)` or `(batch, frames, K)`, optional): indices into the
            flattened `(batch * frames)` frames, as in `Wav2Vec2ForPreTraining`; `[0]` for L_s (clean codes),
            `[1]` for L_t (augmented codes); a 3-D tensor serves both.
        augmented_input_values (`(batch, samples)`, optional): the student's augmented audio; skips the augmenter.
        cluster_labels (`(2, batch, frames)`, optional): k-means labels of the clean `[0]` and augmented `[1]`
            quantized frames; skips the k-means.
        deterministic_quantizer (`bool`, optional): hard arg-max codes without Gumbel noise (default: eval mode).
        generator (`torch.Generator`, optional): the source of every random draw of the step (on the inputs'
            device), making a step reproducible from a seed.
        normalize_inputs (`bool`, True): normalise each view per utterance here. False: the views are used as
            given (e.g. normalised over the full utterance before cropping, as the authors' data loader does).
        randomness ([`StepRandomness`], optional): every random draw of the step, from `sample_step_randomness`;
            replaces `generator` and the draws above (not combined with them). The way to run the step under
            `torch.compile(fullgraph=True)`: the forward then draws nothing with a generator.
        With `config.efficient_mode` the step is data2vec 2.0's (`efficient.efficient_pretraining_forward`, whose
        docstring gives the cloned shapes of the draws; `decoder_mask_noise` is passed on from `kwargs`, and
        `randomness` is then what `sample_step_randomness` returns in that mode).
        """
        config = self.config
        if config.efficient_mode:
            return efficient_pretraining_forward(
                self, input_values, attention_mask, mask_time_indices, sampled_negative_indices,
                augmented_input_values, cluster_labels, deterministic_quantizer, generator, normalize_inputs,
                kwargs.get("decoder_mask_noise"), randomness,
            )
        validate_input_values(input_values, attention_mask, config)
        augmentation_draws = gumbel_uniform = kmeans_init = None
        if randomness is not None:
            given = (generator, mask_time_indices, sampled_negative_indices, augmented_input_values, cluster_labels)
            if any(value is not None for value in given):
                raise ValueError("randomness holds every draw of the step: give it without generator, "
                                 "mask_time_indices, sampled_negative_indices, augmented_input_values or cluster_labels")
            mask_time_indices, sampled_negative_indices = (randomness.mask_time_indices,
                                                           randomness.sampled_negative_indices)
            augmentation_draws, gumbel_uniform, kmeans_init = (randomness.augmentation, randomness.gumbel_uniform,
                                                               randomness.kmeans_init)
        batch, samples = input_values.shape
        sample_valid = (attention_mask.bool() if attention_mask is not None
                        else torch.ones_like(input_values, dtype=torch.bool))

        # 1-2. the two views (clean: teacher and the clean quantizer view; augmented: student), their CNN features
        backbone = self.data2vec_audio
        clean, student_features, clean_features, frame_valid = self.views_and_features(
            input_values, attention_mask, sample_valid, augmented_input_values, generator, augmentation_draws,
            normalize_inputs)
        frames = student_features.shape[1]

        # 3. span mask (student only)
        if mask_time_indices is None:
            mask_time_indices = self._draw_span_mask(batch, frames, frame_valid, generator, input_values.device)
        mask = mask_time_indices.to(torch.bool)
        if frame_valid is not None:
            mask = mask & frame_valid

        # 4. student: project, replace masked frames by the learned mask embedding, encode, predict
        student_hidden, student_norm = backbone.feature_projection(student_features)
        mask_embed = backbone.masked_spec_embed.to(student_hidden.dtype)
        student_hidden = torch.where(mask[..., None], mask_embed, student_hidden)
        student_out = self._encode_student(student_hidden, frame_valid)
        prediction = self.final_proj(student_out)

        # 5. teacher: clean, unmasked, pre-dropout projected features -> average of top-K instance-normed FFN outputs
        clean_norm = backbone.feature_projection.layer_norm(clean_features)
        targets = self.clean_view_targets(clean, clean_norm, frame_valid)

        # 6. regression loss (data2vec, loss_beta = 0)
        out, denominator = self.regression_output(prediction, targets, mask, student_out)
        loss = out.regression_loss
        if config.use_aqc:
            aqc_loss = self._aqc_losses(out, clean_features, clean_norm, student_norm, student_out, targets, mask,
                                        frame_valid, sampled_negative_indices, cluster_labels,
                                        deterministic_quantizer, generator, denominator, gumbel_uniform,
                                        kmeans_init)
            loss = loss + aqc_loss
        if config.variance_loss_weight or config.covariance_loss_weight:  # off by default: not part of the method
            out.variance_loss, out.covariance_loss = variance_covariance_terms(student_out, frame_valid)
            loss = (loss + config.variance_loss_weight * out.variance_loss
                    + config.covariance_loss_weight * out.covariance_loss)
        out.loss = loss
        return out

    def _aqc_losses(self, out, clean_features, clean_norm, student_norm, student_out, targets, mask, frame_valid,
                    sampled_negative_indices, cluster_labels, deterministic_quantizer, generator, denominator,
                    gumbel_uniform=None, kmeans_init=None):
        """Quantization (spec 4) and cross-contrastive losses with clustering (spec 5); fills `out`, returns the
        weighted sum added to the regression loss."""
        config = self.config
        batch, frames = mask.shape

        # quantize both views' CNN features in one call; the diversity loss and the perplexity use the clean view's
        # masked frames only, as the authors' code (its `prob_perplexity` comes from the clean view's quantizer call)
        quantized_clean, quantized_aug, marginal, temperature = self.quantize_views(
            clean_norm, student_norm, mask, deterministic_quantizer, generator, gumbel_uniform)
        penalty = feature_penalty(clean_features, frame_valid)  # wav2vec 2.0's, on the clean view's valid frames

        # negatives: other masked frames of the same utterance, one set per loss
        if sampled_negative_indices is None:
            sampled_negative_indices = self._draw_negatives(mask, generator)
        elif sampled_negative_indices.dim() == 3:
            sampled_negative_indices = sampled_negative_indices[None].expand(2, -1, -1, -1)

        # clustering: one k-means over both views' masked quantized frames
        if cluster_labels is None:
            cluster_labels = cluster_views(torch.stack([quantized_clean, quantized_aug]), mask,
                                           config.cluster_factor, config.cluster_iterations, generator, kmeans_init)

        kappa, cluster_scale = config.contrastive_logits_temperature, config.cluster_scale_factor
        student_anchor = self.contr_proj(student_out)
        teacher_anchor = self.contr_proj(targets.to(student_anchor.dtype))
        logits_s = contrastive_logits(student_anchor, quantized_clean, sampled_negative_indices[0], kappa,
                                      cluster_labels[0], cluster_scale)
        logits_t = contrastive_logits(teacher_anchor, quantized_aug, sampled_negative_indices[1], kappa,
                                      cluster_labels[1], cluster_scale)
        student_sum = contrastive_loss_sum(logits_s, mask)
        teacher_sum = contrastive_loss_sum(logits_t, mask)

        return weighted_aqc_terms(config, out, student_sum, teacher_sum, denominator, marginal, penalty, temperature)

    def views_and_features(self, input_values, attention_mask, sample_valid, augmented_input_values=None,
                           generator=None, augmentation_draws=None, normalize_inputs=True):
        """The step's two views and their CNN features (spec 1-2): the clean view (normalised per utterance unless
        `normalize_inputs` is False) and, with AQC, the augmented student view (`augmented_input_values`, else drawn
        by the augmenter); without AQC the student sees the clean view. Returns `(clean, student_features,
        clean_features, frame_valid)`: the clean waveform, both views' features `(batch, frames, channels)` with
        `feature_grad_mult` applied, and the frame padding mask (None without `attention_mask`)."""
        config = self.config
        normalize = normalize_waveform if normalize_inputs else (lambda values, valid: values * valid)
        clean = normalize(input_values.float(), sample_valid)
        if config.use_aqc:
            if augmented_input_values is None:
                augmented_input_values = self.augmenter(input_values, sample_valid, generator, augmentation_draws)
            elif augmented_input_values.shape != input_values.shape:
                raise ValueError(
                    f"augmented_input_values shape {tuple(augmented_input_values.shape)} differs from "
                    f"input_values {tuple(input_values.shape)}"
                )
            student_view = normalize(augmented_input_values.float(), sample_valid)
        else:
            student_view = clean
        backbone = self.data2vec_audio
        student_features = scale_gradient(conv_features(backbone.feature_extractor, student_view),
                                          config.feature_grad_mult)
        frames = student_features.shape[1]
        frame_valid = (backbone._get_feature_vector_attention_mask(frames, attention_mask)
                       if attention_mask is not None else None)
        clean_features = (scale_gradient(conv_features(backbone.feature_extractor, clean), config.feature_grad_mult)
                          if config.use_aqc else student_features)
        return clean, student_features, clean_features, frame_valid

    @torch.no_grad()
    @profiled("teacher")
    def clean_view_targets(self, clean, clean_norm, frame_valid):
        """The teacher's targets (spec 3) from the clean view: its own EMA CNN on the waveform `clean` with
        `teacher_feature_encoder`, else the student's CNN features (`clean_norm`, layer-normed) projected."""
        if self.config.teacher_feature_encoder:
            projection = self.teacher_feature_projection
            teacher_in = projection.projection(projection.layer_norm(conv_features(self.teacher_feature_extractor,
                                                                                   clean)))
        else:
            teacher_in = self.data2vec_audio.feature_projection.projection(clean_norm)
        return self.teacher_targets(teacher_in, frame_valid)

    @profiled("regression")
    def regression_output(self, prediction, targets, mask, student_out):
        """data2vec's regression loss (squared error summed over channels, scaled by 1/sqrt(hidden) unless
        `regression_loss_scale` is set, averaged over the masked frames `mask` `(batch, frames)`) as the start of the
        pretraining output, with the step's statistics; also returns the masked-frame count (>= 1), the denominator
        of every per-frame loss."""
        config = self.config
        mask_f = mask.to(torch.float32)
        num_masked = mask_f.sum()
        denominator = num_masked.clamp(min=1.0)
        scale = config.regression_loss_scale or 1.0 / math.sqrt(config.hidden_size)
        squared_error = (prediction.float() - targets).square().sum(-1) * scale
        out = Data2VecAQCForPreTrainingOutput(
            regression_loss=(squared_error * mask_f).sum() / denominator,
            num_masked_frames=num_masked,
            target_std=masked_std(targets, mask).detach(),
            prediction_std=masked_std(prediction, mask).detach(),
            ema_decay=self.current_ema_decay().float(),
            mask_time_indices=mask,
            last_hidden_state=student_out,
        )
        return out, denominator

    @profiled("quantizer")
    def quantize_views(self, clean_norm, student_norm, frame_weights, deterministic_quantizer=False, generator=None,
                       gumbel_uniform=None):
        """Quantize both views' normed CNN features in one quantizer call (spec 4). Returns the projected codes of
        the clean and the augmented view, the clean view's code marginal over frames weighted by `frame_weights`
        (the masked frames: the authors' `prob_perplexity` comes from the clean view's call only) and the Gumbel
        temperature used."""
        batch = clean_norm.shape[0]
        temperature = self.current_gumbel_temperature().to(clean_norm.device)
        codes, soft_probs = self.quantizer(torch.cat([clean_norm, student_norm]), temperature,
                                           deterministic_quantizer, generator, gumbel_uniform)
        marginal = masked_mean_probs(soft_probs[:batch], frame_weights)
        quantized = self.project_q(codes)
        return quantized[:batch], quantized[batch:], marginal, temperature
