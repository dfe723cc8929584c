"""Configuration of data2vec-aqc (data2vec + Augmentation, Quantization, Clustering).

`Data2VecAQCConfig` extends transformers' `Data2VecAudioConfig`: every backbone field keeps its stock name and
meaning, so the student backbone is weight-compatible with `Data2VecAudioModel`, and the objective adds the
fields below. Defaults are the paper's base setting (Lodagala, Ghosh and Umesh, ICASSP 2023; data2vec, Baevski et
al. 2022). Fields marked **(choice)** are details the papers leave open; the default is ours and documented.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Data2VecAudioConfig

__all__ = ["Data2VecAQCConfig", "AQC_OBJECTIVES", "EFFICIENT_MASK_KINDS"]

AQC_OBJECTIVES = ("aqc", "data2vec")
EFFICIENT_MASK_KINDS = ("inverse_block", "span")
PAPER_UPDATES = 400_000  # the run length the paper's schedule defaults are sized for
SCHEDULE_FIELDS = ("ema_anneal_steps", "ema_decay_start", "ema_decay_end", "gumbel_temperature_decay")

# Fields that exist only for the self-supervised objective; dropped when exporting a stock data2vec-audio config.
AQC_ONLY_FIELDS = (
    "objective",
    "mask_require_same_masks",
    "feature_grad_mult",
    "ema_decay_start",
    "ema_decay_end",
    "ema_anneal_steps",
    "teacher_feature_encoder",
    "num_target_layers",
    "instance_norm_target_layers",
    "regression_loss_scale",
    "aug_white_noise_prob",
    "aug_white_noise_std",
    "aug_reverb_prob",
    "aug_rt60",
    "aug_background_prob",
    "aug_background_snr_db",
    "aug_babble_prob",
    "num_codevector_groups",
    "num_codevectors_per_group",
    "codevector_dim",
    "proj_codevector_dim",
    "max_gumbel_temperature",
    "min_gumbel_temperature",
    "gumbel_temperature_decay",
    "quantizer_init_std",
    "variance_loss_weight",
    "covariance_loss_weight",
    "contrastive_logits_temperature",
    "num_negatives",
    "student_contrastive_weight",
    "teacher_contrastive_weight",
    "diversity_loss_weight",
    "feature_penalty_weight",
    "cluster_factor",
    "cluster_scale_factor",
    "cluster_iterations",
    "efficient_mode",
    "num_clones",
    "efficient_mask_prob",
    "efficient_mask_length",
    "efficient_mask_kind",
    "decoder_dim",
    "decoder_kernel",
    "decoder_layers",
    "decoder_groups",
    "decoder_input_dropout",
    "decoder_mask_noise_std",
    "sampling_rate",
)


@strict
class Data2VecAQCConfig(Data2VecAudioConfig):
    r"""
    Configuration of a data2vec-aqc model. Inherits every field of [`Data2VecAudioConfig`] (backbone, masking,
    CTC); the defaults of three of them change to the data2vec pretraining recipe: `mask_time_prob=0.65`
    (spec 1), `layerdrop=0.05` (spec 1) and `activation_dropout=0.0` (fairseq data2vec base).

    Objective:
        objective (`str`, defaults to `"aqc"`): `"aqc"` is the full data2vec-aqc objective; `"data2vec"` is plain
            data2vec v1 (regression only: no augmentation, quantizer, contrastive losses or clustering), the
            paper's ablation.

    Masking (spec 1; every transformers masking field keeps its meaning):
        mask_require_same_masks (`bool`, False): trim every utterance's student mask to the batch's smallest
            number of masked frames (fairseq's `require_same_masks`, on in the authors' recipe, with
            `mask_time_min_masks=1`; `convert.py` sets both for their checkpoints). Off by default: with
            utterances of very different lengths it unmasks most of the long ones.

    Feature encoder:
        feature_grad_mult (`float`, 1.0): scale of the gradient that reaches the CNN from the losses (fairseq's
            `feature_grad_mult`; data2vec and data2vec-aqc use 1.0, wav2vec 2.0 0.1).

    Teacher (spec 2, data2vec v1):
        ema_decay_start (`float`, 0.999), ema_decay_end (`float`, 0.9999), ema_anneal_steps (`int`, 30000): EMA
            decay tau rises linearly from start to end over the first `ema_anneal_steps` optimizer updates, then
            stays at end (data2vec `ema_decay`, `ema_end_decay`, `ema_anneal_end_step`).
        teacher_feature_encoder (`bool`, False): **(choice)** give the teacher its own EMA copy of the CNN and
            feature projection (data2vec's `ema_transformer_only=False`). Default (the paper's recipe): the teacher
            encodes the student's CNN features, so the student can shape the teacher's input.
        num_target_layers (`int`, 8): K, the number of top teacher layers averaged into the target
            (data2vec `average_top_k_layers`).
        instance_norm_target_layers (`bool`, True): instance-normalise each layer's FFN output over time per
            channel (padding excluded) before averaging (data2vec `instance_norm_target_layer`).
        regression_loss_scale (`float`, optional): scale of the squared error; `None` means 1/sqrt(hidden_size)
            (data2vec `loss_scale=None`, `loss_beta=0`).

    Augmentation (spec 3, student view only; set a probability to 0 to switch a transform off):
        aug_white_noise_prob (`float`, 0.6), aug_white_noise_std (`(float, float)`, (0.001, 0.7)): additive white
            Gaussian noise, its std drawn uniformly in this range times the utterance's std (paper).
        aug_reverb_prob (`float`, 0.7), aug_rt60 (`(float, float)`, (0.2, 1.0)): reverberation. **(choice)** The
            paper uses sox `reverb`; we convolve with a synthetic room impulse response (direct path, early
            reflections, exponentially decaying noise tail with RT60 drawn in this range, in seconds).
        aug_background_prob (`float`, 0.8), aug_background_snr_db (`(int, int)`, (0, 15)): background noise at an
            integer SNR drawn uniformly in this inclusive range, mixed at the true SNR (the reference code's
            `exp(snr/10)` amplitude formula gives 0.87x the nominal SNR; we do not copy that).
        aug_babble_prob (`float`, 0.5): **(choice)** without a noise bank (MUSAN), the share of background noise
            that is babble (another utterance of the batch); the rest is coloured noise (white, pink or brown).

    Quantizer (spec 4, wav2vec 2.0):
        num_codevector_groups (`int`, 2), num_codevectors_per_group (`int`, 320): G groups of V entries.
        codevector_dim (`int`, 256): size of a concatenated codevector (G x 128).
        proj_codevector_dim (`int`, 256): output size of `project_q` and `contr_proj`.
        max_gumbel_temperature (`float`, 2.0), min_gumbel_temperature (`float`, 0.5),
        gumbel_temperature_decay (`float`, 0.999995): temperature = max(max * decay**updates, min).
        quantizer_init_std (`float`, optional): **(choice)** std of the normal init of the quantizer's logit
            projection; `None` (default) means 1/sqrt(conv_dim[-1]), i.e. unit-variance logits on the layer-normed
            CNN features. fairseq and transformers use 1.0, which gives logits of std sqrt(conv_dim[-1]) (16-23): a
            saturated softmax. Measured on the `small` preset (300-update runs, docs/RESULTS.md): with 1.0 every
            codebook group collapsed to a single entry within 20 updates (pretraining diagnostics, issue 7 notes) (perplexity 1.0, both contrastive losses
            exactly 0 because every negative equals its positive), with warm-up 3 % or 10 %, lr 1e-3 or 5e-4,
            diversity weight 0.1 or 1.0; with the default, perplexity 56/64 per group after 60 updates. Set 1.0 for
            the reference initialisation (a loaded checkpoint is unaffected).

    Cross-contrastive losses and clustering (spec 5):
        contrastive_logits_temperature (`float`, 0.1): kappa, logits are cosine / kappa.
        num_negatives (`int`, 100): distractors per anchor, from the masked frames of the same utterance.
        student_contrastive_weight (`float`, 0.5), teacher_contrastive_weight (`float`, 0.5): weights of L_s, L_t.
        diversity_loss_weight (`float`, 0.1), feature_penalty_weight (`float`, 10.0): wav2vec 2.0 weights.
        cluster_factor (`int`, 16): k-means uses k = max(2, frames // cluster_factor) clusters.
        cluster_scale_factor (`float`, 0.3): a negative in its positive's cluster has its logit multiplied by this.
        cluster_iterations (`int`, 10): **(choice)** Lloyd iterations of the on-device k-means (the reference
            iterates to a tolerance; a fixed count keeps the step free of host synchronisation).

    Anti-collapse regularisation (**not part of the method**; off by default, an experiment of the learning issue):
        variance_loss_weight (`float`, 0.0), covariance_loss_weight (`float`, 0.0): weights of VICReg's variance and
            covariance terms (`contrastive.variance_covariance_terms`; Bardes et al. 2022) of the student's last
            hidden state over the batch's valid frames, added to the loss. At CPU scale every objective collapsed
            the encoder's effective rank from ~100 to ~3 within ~50 updates (docs/LEARNING_NOTES.md); these terms
            penalise exactly that. VICReg's own weights are 25 (variance) and 1 (covariance) against its invariance
            term. Measured with 5.0 / 0.2 (`small` preset, AQC, 600 updates; docs/LEARNING_NOTES.md, session 10): the
            output's rank ended at 64 instead of 7-14 and a linear probe of the spoken digit rose above a random
            encoder's (8-13 points on the development split, 2.5-5.5 over the experiment's 4 folds), but fine-tuned
            WER on unseen speakers stayed level with scratch (66.5 vs 64.2 %, docs/RESULTS.md). Standard mode only.

    data2vec 2.0 efficient mode (spec 8; Baevski et al. 2022, "Efficient self-supervised learning with contextualized
    target representations"; code in `efficient.py`). Off by default; the backbone and the exported CTC model are the
    same either way (the decoder is pretraining-only, like the teacher):
        efficient_mode (`bool`, False): the student encodes only its unmasked frames (no mask tokens in the
            transformer), `num_clones` masked copies of each utterance share one teacher pass, and a light
            convolutional decoder predicts the targets at every position from the student's output plus mask tokens;
            regression (and, with `objective="aqc"`, both contrastive losses) on the masked positions. The targets and
            the EMA are those of the standard mode. `mask_time_prob`/`mask_time_length` (and `final_proj`) are not used
            in this mode, `efficient_mask_*` below are; the backbone's `masked_spec_embed` gets no gradient (it
            stays for fine-tuning, where it masks the CTC model's input).
        num_clones (`int`, 8): M, masked copies (student views) per utterance per step (data2vec 2.0 `clone_batch`).
            The teacher runs once per utterance; its targets are repeated for each clone. **(choice)** With
            `objective="aqc"` the utterance is augmented once and its clones share that augmented view (data2vec 2.0
            clones after the CNN); both views are quantized once per utterance and the k-means runs once, over the
            utterances' frames weighted by the number of clones that mask them.
        efficient_mask_prob (`float`, 0.5), efficient_mask_length (`int`, 5): masked share of each clone and block
            length (spec 8).
        efficient_mask_kind (`str`, `"inverse_block"`): `"inverse_block"` (spec 8) chooses the frames the student
            *keeps*: n = round((1 - prob) L / length) non-overlapping blocks of `length` frames per utterance of L
            valid frames, placed uniformly at random; everything else is masked. **(choice)** Non-overlapping blocks,
            so the masked share is exactly `prob` up to rounding (L - n length frames) and every utterance's kept
            count is known from the padded frame count, so the student's input has a fixed length; data2vec 2.0
            draws overlapping spans and trims every utterance to the batch's smallest count (`require_same_masks`).
            At least one block is kept and at least one valid frame masked. `"span"`: the standard mode's span
            masking (`compute_span_mask`, overlapping spans of `length` with `prob` as `mask_time_prob`, at least one
            span), what data2vec 2.0's released audio recipe uses (`inverse_mask: false`, prob 0.5, length 5);
            overlaps mask less than `prob`, and the student's input length is the largest kept count of the batch
            (one host synchronisation per step, and not traceable by `torch.compile(fullgraph=True)`).
        decoder_dim (`int`, 384), decoder_kernel (`int`, 7), decoder_layers (`int`, 4), decoder_groups (`int`, 16):
            the decoder, data2vec 2.0's audio recipe: `decoder_layers` grouped 1-D convolutions (odd kernel, "same"
            padding) of `decoder_dim` channels, each followed by a layer norm without parameters and GELU, with a
            residual connection around every layer whose input has `decoder_dim` channels; then a linear map to
            `hidden_size` (the prediction). **(choice)** Padded frames are zeroed after each layer, so padding never
            changes a prediction.
        decoder_input_dropout (`float`, 0.1): dropout on the student's output before it enters the decoder (data2vec
            2.0 recipe).
        decoder_mask_noise_std (`float`, 0.01): the mask tokens that fill the masked positions of the decoder's input
            are Gaussian noise of this std (data2vec 2.0 `mask_noise_std`); 0 gives zero tokens.
        **(choice)** With `objective="aqc"`, L_s's anchor is `contr_proj` of the decoder's output (the prediction) at
        the masked positions (the standard mode uses the student's last hidden state, which in this mode exists
        only at unmasked frames); L_t is unchanged (teacher target vs augmented codes), per clone with the clone's
        mask and negatives.

    Audio:
        sampling_rate (`int`, 16000): the rate the model expects; the augmenter's reverb times use it.

    Run length: the schedule defaults above are sized for the paper's 400 k-update run (EMA anneals over its first
    7.5 %, the teacher then averages over ~10 k updates = 2.5 % of the run, the Gumbel temperature reaches its
    minimum after 69 %). A 2 k-update run with those values leaves the teacher at ~20 % of the way from its random
    start and the temperature near 2. `config.scale_schedules_to(total_updates)` rescales `ema_anneal_steps`,
    `ema_decay_start`, `ema_decay_end` and `gumbel_temperature_decay` so that each covers the same *fraction* of
    a run of `total_updates` (the identity at 400 k; the EMA decays are kept at or above 0.99 / 0.999: a teacher
    that follows the student within a few updates collapsed the representations); `training/pretrain.py` does this by default
    (`--scale_schedules_to_run`), and the saved config holds the values used.

    Example:
    ```python
    >>> from data2vec_aqc_hf import Data2VecAQCConfig, Data2VecAQCForPreTraining
    >>> config = Data2VecAQCConfig.from_preset("tiny")
    >>> model = Data2VecAQCForPreTraining(config)
    ```
    """

    model_type = "data2vec-aqc"

    # backbone defaults that differ from Data2VecAudioConfig (pretraining recipe)
    mask_time_prob: float | int = 0.65
    layerdrop: float | int = 0.05
    activation_dropout: float | int = 0.0

    objective: str = "aqc"
    mask_require_same_masks: bool = False
    feature_grad_mult: float | int = 1.0
    # teacher
    ema_decay_start: float = 0.999
    ema_decay_end: float = 0.9999
    ema_anneal_steps: int = 30000
    teacher_feature_encoder: bool = False
    num_target_layers: int = 8
    instance_norm_target_layers: bool = True
    regression_loss_scale: float | None = None
    # augmentation
    aug_white_noise_prob: float | int = 0.6
    aug_white_noise_std: tuple[float, float] | list[float] = (0.001, 0.7)
    aug_reverb_prob: float | int = 0.7
    aug_rt60: tuple[float, float] | list[float] = (0.2, 1.0)
    aug_background_prob: float | int = 0.8
    aug_background_snr_db: tuple[int, int] | list[int] = (0, 15)
    aug_babble_prob: float | int = 0.5
    # quantizer
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 320
    codevector_dim: int = 256
    proj_codevector_dim: int = 256
    max_gumbel_temperature: float = 2.0
    min_gumbel_temperature: float = 0.5
    gumbel_temperature_decay: float = 0.999995
    quantizer_init_std: float | None = None
    # contrastive + clustering
    contrastive_logits_temperature: float = 0.1
    num_negatives: int = 100
    student_contrastive_weight: float = 0.5
    teacher_contrastive_weight: float = 0.5
    diversity_loss_weight: float = 0.1
    feature_penalty_weight: float = 10.0
    cluster_factor: int = 16
    cluster_scale_factor: float = 0.3
    cluster_iterations: int = 10
    # anti-collapse regularisation (not part of the method; off)
    variance_loss_weight: float | int = 0.0
    covariance_loss_weight: float | int = 0.0
    # data2vec 2.0 efficient mode
    efficient_mode: bool = False
    num_clones: int = 8
    efficient_mask_prob: float | int = 0.5
    efficient_mask_length: int = 5
    efficient_mask_kind: str = "inverse_block"
    decoder_dim: int = 384
    decoder_kernel: int = 7
    decoder_layers: int = 4
    decoder_groups: int = 16
    decoder_input_dropout: float | int = 0.1
    decoder_mask_noise_std: float | int = 0.01
    # audio
    sampling_rate: int = 16000

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.objective not in AQC_OBJECTIVES:
            raise ValueError(f"objective must be one of {AQC_OBJECTIVES}, got {self.objective!r}")
        if not 1 <= self.num_target_layers <= self.num_hidden_layers:
            raise ValueError(
                f"num_target_layers={self.num_target_layers} must be between 1 and "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if self.codevector_dim % self.num_codevector_groups:
            raise ValueError(
                f"codevector_dim={self.codevector_dim} must be divisible by "
                f"num_codevector_groups={self.num_codevector_groups}"
            )
        for name in ("aug_white_noise_prob", "aug_reverb_prob", "aug_background_prob", "aug_babble_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.variance_loss_weight < 0 or self.covariance_loss_weight < 0:
            raise ValueError("variance_loss_weight and covariance_loss_weight must be >= 0")
        if self.efficient_mode:
            self._validate_efficient_mode()

    def _validate_efficient_mode(self) -> None:
        if self.variance_loss_weight or self.covariance_loss_weight:
            raise ValueError("variance_loss_weight / covariance_loss_weight apply to the standard mode only "
                             "(efficient_mode=True has no student output at the masked frames)")
        if self.efficient_mask_kind not in EFFICIENT_MASK_KINDS:
            raise ValueError(f"efficient_mask_kind must be one of {EFFICIENT_MASK_KINDS}, "
                             f"got {self.efficient_mask_kind!r}")
        if self.num_clones < 1 or self.efficient_mask_length < 1 or self.decoder_layers < 1:
            raise ValueError("num_clones, efficient_mask_length and decoder_layers must be >= 1")
        if not 0.0 < self.efficient_mask_prob < 1.0:
            raise ValueError(f"efficient_mask_prob must be in (0, 1), got {self.efficient_mask_prob}")
        if self.decoder_kernel % 2 == 0:
            raise ValueError(f"decoder_kernel must be odd (same-length convolution), got {self.decoder_kernel}")
        for name in ("hidden_size", "decoder_dim"):
            if getattr(self, name) % self.decoder_groups:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by "
                                 f"decoder_groups={self.decoder_groups}")

    def scale_schedules_to(self, total_updates: int, reference_updates: int = PAPER_UPDATES,
                           min_ema_decay_start: float = 0.99, min_ema_decay_end: float = 0.999) -> None:
        """Rescale the EMA and Gumbel-temperature schedules, in place, from a run of `reference_updates` (the
        paper's 400 k) to one of `total_updates`: `ema_anneal_steps` in proportion, `gumbel_temperature_decay` as
        `decay ** (reference / total)` (the temperature reaches its floor at the same fraction of the run), and
        `1 - ema_decay_start/end` (the inverse of the teacher's averaging horizon) inversely, **but not below
        `min_ema_decay_start` / `min_ema_decay_end`** (a teacher horizon of at least 100 / 1000 updates). The
        identity when `total_updates == reference_updates`.

        Why the floors (measured, issue 7): scaled all the way, a 300-update run gets tau 0 -> 0.867 (a teacher
        averaging the last ~7 updates, i.e. the student itself); its representations collapsed to ~4 effective
        dimensions and CTC fine-tuning from it was slower than from a random init (loss 3.0 vs 1.9 after 100
        updates, 2.3 vs 0.18 after 200). With tau 0.99 -> 0.999 the same pretraining fine-tuned as fast as scratch
        and reached a lower WER on the unseen development speaker (86.5 vs 95.5 %, 150 labelled utterances).
        Pass 0.0 for both floors to scale all the way."""
        if total_updates < 1:
            raise ValueError(f"total_updates must be >= 1, got {total_updates}")
        ratio = reference_updates / total_updates
        self.ema_anneal_steps = max(1, round(self.ema_anneal_steps / ratio)) if self.ema_anneal_steps > 0 else 0
        self.ema_decay_start = max(min(min_ema_decay_start, self.ema_decay_start),
                                   1.0 - (1.0 - self.ema_decay_start) * ratio)
        self.ema_decay_end = max(min(min_ema_decay_end, self.ema_decay_end), 1.0 - (1.0 - self.ema_decay_end) * ratio)
        self.gumbel_temperature_decay = self.gumbel_temperature_decay ** ratio

    @property
    def use_aqc(self) -> bool:
        return self.objective == "aqc"

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Data2VecAQCConfig":
        """`"base"`: the paper's 95M model. `"small"`: 4.3 M parameters, what learns speech in minutes on 2 CPU cores
        (the learning experiment and the README demo). `"tiny"`: 0.2 M parameters, for unit tests only (too small
        to fit even its training speakers)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_data2vec_audio_config(self) -> Data2VecAudioConfig:
        """The stock `Data2VecAudioConfig` with the same backbone (AQC-only fields dropped)."""
        values = self.to_dict()
        for key in (*AQC_ONLY_FIELDS, "model_type", "transformers_version", "auto_map", "architectures"):
            values.pop(key, None)
        return Data2VecAudioConfig(**values)


PRESETS: dict[str, dict] = {
    "base": {},
    # CPU scale (docs/RESULTS.md, the learning experiment): 4 post-LN layers of 256, a 7-layer CNN with the base strides (20 ms frames, 400
    # sample receptive field) whose early, high-rate layers are narrow (they dominate the cost); no dropout (it
    # kept a model this size on the all-blank CTC plateau); 5-frame mask spans with at least one span, because
    # clips of short words are 10-50 frames (10-frame spans with two forced would mask most of a spoken digit).
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        conv_dim=(32, 64, 128, 128, 256, 256, 256),
        num_conv_pos_embeddings=8,  # 8 grouped positional conv layers (kernel conv_pos_kernel_size=19; base: 5)
        num_conv_pos_embedding_groups=16,
        num_target_layers=3,
        mask_time_length=5,
        mask_time_min_masks=1,
        num_codevectors_per_group=64,
        codevector_dim=128,
        proj_codevector_dim=128,
        num_negatives=20,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
        # (measured, issue 7) the CNN learns 10x slower than the rest in pretraining, as in wav2vec 2.0: with it,
        # 300 AQC updates fine-tuned to 86.5 % WER on the unseen dev speaker (scratch 95.5 %)
        feature_grad_mult=0.1,
        # efficient mode (off unless efficient_mode=True): a decoder half the encoder's width, as base's 384 for 768
        decoder_dim=128,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(64, 64, 64, 64, 64, 64, 64),
        num_conv_pos_embeddings=2,
        num_conv_pos_embedding_groups=4,
        num_target_layers=2,
        num_codevectors_per_group=32,
        codevector_dim=32,
        proj_codevector_dim=32,
        num_negatives=20,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        decoder_dim=32,
    ),
}
