"""Stage 2: learned gates and IMs trained jointly on cached features, every variant and every λ at once.

One implementation for the paper's method and its extensions (docs/method.md). A *variant*
(:class:`~jeidnn.config.schema.GateVariant`) fixes the gates (inputs, network, exit rule), the gate objective and
the IM loss; each variant trains one model per λ. All models live side by side in stacked parameters and
share every data batch: one optimizer step is one step of every model. The models share no parameter, so the
gradient of the summed loss is each model's own gradient, and SGD (momentum, weight decay) acts element by
element: one optimizer over the stacked parameters is ``M`` separate optimizers, at the per-step overhead of
one.

Phases alternate every ``alternate_steps`` optimizer steps, gates first. Gate phase (IMs fixed, read in eval
mode as at inference): the paper's weighted BCE towards oracle targets, or the expected loss ``E_π[ℓ] + λ
E_π[c]`` through the differentiable exit distribution. IM phase (gates fixed): the expected CE with a
detached normaliser (paper) or the plain sum of per-exit CEs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from jeidnn.config.schema import GateVariant, JeidnnConfig
from jeidnn.model.exit_rules import exit_distribution
from jeidnn.model.gates import Gates, StackedGates
from jeidnn.model.policies import score_exits
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
    :class:`~jeidnn.model.heads.ExitHeads`). A linear layer's weight becomes a ``(L-1, K, out, in)`` parameter and
    its bias ``(L-1, K, out)``. Dropout masks are drawn once per IM and shared by the ``K`` models.

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

    def forward(self, features: Tensor) -> Tensor:
        """IM logits ``(K, B, L-1, C)`` of every model from the IMs' features ``(B, L-1, H)``."""
        z, shared = features.transpose(0, 1), True  # (L-1, B, F) while shared, then (L-1, B, K, F)
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
                    ones = z.new_ones(z.shape[1], z.shape[-1])  # (B, F)
                    noise = torch.stack([F.dropout(ones, op.p, training=True) for _ in range(z.shape[0])])
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
        self.register_buffer("costs", costs.detach().float().clone())
        self.register_buffer("lambdas", torch.tensor([float(x) for x in lambdas]))
        self.register_buffer("pos_weight", torch.ones(len(lambdas), num_exits - 1))

    @property
    def num_models(self) -> int:
        return self.lambdas.numel()

    def exit_logits(self, features: Tensor, final_logits: Tensor) -> Tensor:
        """Per-exit logits ``(K, B, L, C)`` from IM features ``(B, L-1, H)`` and final logits ``(B, C)``."""
        im_logits = self.ims(features)  # (K, B, L-1, C)
        final = final_logits[None, :, None].expand(self.num_models, -1, -1, -1)  # (K, B, 1, C)
        return torch.cat([im_logits, final.to(im_logits.dtype)], dim=2)

    def ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-exit CE ``(K, B, L)`` of logits ``(K, B, L, C)``."""
        return per_exit_ce(logits, labels)

    def gate_phase_loss(self, features: Tensor, labels: Tensor, final_logits: Tensor) -> Tensor:
        """``(K,)`` gate losses, the IMs fixed and in eval mode (the outputs the gates see at inference)."""
        with torch.no_grad():
            self.ims.eval()
            logits = self.exit_logits(features, final_logits)  # (K, B, L, C)
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

    def im_phase_loss(self, features: Tensor, labels: Tensor, final_logits: Tensor) -> Tensor:
        """``(K,)`` IM losses with the gates fixed."""
        logits = self.exit_logits(features, final_logits)  # (K, B, L, C)
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


def alternation_phase(step: int, alternate_steps: int) -> str:
    """``"gate"`` or ``"im"``: the phase of optimizer step ``step`` (0-based); gate phase first."""
    return "gate" if (step // alternate_steps) % 2 == 0 else "im"


class Stage2Module(pl.LightningModule):
    """All variant blocks trained side by side with manual optimisation (one SGD, cosine schedule).

    Batches are ``(features (B, L-1, H), labels (B,), final_logits (B, C))``: the IMs' pooled features and the
    frozen final head's logits, computed once. Each step only one phase's parameters get gradients; SGD skips
    parameters without gradient, so the idle part is truly fixed. Validation (once per epoch) records each
    model's val accuracy and cost at the native threshold and recounts the BCE positive weights.
    """

    def __init__(self, blocks: Sequence[VariantBlock], cfg: JeidnnConfig) -> None:
        super().__init__()
        self.automatic_optimization = False
        self._steps = 0
        self.blocks = nn.ModuleList(blocks)
        self.cfg = cfg
        self.history: list[list[dict[str, list[float]]]] = [
            [
                {key: [] for key in ("gate_loss", "im_loss", "val_accuracy", "val_cost")}
                for _ in range(b.num_models)
            ]
            for b in blocks
        ]

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        cfg = self.cfg
        optimizer = torch.optim.SGD(
            self.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.min_lr)
        return [optimizer], [scheduler]

    def on_train_epoch_start(self) -> None:
        self._losses: dict[str, list[list[Tensor]]] = {"gate": [], "im": []}

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        features, labels, final_logits = batch  # (B, L-1, H), (B,), (B, C)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # Own step count: Lightning's global_step counts optimizer steps, and a phase with every variant's
        # IMs frozen takes none.
        phase = alternation_phase(self._steps, self.cfg.alternate_steps)
        self._steps += 1
        losses: list[Tensor | None] = [
            b.gate_phase_loss(features, labels, final_logits)
            if phase == "gate"
            else None
            if b.variant.im_loss == "frozen"  # no IM phase: these gates learn on the warm-up IMs
            else b.im_phase_loss(features, labels, final_logits)
            for b in self.blocks
        ]  # one (K_v,) per block
        trained = [loss for loss in losses if loss is not None]
        if trained:
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(torch.cat(trained).sum())
            optimizer.step()
        scheduler.step()
        self._losses[phase].append(
            [
                loss.detach() if loss is not None else torch.full((b.num_models,), math.nan)
                for loss, b in zip(losses, self.blocks)
            ]
        )

    def on_train_epoch_end(self) -> None:
        for phase in ("gate", "im"):
            steps = self._losses[phase]
            for i, history in enumerate(self.history):
                # NaN marks an epoch without any step of that phase.
                means = (
                    torch.stack([s[i] for s in steps]).mean(0).tolist()
                    if steps
                    else [math.nan] * len(history)
                )
                for k, h in enumerate(history):
                    h[f"{phase}_loss"].append(means[k])

    def on_validation_epoch_start(self) -> None:
        self._val: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in self.blocks]

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        features, labels, final_logits = batch
        for i, block in enumerate(self.blocks):
            logits, scores = block.predict(features, final_logits)  # (K, B, L, C), (K, B, L-1)
            self._val[i].append((logits, scores, labels))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # a partial pass over val must not change the weights
        for i, block in enumerate(self.blocks):
            logits = torch.cat([x[0] for x in self._val[i]], dim=1)  # (K, N, L, C)
            scores = torch.cat([x[1] for x in self._val[i]], dim=1)  # (K, N, L-1)
            labels = torch.cat([x[2] for x in self._val[i]])  # (N,)
            for k in range(block.num_models):
                accuracy, cost = native_point(logits[k], scores[k], labels, block.costs)
                self.history[i][k]["val_accuracy"].append(accuracy)
                self.history[i][k]["val_cost"].append(cost)
            if block.variant.objective == "bce":
                block.set_positive_weights(block.ce(logits, labels), self.cfg.max_positive_weight)


def native_point(logits: Tensor, scores: Tensor, labels: Tensor, costs: Tensor) -> tuple[float, float]:
    """(accuracy, mean cost) of one model at its native exit threshold."""
    exits = score_exits(scores)
    taken = logits[torch.arange(len(exits)), exits]  # (N, C)
    return float((taken.argmax(-1) == labels).float().mean()), float(costs.double()[exits].mean())


class _CachedRows(Dataset):
    """Cached rows fetched a whole batch at a time: ``(features[:, :L-1], labels, final_logits)``."""

    def __init__(self, features: Tensor, labels: Tensor, final_logits: Tensor) -> None:
        self.features, self.labels, self.final_logits = features, labels, final_logits
        self.num_ims = features.shape[1] - 1

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        index = torch.as_tensor(rows)
        return self.features[index, : self.num_ims], self.labels[index], self.final_logits[index]


def _batches(rows: _CachedRows, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    sampler = RandomSampler(rows, generator=generator) if generator is not None else SequentialSampler(rows)
    return DataLoader(
        rows, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None, generator=generator
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


def eval_logits(module: nn.Module, inputs: Tensor) -> Tensor:
    """``module(inputs)`` in eval mode, 4096 rows at a time (``module`` is copied, its mode untouched)."""
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in inputs.split(4096)])


def start_blocks(
    train_features: Tensor,
    val: tuple[Tensor, Tensor, Tensor],
    heads: nn.Module,
    plan: Sequence[tuple[GateVariant, Tensor, Sequence[float]]],
    cfg: JeidnnConfig,
    seed: int,
) -> list[VariantBlock]:
    """The variant blocks of ``plan`` as training starts: fresh gates (each variant from its own random
    stream), gate-input statistics from the warm-up IMs on ``train_features`` ``(N, L, H)``, and BCE positive
    weights from ``val`` = (IM features ``(M, L-1, H)``, labels ``(M,)``, final logits ``(M, C)``)."""
    hidden_size = train_features.shape[-1]
    blocks = []
    for variant, costs, lambdas in plan:
        # Each variant's gates drawn from its own stream: adding a variant never changes another's start.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(variant.name.encode()))
        block = VariantBlock(variant, heads, hidden_size, costs, lambdas, generator)
        with torch.no_grad():  # the warm-up IMs' outputs (every model starts from them) set the statistics
            im_logits = block.ims.eval()(train_features[:, :-1])[0]  # (N, L-1, C)
        block.ims.train()
        block.gates.set_statistics(im_logits, train_features[:, :-1])
        if variant.objective == "bce":  # initial BCE weights from the warm-up IMs on val
            with torch.no_grad():
                block.set_positive_weights(
                    block.ce(block.predict(*val[::2])[0], val[1]), cfg.max_positive_weight
                )
        blocks.append(block)
    return blocks


def train_models(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    heads: nn.Module,
    plan: Sequence[tuple[GateVariant, Tensor, Sequence[float]]],
    cfg: JeidnnConfig,
    *,
    seed: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
) -> list[list[TrainedModel]]:
    """Train every (variant, λ) of ``plan`` side by side; deterministic given ``seed``.

    Args:
        train_features: cached pooled features ``(N, L, H)`` of every exit layer.
        train_labels: ``(N,)``.
        val_features: ``(M, L, H)``; BCE positive weights and per-epoch val metrics.
        val_labels: ``(M,)``.
        heads: the warm-up heads (:class:`~jeidnn.model.heads.ExitHeads`; copied, never modified).
        plan: ``(variant, costs (L,), lambdas)`` per block; costs include that variant's gates.
        cfg: stage-2 settings.
        seed: seeds the gate initialisation, dropout and shuffling.
        trainer_kwargs: extra ``pl.Trainer`` arguments (logger, accelerator, progress bar, root dir).

    Returns:
        Per block, one :class:`TrainedModel` per λ, in order.
    """
    num_exits = len(heads.heads)
    if train_features.dim() != 3 or train_features.shape[1] != num_exits:
        raise ValueError(
            f"expected train features of shape (N, {num_exits}, H), got {tuple(train_features.shape)}"
        )
    pl.seed_everything(seed, verbose=False)
    train_rows = _CachedRows(
        train_features, train_labels, eval_logits(heads.heads[-1], train_features[:, -1])
    )
    val_rows = _CachedRows(val_features, val_labels, eval_logits(heads.heads[-1], val_features[:, -1]))
    blocks = start_blocks(train_features, val_rows[list(range(len(val_rows)))], heads, plan, cfg, seed)
    module = Stage2Module(blocks, cfg)

    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        devices=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        **{"accelerator": "cpu", "logger": False, "enable_progress_bar": False, **(trainer_kwargs or {})},
    )
    threads = torch.get_num_threads()
    on_cpu = trainer_kwargs is None or trainer_kwargs.get("accelerator", "cpu") == "cpu"
    if on_cpu:
        # Every tensor of a step is tiny: intra-op threads only add hand-offs, and on a busy machine their
        # spin-waits made a step several times slower.
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer.fit(
                module,
                _batches(train_rows, cfg.batch_size, torch.Generator().manual_seed(seed)),
                _batches(val_rows, max(cfg.batch_size, 1024)),
            )
    finally:
        torch.set_num_threads(threads)
    module.cpu().eval()
    results = []
    for block, histories in zip(module.blocks, module.history):
        models = []
        for k, history in enumerate(histories):
            model_heads = copy.deepcopy(heads).cpu().eval()
            block.ims.write_into(k, model_heads.heads[:-1])
            models.append(
                TrainedModel(
                    block.variant, block.lambda_values[k], model_heads, block.gates.select(k).eval(), history
                )
            )
        results.append(models)
    return results


def next_lambdas(models: Sequence[TrainedModel], first_cost: float, cfg: JeidnnConfig) -> list[float]:
    """New λ values that widen or fill a variant's val-cost range (the automatic λ choice).

    Larger λ means cheaper models. Adds ``min λ / 10`` while the most expensive model's val cost is below
    ``cfg.target_max_cost``, ``max λ · 10`` while the cheapest costs more than the first exit (+0.02), and the
    geometric mean of neighbouring λ whose val costs differ by more than ``cfg.max_cost_gap``.
    """
    ordered = sorted(models, key=lambda m: m.lam)
    lams = [m.lam for m in ordered]
    costs = [m.val_cost for m in ordered]
    new: list[float] = []
    if max(costs) < cfg.target_max_cost and lams[0] > 1e-6:
        new.append(lams[0] / 10)
    if min(costs) > first_cost + 0.02 and lams[-1] < 1e4:
        new.append(lams[-1] * 10)
    for (lo, c_lo), (hi, c_hi) in zip(zip(lams, costs), zip(lams[1:], costs[1:])):
        if abs(c_lo - c_hi) > cfg.max_cost_gap and lo > 0 and hi / lo > 1.05:
            new.append(math.sqrt(lo * hi))
    return sorted(set(new))


def save_models(path: Path, models: Sequence[TrainedModel]) -> None:
    """Write trained models (weights, variant name, λ, history) to one safetensors file, atomically."""
    tensors: dict[str, Tensor] = {}
    for k, model in enumerate(models):
        tensors.update({f"{k}.heads.{n}": v.contiguous() for n, v in model.heads.state_dict().items()})
        tensors.update({f"{k}.gates.{n}": v.contiguous() for n, v in model.gates.state_dict().items()})
        tensors.update({f"{k}.backbone.{n}": v.contiguous() for n, v in (model.backbone or {}).items()})
    meta = [{"variant": m.variant.name, "lambda": m.lam, "history": m.history} for m in models]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"models": json.dumps(meta)})
    tmp.replace(path)


def load_models(
    path: Path, variants: Sequence[GateVariant], heads: nn.Module, hidden_size: int
) -> list[TrainedModel]:
    """The models :func:`save_models` wrote, rebuilt around copies of ``heads`` (the warm-up heads)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["models"])
    tensors = load_file(str(path))
    by_name = {v.name: v for v in variants}
    models = []
    for k, entry in enumerate(meta):
        variant = by_name[entry["variant"]]
        model_heads = copy.deepcopy(heads).cpu().eval()
        model_heads.load_state_dict(
            {n[len(f"{k}.heads.") :]: v for n, v in tensors.items() if n.startswith(f"{k}.heads.")}
        )
        gates = Gates(len(heads.heads), variant, hidden_size)
        gates.load_state_dict(
            {n[len(f"{k}.gates.") :]: v for n, v in tensors.items() if n.startswith(f"{k}.gates.")}
        )
        own = {n[len(f"{k}.backbone.") :]: v for n, v in tensors.items() if n.startswith(f"{k}.backbone.")}
        models.append(
            TrainedModel(
                variant, float(entry["lambda"]), model_heads, gates.eval(), entry["history"], own or None
            )
        )
    return models


def fit_stage2(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    heads: nn.Module,
    costs: dict[str, Tensor],
    cfg: JeidnnConfig,
    *,
    seed: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], Any] = logger.info,
    store: Path | None = None,
    after_fit: Callable[[str], Any] | None = None,
) -> dict[str, list[TrainedModel]]:
    """Train every variant of ``cfg.variants`` over its λ values; λ chosen automatically when ``cfg.lambdas``
    is None (rounds of :func:`next_lambdas`, each round one side-by-side fit of all new models).

    Args:
        costs: per variant name, its exit costs ``(L,)`` (IMs and its own gates).
        log: called with one progress line per round.
        store: a folder keeping each finished fit (``round<r>-<data>.safetensors``); a fit found there is
            loaded instead of trained, so a resumed run continues where it stopped. Each fit is seeded on its
            own (``seed + round``), so the result is the same either way.
        after_fit: called with each fit's name once it is stored.

    Returns:
        Per variant name, its models sorted by λ.
    """
    todo = {v.name: list(cfg.lambdas if cfg.lambdas is not None else cfg.lambda_grid) for v in cfg.variants}
    rounds = 1 + (cfg.lambda_rounds if cfg.lambdas is None else 0)
    trained: dict[str, list[TrainedModel]] = {v.name: [] for v in cfg.variants}
    hidden_size = train_features.shape[-1]
    for round_ in range(rounds):
        plan = [(v, costs[v.name], todo[v.name]) for v in cfg.variants if todo[v.name]]
        if not plan:
            break
        count = sum(len(lams) for _, _, lams in plan)
        log(f"stage 2, round {round_ + 1}: {count} models side by side ({len(plan)} variants)")
        # Gates that learn on val (IMs frozen) train in their own fit, with val as their training data.
        for source in ("train", "val"):
            part = [entry for entry in plan if entry[0].gate_data == source]
            if not part:
                continue
            name = f"round{round_ + 1}-{source}"
            path = store / f"{name}.safetensors" if store is not None else None
            if path is not None and path.is_file():
                log(f"stage 2, {name}: loaded from {path}")
                models = load_models(path, [v for v, _, _ in part], heads, hidden_size)
            else:
                fit_x, fit_y = (
                    (train_features, train_labels) if source == "train" else (val_features, val_labels)
                )
                results = train_models(
                    fit_x, fit_y, val_features, val_labels, heads, part, cfg,
                    seed=seed + round_, trainer_kwargs=trainer_kwargs,
                )  # fmt: skip
                models = [m for block in results for m in block]
                if path is not None:
                    save_models(path, models)
                    if after_fit is not None:
                        after_fit(name)
            for model in models:
                trained[model.variant.name].append(model)
        todo = {
            v.name: [
                lam
                for lam in next_lambdas(trained[v.name], float(costs[v.name][0]), cfg)
                if all(abs(lam - m.lam) > 1e-12 for m in trained[v.name])
            ]
            for v in cfg.variants
        }
    return {name: sorted(models, key=lambda m: m.lam) for name, models in trained.items()}
