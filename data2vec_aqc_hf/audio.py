"""The one audio loader of the package: decode (soundfile), mono, resample (soxr), validate.

Pretraining, fine-tuning, transcription and evaluation all read audio through `load_audio` / `prepare_audio`, so a
file that one of them accepts, every one accepts, and every problem is reported the same way: an `AudioError`
(a `ValueError`) naming the file and the problem.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import soundfile as sf
import soxr

TARGET_SAMPLING_RATE = 16000


class AudioError(ValueError):
    """An audio file or array that cannot be used; the message names the source and the problem."""


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (high quality); a no-op at the same rate."""
    if orig_sr == target_sr:
        return audio
    return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def resampled_length(num_samples: int, orig_sr: int, target_sr: int = TARGET_SAMPLING_RATE) -> int:
    """The length `resample` gives (soxr rounds to the nearest sample)."""
    return num_samples if orig_sr == target_sr else int(round(num_samples * target_sr / orig_sr))


def prepare_audio(
    audio: np.ndarray,
    sampling_rate: int,
    source: str = "<array>",
    target_sr: int = TARGET_SAMPLING_RATE,
    min_samples: int = 0,
    channel: int | None = None,
) -> np.ndarray:
    """Mono float32 at `target_sr`, checked: not empty, finite, not all zero nor constant (a DC offset normalises
    to all zeros), at least `min_samples` long.
    Multi-channel audio is averaged, or one `channel` is taken (e.g. one speaker of a telephone call)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:  # (samples, channels) as soundfile returns it
        if channel is not None:
            if channel >= audio.shape[1]:
                raise AudioError(f"{source}: has {audio.shape[1]} channel(s), channel {channel} was asked for")
            audio = audio[:, channel]
        else:
            audio = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)  # the same values, 0.1 ms faster
    elif audio.ndim != 1:
        raise AudioError(f"{source}: expected mono or (samples, channels) audio, got shape {audio.shape}")
    if audio.size == 0:
        raise AudioError(f"{source}: the audio is empty (0 samples)")
    if not np.isfinite(audio).all():
        raise AudioError(f"{source}: the audio contains NaN or infinite samples")
    if not sampling_rate or sampling_rate <= 0:
        raise AudioError(f"{source}: invalid sampling rate {sampling_rate!r}")
    if audio[0] != 0 and not np.ptp(audio):  # checked before resampling, whose filter rings at the edges
        raise AudioError(f"{source}: the audio is silent (every sample is {float(audio[0]):g}: a constant offset)")
    audio = resample(audio, int(sampling_rate), target_sr)
    if not np.any(audio):
        raise AudioError(f"{source}: the audio is silent (all samples are zero)")
    if len(audio) < min_samples:
        raise AudioError(
            f"{source}: {len(audio)} samples ({len(audio) / target_sr:.3f} s) at {target_sr} Hz is shorter than "
            f"the minimum of {min_samples} samples"
        )
    return audio


def load_audio(
    source: str | os.PathLike | bytes,
    target_sr: int = TARGET_SAMPLING_RATE,
    min_samples: int = 0,
    name: str | None = None,
    channel: int | None = None,
) -> np.ndarray:
    """Read a file path (or the bytes of an encoded file, as `datasets.Audio(decode=False)` gives them), return mono
    float32 at `target_sr`. Formats are those of libsndfile (WAV, FLAC, OGG, MP3, NIST SPHERE, ...)."""
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if not isinstance(source, bytes) and not os.path.exists(source):
        raise AudioError(f"{name}: file not found")
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32",
                           always_2d=True)
    except FileNotFoundError as err:
        raise AudioError(f"{name}: file not found") from err
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{name}: cannot decode audio ({err})") from err
    return prepare_audio(data, sr, name, target_sr, min_samples, channel)


def load_audio_crop(path: str | os.PathLike, max_samples: int, rng: random.Random,
                    target_sr: int = TARGET_SAMPLING_RATE) -> tuple[np.ndarray, int]:
    """`(crop, length)`: a uniformly placed window of at most `max_samples` of the file's audio at `target_sr`, and the
    whole file's length there; exactly `data.random_crop(load_audio(path), max_samples, rng)` and
    `len(load_audio(path))` (the same rng draw, the same samples, the same errors), decoding less where it can.

    A mono file at `target_sr` with integer samples (FLAC, PCM WAV: they cannot hold NaN) that is longer than the
    window decodes only the window. The whole-file checks still hold: a crop that is not constant proves the file is
    neither constant nor silent; a constant crop decodes the whole file, which then fails with the file-level
    message (a constant offset, all zeros) or gives the same crop, which the caller skips as a silent crop."""
    name = str(path)
    if not os.path.exists(path):
        raise AudioError(f"{name}: file not found")
    try:
        with sf.SoundFile(path) as f:
            frames = f.frames
            if (f.samplerate == target_sr and f.channels == 1 and f.subtype.startswith("PCM_")
                    and frames > max_samples):
                start = window_start(frames, max_samples, rng)
                f.seek(start)
                crop = f.read(max_samples, dtype="float32")
                if len(crop) == max_samples and np.ptp(crop):
                    return crop, frames
                f.seek(0)
            else:
                start = None
            audio = prepare_audio(f.read(dtype="float32", always_2d=True), f.samplerate, name, target_sr)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{name}: cannot decode audio ({err})") from err
    if start is None:
        start = window_start(len(audio), max_samples, rng)
    return audio[start : start + max_samples], len(audio)


def window_start(length: int, max_samples: int, rng: random.Random) -> int:
    """Start of a uniformly placed window of `max_samples` in `length` samples (0, and no draw, when it fits): the
    one rule `load_audio_crop` and `data.random_crop` share, so both draw the same crop."""
    return rng.randrange(0, length - max_samples + 1) if length > max_samples else 0


def load_audio_example(example: dict, audio_column: str = "audio", target_sr: int = TARGET_SAMPLING_RATE,
                       min_samples: int = 0, channel: int | None = None) -> np.ndarray:
    """Audio of a `datasets` example whose column was cast with `Audio(decode=False)` (`{"bytes", "path"}`), or
    holds a decoded `{"array", "sampling_rate"}` dict, or a plain path string."""
    value = example[audio_column]
    if isinstance(value, str):
        return load_audio(value, target_sr, min_samples, channel=channel)
    if isinstance(value, dict):
        name = value.get("path") or "<bytes>"
        if value.get("bytes") is not None:
            return load_audio(value["bytes"], target_sr, min_samples, name=name, channel=channel)
        if value.get("array") is not None:
            array = np.asarray(value["array"])
            array = array.T if array.ndim == 2 else array  # datasets gives (channels, samples)
            return prepare_audio(array, value["sampling_rate"], name, target_sr, min_samples, channel)
        if value.get("path"):
            return load_audio(value["path"], target_sr, min_samples, channel=channel)
    raise AudioError(f"column {audio_column!r}: unsupported audio value of type {type(value).__name__}")


def feature_extractor(do_normalize: bool = True):
    """The feature extractor every saved model folder carries: 16 kHz mono, zero mean and unit variance per
    utterance (`do_normalize`), with an attention mask."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLING_RATE, padding_value=0.0,
                                    do_normalize=do_normalize, return_attention_mask=True)


def with_file_name(name, reason: str) -> str:
    """`reason`, prefixed with the file's name unless it already names it (AudioError messages do)."""
    return reason if name and str(name) in reason else f"{name}: {reason}"

