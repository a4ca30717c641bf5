"""Exit heads: the intermediate classifiers (IMs) and the final classifier.

Every head reads one layer's pooled representation (B, H) and returns logits (B, C).
Text heads mirror the model family's sequence-classification head (dense -> activation
-> dropout -> linear, as BertForSequenceClassification's pooler + classifier); vision
heads are a single linear layer on the normalised CLS token, as ViTForImageClassification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}


class ExitHead(nn.Module):
    """Classifier on one layer's pooled representation.

    Example:
        >>> head = ExitHead(hidden_size=32, num_classes=3, activation="tanh")
        >>> head(torch.randn(4, 32)).shape
        torch.Size([4, 3])
    """

    def __init__(self, hidden_size: int, num_classes: int, activation: str, dropout: float = 0.1) -> None:
        super().__init__()
        if activation == "none":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, num_classes))
        else:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, hidden_size),
                _ACTIVATIONS[activation](),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_classes),
            )

    def forward(self, pooled: Tensor) -> Tensor:
        *first, last = self.net
        if self.training or not isinstance(last, nn.Linear):
            return self.net(pooled)
        # Evaluation: the same operations without the module calls of the Sequential and its identity
        # dropout (a sizeable share of a head's time on one row, where the layer-skipping path runs it).
        if len(first) == 3:
            dense, activation, _ = first
            pooled = activation.forward(F.linear(pooled, dense.weight, dense.bias))
        return F.linear(pooled, last.weight, last.bias)


class ExitHeads(nn.Module):
    """All exits: IMs at `layers[:-1]` and the final classifier at `layers[-1]` (the last layer).

    Args:
        layers: 1-based backbone layers carrying an exit, ascending, last = final layer.
        activation: the model family's head activation (`none` = a linear head).
        im_head: `linear` IMs (dropout + linear) or `mlp` IMs shaped like the final head.
            The final head always mirrors the model family's own classifier.
    """

    def __init__(
        self,
        layers: list[int],
        hidden_size: int,
        num_classes: int,
        activation: str,
        dropout: float = 0.1,
        im_head: str = "mlp",
    ) -> None:
        super().__init__()
        self.layers = list(layers)
        self.num_classes = num_classes
        self.activation = activation
        self.im_head = im_head
        im_activation = activation if im_head == "mlp" else "none"
        self.heads = nn.ModuleList(
            ExitHead(
                hidden_size, num_classes, im_activation if i < len(self.layers) - 1 else activation, dropout
            )
            for i in range(len(self.layers))
        )

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def final(self) -> ExitHead:
        return self.heads[-1]

    def forward(self, features: Tensor) -> Tensor:
        """(N, L, H) pooled features at the exit layers -> logits (N, L, C)."""
        assert features.shape[1] == self.num_exits, (features.shape, self.num_exits)
        return torch.stack([head(features[:, i]) for i, head in enumerate(self.heads)], dim=1)
