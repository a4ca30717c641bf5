"""jeidnn: early-exit Hugging Face transformers with jointly learned gates (JEI-DNN), calibration and
conformal prediction sets.

Importing jeidnn registers its model with the Hugging Face Auto classes (``model_type = "jeidnn"``), so
``AutoModelForSequenceClassification.from_pretrained`` and ``pipeline(...)`` load a saved model.

Example:
    >>> from jeidnn import EarlyExitModel
    >>> model = EarlyExitModel.from_pretrained("runs/default/model")
    >>> model.predict(["what a great day"])[0].label
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from jeidnn.config.parser import load_config
from jeidnn.config.schema import RunConfig
from jeidnn.errors import JeidnnError
from jeidnn.hf.batches import Prediction
from jeidnn.hf.config import EarlyExitConfig
from jeidnn.hf.modeling import (
    EarlyExitForImageClassification,
    EarlyExitForSequenceClassification,
    EarlyExitModel,
)
from jeidnn.model.early_exit import EarlyExitOutput
from jeidnn.model.rule_gates import (
    PatienceConfidenceGates,
    PatienceGates,
    ProductGates,
    StaticGates,
    ThresholdGates,
)

# exist_ok: a second registration of the same classes (e.g. a reloaded module) is harmless.
AutoConfig.register(EarlyExitConfig.model_type, EarlyExitConfig, exist_ok=True)
AutoModel.register(EarlyExitConfig, EarlyExitModel, exist_ok=True)
AutoModelForSequenceClassification.register(
    EarlyExitConfig, EarlyExitForSequenceClassification, exist_ok=True
)
AutoModelForImageClassification.register(EarlyExitConfig, EarlyExitForImageClassification, exist_ok=True)

__all__ = [
    "EarlyExitConfig",
    "EarlyExitForImageClassification",
    "EarlyExitForSequenceClassification",
    "EarlyExitModel",
    "EarlyExitOutput",
    "JeidnnError",
    "PatienceConfidenceGates",
    "PatienceGates",
    "ProductGates",
    "Prediction",
    "RunConfig",
    "StaticGates",
    "ThresholdGates",
    "load_config",
]
__version__ = "0.1.0"
