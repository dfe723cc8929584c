"""Export a fine-tuned data2vec-aqc CTC model as a stock transformers `data2vec-audio` checkpoint."""

from __future__ import annotations

import os

from transformers import Data2VecAudioForCTC

from .modeling_data2vec_aqc import Data2VecAQCForCTC


def to_data2vec_audio(model: Data2VecAQCForCTC) -> Data2VecAudioForCTC:
    """A stock `Data2VecAudioForCTC` holding the same weights (strict load: every tensor must match)."""
    stock = Data2VecAudioForCTC(model.config.to_data2vec_audio_config())
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock.to(device=model.device, dtype=model.dtype).train(model.training)


def save_as_data2vec_audio(model: Data2VecAQCForCTC, save_directory: str | os.PathLike, **kwargs) -> str:
    """Save `model` so that plain `transformers.AutoModelForCTC.from_pretrained` loads it without this package
    (model_type `data2vec-audio`, no `auto_map`, safetensors)."""
    stock = to_data2vec_audio(model)
    stock.save_pretrained(save_directory, safe_serialization=True, **kwargs)
    return str(save_directory)
