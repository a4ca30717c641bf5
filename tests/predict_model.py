"""The tiny saved text model of `jeidnn predict`'s tests, which the serving tests serve too: a BERT with
trajectory gates whose texts exit at layers 1 and 3, calibrated at α = 0.1 and 0.05."""

import torch
from test_early_exit import TEXTS, split_on_texts, tiny_tokenizer
from tiny_models import TINY_CONFIGS

from jeidnn.config.gating import GateSettings
from jeidnn.config.schema import ModelConfig
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.model.backbone import Backbone
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads

LABELS = ["negative", "neutral", "positive"]
__all__ = ["LABELS", "TEXTS", "text_model"]


def text_model(folder) -> EarlyExitModel:
    """A tiny BERT with trajectory gates whose texts exit at layers 1 and 3, calibrated at 0.1 and 0.05."""
    torch.manual_seed(0)
    backbone = Backbone.load(ModelConfig(random_config=TINY_CONFIGS["bert"]))
    heads = ExitHeads([1, 2, 3], backbone.hidden_size, len(LABELS), "tanh")
    with torch.no_grad():
        for head in heads.heads:
            head.net[-1].weight.mul_(5)
    model = EarlyExitModel.from_parts(
        backbone,
        heads,
        Gates(3, GateSettings("trajectory", "mlp", "conditional"), backbone.hidden_size),
        tiny_tokenizer(folder),
        LABELS,
        costs=[0.4, 0.7, 1.01],
        conformal_quantiles={"0.1": [0.5, 0.6, 0.7], "0.05": [0.9, 0.95, 1.0]},
        max_length=16,
        exit_threshold=0.4,
    ).eval()
    split_on_texts(model, TEXTS)
    return model
