"""Stage 2: learned gates and IMs trained jointly on cached features, every variant and every λ at once.

One implementation for the paper's method and its extensions (docs/method.md). A *variant*
(:class:`~jeidnn.config.gating.GateVariant`) fixes the gates (inputs, network, exit rule), the gate objective
and the IM loss; each variant trains one model per λ. All models live side by side in stacked parameters and
share every data batch: one optimizer step is one step of every model. The models share no parameter, so the
gradient of the summed loss is each model's own gradient, and SGD (momentum, weight decay) acts element by
element: one optimizer over the stacked parameters is ``M`` separate optimizers, at the per-step overhead of
one.

Phases alternate every ``alternate_steps`` optimizer steps, gates first. Gate phase (IMs fixed, read in eval
mode as at inference): the paper's weighted BCE towards oracle targets, or the expected loss ``E_π[ℓ] + λ
E_π[c]`` through the differentiable exit distribution. IM phase (gates fixed): the expected CE with a
detached normaliser (paper) or the plain sum of per-exit CEs.

The pieces: the stacked models (this module), their LightningModule and one side-by-side fit
(:mod:`jeidnn.train.stage2_fit`), the λ search over fits (:mod:`jeidnn.train.lambda_search`), the fits kept
on disk (:mod:`jeidnn.train.stage2_store`) and the run's stage 2 (:mod:`jeidnn.train.learned`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from jeidnn.config.gating import GateVariant
from jeidnn.model.exit_rules import exit_distribution
from jeidnn.model.gates import StackedGates
from jeidnn.train.losses import expected_loss, gate_loss, gate_targets, im_loss, per_exit_ce, positive_weights

logger = logging.getLogger(__name__)

# IM layers that act on each element alike, so one call covers all K models.
_ELEMENTWISE = (nn.Identity, nn.Tanh, nn.GELU, nn.ReLU)


def _leaf_layers(module: nn.Module) -> list[nn.Module]:
    """The modules without children, in registration order (the order a Sequential runs them)."""
    children = list(module.children())
    return [module] if not children else [leaf for child in children for leaf in _leaf_layers(child)]


class StackedIMs(nn.Module):
    """``K`` copies of the ``L-1`` IMs, evaluated in one batched pass.

    Each IM must be a chain of ``nn.Linear``, ``nn.Dropout`` and elementwise activations (both IM kinds of
    :class:`~jeidnn.model.heads.ExitHeads`). A linear layer's weight becomes a ``(L-1, K, out, in)`` parameter
    and its bias ``(L-1, K, out)``. Dropout masks are drawn once per IM and shared by the ``K`` models
    (stage 2 shares one draw between the models of every variant: :meth:`dropout_masks`).

    Args:
        ims: the ``L-1`` IMs (copied, never modified).
        num_models: ``K``.
    """

    def __init__(self, ims: Sequence[nn.Module], num_models: int) -> None:
        super().__init__()
        per_im = [_leaf_layers(im) for im in ims]
        template = per_im[0]
        for index, layers in enumerate(per_im):
            for layer in layers:
                if not isinstance(layer, (nn.Linear, nn.Dropout, *_ELEMENTWISE)):
                    raise ValueError(
                        "stage 2 batches IMs made of Linear, Dropout and elementwise activations; "
                        f"IM {index} "
                        f"contains a {type(layer).__name__}"
                    )
            if [repr(layer) for layer in layers] != [repr(layer) for layer in template]:
                raise ValueError(f"stage 2 needs IMs built alike; IM {index} is {layers}, IM 0 is {template}")
        self.num_models = num_models
        # Per layer: the index into `params` of a linear layer's weight (its bias follows), else the module.
        self._ops: list[int | nn.Module] = []
        self.params = nn.ParameterList()
        for position, layer in enumerate(template):
            if not isinstance(layer, nn.Linear):
                self._ops.append(copy.deepcopy(layer))
                continue
            if layer.bias is None:
                raise ValueError("stage 2 needs IM linear layers with a bias, got bias=False")
            self._ops.append(len(self.params))
            for name in ("weight", "bias"):
                stacked = torch.stack([getattr(ls[position], name).detach() for ls in per_im])[:, None]
                expanded = stacked.expand(-1, num_models, *stacked.shape[2:])  # (L-1, K, out[, in])
                self.params.append(nn.Parameter(expanded.clone()))

    def dropout_masks(self, features: Tensor) -> list[Tensor]:
        """The dropout masks of one training pass over IM features ``(B, L-1, H)``: one ``(L-1, B, F)`` per
        dropout layer, shared by the ``K`` models, drawn from the global generator (none in eval mode)."""
        masks, width = [], features.shape[-1]
        for op in self._ops:
            if isinstance(op, int):
                width = self.params[op].shape[2]
            elif isinstance(op, nn.Dropout) and self.training and op.p > 0:
                keep = 1 - op.p  # inverted dropout: kept units scaled by 1 / keep
                shape = (features.shape[1], features.shape[0], width)
                uniform = torch.rand(shape, dtype=features.dtype, device=features.device)
                masks.append((uniform < keep).to(features.dtype) / keep)
        return masks

    def forward(self, features: Tensor, masks: list[Tensor] | None = None) -> Tensor:
        """IM logits ``(K, B, L-1, C)`` of every model from the IMs' features ``(B, L-1, H)``; ``masks``: the
        pass's dropout masks (:meth:`dropout_masks`), drawn here when not given."""
        z, shared = features.transpose(0, 1), True  # (L-1, B, F) while shared, then (L-1, B, K, F)
        if masks is None:
            masks = self.dropout_masks(features)
        masks = list(masks)
        for op in self._ops:
            if isinstance(op, int):
                weight, bias = self.params[op], self.params[op + 1]  # (L-1, K, out, in), (L-1, K, out)
                num_ims, k, out_features, in_features = weight.shape
                if shared:
                    # One matmul per IM for all K models: (B, in) @ (in, K·out).
                    z = torch.baddbmm(
                        bias.view(num_ims, 1, k * out_features),
                        z,
                        weight.view(num_ims, k * out_features, in_features).transpose(1, 2),
                    ).view(num_ims, -1, k, out_features)  # (L-1, B, K, out)
                    shared = False
                else:
                    z = torch.einsum("lbki,lkoi->lbko", z, weight) + bias[:, None]  # (L-1, B, K, out)
            elif isinstance(op, nn.Dropout):
                if self.training and op.p > 0:
                    noise = masks.pop(0)  # (L-1, B, F)
                    z = z * (noise if shared else noise[:, :, None])
            else:
                z = op(z)
        if shared:
            z = z[:, :, None].expand(-1, -1, self.num_models, -1)  # (L-1, B, K, C)
        return z.permute(2, 1, 0, 3)  # (K, B, L-1, C)

    @torch.no_grad()
    def write_into(self, model: int, ims: Sequence[nn.Module]) -> None:
        """Copy model ``model``'s weights into ``ims`` (IMs shaped like the ones this was built from)."""
        for index, im in enumerate(ims):
            layers = _leaf_layers(im)
            for position, op in enumerate(self._ops):
                if isinstance(op, int):
                    layers[position].weight.copy_(self.params[op][index, model])
                    layers[position].bias.copy_(self.params[op + 1][index, model])


class VariantBlock(nn.Module):
    """The ``K`` models (one per λ) of one variant: stacked IMs, stacked gates, their λ and BCE weights."""

    def __init__(
        self,
        variant: GateVariant,
        heads: nn.Module,
        hidden_size: int,
        costs: Tensor,
        lambdas: Sequence[float],
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.lambda_values = [float(x) for x in lambdas]
        num_exits = len(heads.heads)
        self.ims = StackedIMs(heads.heads[:-1], len(lambdas))
        self.gates = StackedGates(variant, num_exits, hidden_size, len(lambdas), generator)
        # float64 as counted: a cost rounded to float32 would miss the 1e-9 budget checks downstream
        # (val_cost). Not a buffer: it stays on the CPU when the block moves, since MPS has no float64. The
        # losses cast it to their own dtype and device.
        self.costs = costs.detach().double().cpu().clone()
        self.register_buffer("lambdas", torch.tensor([float(x) for x in lambdas]))
        self.register_buffer("pos_weight", torch.ones(len(lambdas), num_exits - 1))

    @property
    def num_models(self) -> int:
        return self.lambdas.numel()

    def exit_logits(
        self,
        features: Tensor,
        final_logits: Tensor,
        im_logits: Tensor | None = None,
        masks: list[Tensor] | None = None,
    ) -> Tensor:
        """Per-exit logits ``(K, B, L, C)`` from IM features ``(B, L-1, H)`` and final logits ``(B, C)``;
        ``im_logits`` ``(B, L-1, C)``: IM outputs given instead (`gate_data: crossfit`, IMs frozen);
        ``masks``: the IMs' dropout masks in training mode (drawn when not given)."""
        if im_logits is None:
            im_logits = self.ims(features, masks)  # (K, B, L-1, C)
        else:
            im_logits = im_logits[None].expand(self.num_models, -1, -1, -1)  # (K, B, L-1, C)
        final = final_logits[None, :, None].expand(self.num_models, -1, -1, -1)  # (K, B, 1, C)
        return torch.cat([im_logits, final.to(im_logits.dtype)], dim=2)

    def ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-exit CE ``(K, B, L)`` of logits ``(K, B, L, C)``."""
        return per_exit_ce(logits, labels)

    def gate_phase_loss(
        self, features: Tensor, labels: Tensor, final_logits: Tensor, im_logits: Tensor | None = None
    ) -> Tensor:
        """``(K,)`` gate losses, the IMs fixed and in eval mode (the outputs the gates see at inference), or
        their out-of-fold outputs ``im_logits`` ``(B, L-1, C)`` when given."""
        with torch.no_grad():
            self.ims.eval()
            logits = self.exit_logits(features, final_logits, im_logits)  # (K, B, L, C)
            self.ims.train()
            ce = self.ce(logits, labels)  # (K, B, L)
        gate_logits = self.gates(logits, features)  # (K, B, L-1)
        v = self.variant
        if v.objective == "bce":
            return gate_loss(gate_logits, gate_targets(ce, self.costs, self.lambdas), self.pos_weight)
        pi = exit_distribution(torch.sigmoid(gate_logits), v.exit_rule)  # (K, B, L)
        if v.exit_loss == "error":
            loss = (logits.argmax(dim=-1) != labels[None, :, None]).to(pi.dtype)  # (K, B, L)
        else:
            loss = ce
        return expected_loss(pi, loss, self.costs, self.lambdas)

    def im_phase_loss(
        self, features: Tensor, labels: Tensor, final_logits: Tensor, masks: list[Tensor] | None = None
    ) -> Tensor:
        """``(K,)`` IM losses with the gates fixed; ``masks``: the IMs' dropout masks (drawn if not given)."""
        logits = self.exit_logits(features, final_logits, masks=masks)  # (K, B, L, C)
        with torch.no_grad():
            pi = exit_distribution(torch.sigmoid(self.gates(logits, features)), self.variant.exit_rule)
        return im_loss(logits, labels, pi, self.variant.im_loss)

    @torch.no_grad()
    def predict(self, features: Tensor, final_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Eval-mode logits ``(K, N, L, C)`` and exit scores ``(K, N, L-1)``."""
        training = self.training
        self.eval()
        logits = self.exit_logits(features, final_logits)
        scores = self.gates.scores(logits, features)
        self.train(training)
        return logits, scores

    @torch.no_grad()
    def set_positive_weights(self, ce: Tensor, max_weight: float) -> None:
        """Recount each model's BCE positive weights from its val CEs ``(K, N, L)``."""
        for k in range(self.num_models):
            self.pos_weight[k] = positive_weights(
                ce[k], self.costs, self.lambda_values[k], self.variant.positive_weight, max_weight
            )


@dataclass
class TrainedModel:
    """One trained model of stage 2.

    Attributes:
        variant: its variant.
        lam: its λ.
        heads: the warm-up heads with this model's IMs (final head unchanged), eval mode, CPU.
        gates: its ``K = 1`` gates, eval mode, CPU.
        history: per-epoch ``gate_loss``, ``im_loss``, ``val_accuracy``, ``val_cost`` (native threshold);
            end to end also ``backbone_updates`` (cumulative).
        backbone: the state dict of its own backbone's Hugging Face model (end to end,
            :mod:`jeidnn.train.end_to_end`); None = it reads the run's shared backbone.
    """

    variant: GateVariant
    lam: float
    heads: nn.Module
    gates: StackedGates
    history: dict[str, list[float]] = field(default_factory=dict)
    backbone: dict[str, Tensor] | None = None

    @property
    def val_cost(self) -> float:
        return self.history["val_cost"][-1] if self.history.get("val_cost") else math.nan

    @property
    def val_accuracy(self) -> float:
        return self.history["val_accuracy"][-1] if self.history.get("val_accuracy") else math.nan
