"""Batched, on-device waveform augmentation for the student view (spec section 3).

Each function is small, pure and padding-aware: `valid` is a boolean `(batch, samples)` mask of real audio; padded
samples stay exactly zero. Random draws come from an optional `torch.Generator`, so an augmentation is
reproducible from a seed. The paper builds the augmented copy per utterance on the CPU (torchaudio-augmentations
and sox); here the whole batch is augmented inside the training step on the accelerator.

`WaveformAugmenter.sample` makes all of a batch's draws up front (`AugmentationDraws`) and `WaveformAugmenter.forward`
applies them: the application has no random draw, so it compiles into the training step's graph while the draws,
with their `torch.Generator`, stay outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .profiling import profiled

_EPS = 1e-8


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (x * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)


def masked_power(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean square over the valid samples of each utterance, `(batch, 1)`."""
    return _masked_mean(x.square(), valid)


def normalize_waveform(x: torch.Tensor, valid: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its valid samples (as `Wav2Vec2FeatureExtractor`, which uses
    `(x - mean) / sqrt(var + 1e-7)`); padding stays zero."""
    valid = valid.to(x.dtype)
    mean = _masked_mean(x, valid)
    var = _masked_mean((x - mean).square(), valid)
    return (x - mean) / torch.sqrt(var + eps) * valid


def add_white_noise(x, valid, std_range, generator=None):
    """Add Gaussian noise whose std is `U(std_range) x` the utterance's std."""
    batch = x.shape[0]
    lo, hi = std_range
    frac = lo + (hi - lo) * torch.rand(batch, 1, generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return add_scaled_noise(x, valid, noise, frac)


def add_scaled_noise(x, valid, noise, std_fraction):
    """`x + noise * std_fraction * std(x)` over the valid samples: white noise `std_fraction` `(batch, 1)` times the
    utterance's std, from standard-normal `noise`."""
    valid = valid.to(x.dtype)
    std = torch.sqrt(masked_power(x - _masked_mean(x, valid), valid))
    return x + noise * std_fraction * std * valid


def synthetic_rir(rt60: torch.Tensor, length: int, sample_rate: int, generator=None, num_reflections: int = 8):
    """Room impulse responses `(batch, length)`: a unit direct path at t=0, `num_reflections` early reflections in
    1-50 ms, and a Gaussian tail decaying by 60 dB over `rt60` seconds (one value per utterance)."""
    batch, device = rt60.shape[0], rt60.device
    t = torch.arange(length, device=device) / sample_rate
    envelope = torch.exp(-math.log(1000.0) * t[None, :] / rt60[:, None])  # amplitude -60 dB at rt60
    tail = 0.05 * torch.randn(batch, length, generator=generator, device=device) * envelope
    tail[:, : int(0.005 * sample_rate)] = 0.0  # the diffuse tail starts after 5 ms
    rir = tail
    rir[:, 0] = 1.0
    lo, hi = max(1, int(0.001 * sample_rate)), min(length - 1, int(0.05 * sample_rate))
    if hi > lo:
        delays = torch.randint(lo, hi, (batch, num_reflections), generator=generator, device=device)
        sign = torch.randint(0, 2, (batch, num_reflections), generator=generator, device=device) * 2 - 1
        gains = (0.2 + 0.6 * torch.rand(batch, num_reflections, generator=generator, device=device)) * sign
        gains = gains * torch.gather(envelope, 1, delays)
        rir = rir.scatter_add(1, delays, gains)
    return rir


def reverberate(x: torch.Tensor, valid: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve each utterance with its impulse response (FFT), crop to the input length, restore its RMS level."""
    return reverberate_with_spectrum(x, valid, rir_spectrum(rir, x.shape[-1]))


def rir_spectrum(rir: torch.Tensor, signal_length: int) -> torch.Tensor:
    """`rfft` of the impulse responses `(batch, rir_length)` at the FFT length that convolves them with a signal of
    `signal_length` samples without wrap-around (the next power of two)."""
    n = signal_length + rir.shape[-1] - 1
    return torch.fft.rfft(rir, 1 << (n - 1).bit_length())


def reverberate_with_spectrum(x: torch.Tensor, valid: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    """`reverberate` with the impulse responses given as their `rir_spectrum`; the FFT length is read off its shape,
    so that this traces with a symbolic signal length under `torch.compile` (the power of two is not symbolic)."""
    valid = valid.to(x.dtype)
    n_fft = 2 * (spectrum.shape[-1] - 1)
    wet = torch.fft.irfft(torch.fft.rfft(x * valid, n_fft) * spectrum, n_fft)[..., : x.shape[-1]]
    wet = wet * valid
    gain = torch.sqrt(masked_power(x, valid) / masked_power(wet, valid).clamp(min=_EPS))
    return wet * gain


def coloured_noise(shape, exponent: torch.Tensor, generator=None, device=None) -> torch.Tensor:
    """Noise with power spectrum ~ 1/f**exponent per row (0 white, 1 pink, 2 brown), unit variance."""
    batch, length = shape
    white = torch.randn(batch, length, generator=generator, device=device)
    spectrum = torch.fft.rfft(white)
    freqs = torch.fft.rfftfreq(length, device=device)
    freqs[0] = freqs[1] if length > 1 else 1.0
    shaped = torch.fft.irfft(spectrum / freqs[None, :] ** (exponent[:, None] / 2), length)
    shaped = shaped - shaped.mean(-1, keepdim=True)
    return shaped / shaped.std(-1, keepdim=True).clamp(min=_EPS)


def crop_noise_bank(bank, bank_lengths, length, batch, generator=None):
    """Pick one clip per utterance from a zero-padded bank `(clips, max_len)`, at a random offset, cropped or
    zero-padded to `length` samples."""
    device = bank.device
    clip = torch.randint(0, bank.shape[0], (batch,), generator=generator, device=device)
    clip_len = bank_lengths[clip]
    slack = (clip_len - length).clamp(min=0)
    offset = torch.floor(torch.rand(batch, generator=generator, device=device) * (slack + 1)).long()
    pos = offset[:, None] + torch.arange(length, device=device)[None, :]
    inside = pos < clip_len[:, None]
    pos = pos.clamp(max=bank.shape[1] - 1)
    return bank[clip[:, None], pos] * inside


def mix_at_snr(x: torch.Tensor, noise: torch.Tensor, valid: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """`x + g * noise` with g chosen so that 10 log10(P_x / P_(g noise)) = snr_db over the valid samples (the true
    SNR; a silent noise clip adds nothing)."""
    valid = valid.to(x.dtype)
    noise = noise * valid
    p_signal, p_noise = masked_power(x, valid), masked_power(noise, valid)
    gain = torch.sqrt(p_signal / (p_noise.clamp(min=_EPS) * 10.0 ** (snr_db[:, None] / 10.0)))
    gain = torch.where(p_noise > _EPS, gain, torch.zeros_like(gain))
    return x + gain * noise


def _coin(p: float, batch: int, generator, device) -> torch.Tensor:
    return (torch.rand(batch, 1, generator=generator, device=device) < p)


@dataclass
class AugmentationDraws:
    """Every random quantity of one batch's augmentation (`WaveformAugmenter.sample`); what depends on the draws
    alone (the room impulse responses' spectra, the coloured or noise-bank noise) is computed from them there too. The fields
    of an augmentation that is off (probability 0) are None.

    Args:
        white_noise_std: `(batch, 1)` the white noise's std as a fraction of the utterance's std.
        white_noise: `(batch, samples)` standard-normal noise.
        apply_white_noise / apply_reverb / apply_background: `(batch, 1)` bool, whether the utterance gets it.
        rir_spectrum: `(batch, n_fft // 2 + 1)` the room impulse responses' spectra (`rir_spectrum`, at the FFT
            length of their convolution with the batch).
        snr_db: `(batch,)` background-noise SNR in dB.
        background_noise: `(batch, samples)` a noise-bank crop or coloured noise per utterance.
        use_babble: `(batch, 1)` bool, babble (the batch's previous utterance) instead of `background_noise`; None
            with a noise bank or a batch of one.
    """

    white_noise_std: torch.Tensor | None = None
    white_noise: torch.Tensor | None = None
    apply_white_noise: torch.BoolTensor | None = None
    rir_spectrum: torch.Tensor | None = None
    apply_reverb: torch.BoolTensor | None = None
    snr_db: torch.Tensor | None = None
    background_noise: torch.Tensor | None = None
    use_babble: torch.BoolTensor | None = None
    apply_background: torch.BoolTensor | None = None


class WaveformAugmenter(nn.Module):
    """The student view of data2vec-aqc: white noise, reverberation, background noise, in that order, each applied
    to an utterance with its own probability. Holds no parameters; an optional noise bank (e.g. MUSAN
    `noise/free-sound`, loaded by the caller) is a non-persistent buffer set with `set_noise_bank`."""

    def __init__(self, config):
        super().__init__()
        self.white_prob, self.white_std = config.aug_white_noise_prob, tuple(config.aug_white_noise_std)
        self.reverb_prob, self.rt60 = config.aug_reverb_prob, tuple(config.aug_rt60)
        self.background_prob, self.snr_db = config.aug_background_prob, tuple(config.aug_background_snr_db)
        self.babble_prob = config.aug_babble_prob
        self.sample_rate = config.sampling_rate
        self.register_buffer("noise_bank", None, persistent=False)
        self.register_buffer("noise_bank_lengths", None, persistent=False)

    def set_noise_bank(self, clips: list[torch.Tensor] | None) -> None:
        """Use these 1-D noise clips (at the model's sampling rate) for background noise; `None` goes back to babble
        and coloured noise."""
        if not clips:
            self.noise_bank = self.noise_bank_lengths = None
            return
        device = self.noise_bank.device if self.noise_bank is not None else None
        lengths = torch.tensor([len(c) for c in clips], dtype=torch.long, device=device)
        bank = torch.zeros(len(clips), int(lengths.max()), device=device)
        for i, clip in enumerate(clips):
            bank[i, : len(clip)] = clip.to(bank)
        self.noise_bank, self.noise_bank_lengths = bank, lengths

    def sample(self, shape: tuple[int, int], device=None, generator=None) -> AugmentationDraws:
        """All random draws for augmenting a `(batch, samples)` batch, in the order `forward` uses them."""
        batch, length = shape
        draws = AugmentationDraws()
        if self.white_prob > 0:
            lo, hi = self.white_std
            draws.white_noise_std = lo + (hi - lo) * torch.rand(batch, 1, generator=generator, device=device)
            draws.white_noise = torch.randn(shape, generator=generator, device=device)
            draws.apply_white_noise = _coin(self.white_prob, batch, generator, device)
        if self.reverb_prob > 0:
            lo, hi = self.rt60
            rt60 = lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)
            rir = synthetic_rir(rt60, max(2, int(math.ceil(hi * self.sample_rate))), self.sample_rate, generator)
            draws.rir_spectrum = rir_spectrum(rir, length)
            draws.apply_reverb = _coin(self.reverb_prob, batch, generator, device)
        if self.background_prob > 0:
            lo, hi = self.snr_db
            draws.snr_db = torch.randint(int(lo), int(hi) + 1, (batch,), generator=generator, device=device).float()
            if self.noise_bank is not None:
                draws.background_noise = crop_noise_bank(self.noise_bank, self.noise_bank_lengths, length, batch,
                                                         generator)
            else:
                exponent = torch.randint(0, 3, (batch,), generator=generator, device=device).float()
                draws.background_noise = coloured_noise(shape, exponent, generator, device)
                if batch > 1:  # babble: the next utterance of the (randomly ordered) batch
                    draws.use_babble = _coin(self.babble_prob, batch, generator, device)
            draws.apply_background = _coin(self.background_prob, batch, generator, device)
        return draws

    @profiled("augmentation")
    def forward(self, x: torch.Tensor, valid: torch.Tensor, generator=None,
                draws: AugmentationDraws | None = None) -> torch.Tensor:
        """Augmented copy of `x` `(batch, samples)` (float32; padding zero). The input is not modified. The random
        draws are `draws` if given (from `sample`), else drawn here with `generator`."""
        x = x.float()
        validf = valid.to(torch.bool).float()
        if draws is None:
            draws = self.sample(x.shape, x.device, generator)
        out = x * validf
        if draws.apply_white_noise is not None:
            noisy = add_scaled_noise(out, validf, draws.white_noise, draws.white_noise_std)
            out = torch.where(draws.apply_white_noise, noisy, out)
        if draws.apply_reverb is not None:
            out = torch.where(draws.apply_reverb, reverberate_with_spectrum(out, validf, draws.rir_spectrum), out)
        if draws.apply_background is not None:
            noise = draws.background_noise
            if draws.use_babble is not None:
                noise = torch.where(draws.use_babble, torch.roll(out * validf, shifts=1, dims=0), noise)
            mixed = mix_at_snr(out, noise, validf, draws.snr_db)
            out = torch.where(draws.apply_background, mixed, out)
        return out * validf
