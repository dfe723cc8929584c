"""data2vec-aqc for Hugging Face transformers.

Importing the package registers `data2vec-aqc` with `AutoConfig`, `AutoModel`, `AutoModelForPreTraining` and
`AutoModelForCTC`; saved checkpoints also carry `auto_map` and the modeling code, so `trust_remote_code=True` loads
them where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCTC, AutoModelForPreTraining

from .configuration_data2vec_aqc import Data2VecAQCConfig
from .modeling_data2vec_aqc import (
    Data2VecAQCForCTC,
    Data2VecAQCForPreTraining,
    Data2VecAQCForPreTrainingOutput,
    Data2VecAQCModel,
    Data2VecAQCPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(Data2VecAQCConfig.model_type, Data2VecAQCConfig, exist_ok=True)
AutoModel.register(Data2VecAQCConfig, Data2VecAQCModel, exist_ok=True)
AutoModelForPreTraining.register(Data2VecAQCConfig, Data2VecAQCForPreTraining, exist_ok=True)
AutoModelForCTC.register(Data2VecAQCConfig, Data2VecAQCForCTC, exist_ok=True)

# carry the code in saved checkpoints (auto_map + copied modules) for trust_remote_code users
Data2VecAQCConfig.register_for_auto_class()
Data2VecAQCModel.register_for_auto_class("AutoModel")
Data2VecAQCForPreTraining.register_for_auto_class("AutoModelForPreTraining")
Data2VecAQCForCTC.register_for_auto_class("AutoModelForCTC")

__all__ = [
    "Data2VecAQCConfig",
    "Data2VecAQCPreTrainedModel",
    "Data2VecAQCModel",
    "Data2VecAQCForPreTraining",
    "Data2VecAQCForPreTrainingOutput",
    "Data2VecAQCForCTC",
]
