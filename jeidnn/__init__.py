"""jeidnn: early-exit Hugging Face transformers with jointly learned gates (JEI-DNN), calibration and
conformal prediction sets.

Example:
    >>> from jeidnn import EarlyExitModel
    >>> model = EarlyExitModel.from_pretrained("runs/default/model")
    >>> model.predict(["what a great day"])[0].label
"""

from jeidnn.config import RunConfig, load_config
from jeidnn.early_exit import EarlyExitModel, EarlyExitOutput, ThresholdGates
from jeidnn.errors import JeidnnError
from jeidnn.predict import Prediction

__all__ = [
    "EarlyExitModel",
    "EarlyExitOutput",
    "JeidnnError",
    "Prediction",
    "RunConfig",
    "ThresholdGates",
    "load_config",
]
__version__ = "0.1.0"
