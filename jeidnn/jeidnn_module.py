"""Stage 2 of the pipeline: JEI-DNN joint training of gates and IMs on cached features (DESIGN.md §4).

The backbone is frozen and out of the picture: the inputs are the pooled per-layer features
``(N, L, H)`` and a heads module mapping them to per-exit logits ``(N, L, C)``. Training alternates a
gate phase (gate loss, IMs fixed) and an IM phase (IM loss, gates fixed) every ``K`` optimizer steps.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from jeidnn.config import JeidnnConfig
from jeidnn.gates import Gates, exit_decision, exit_distribution
from jeidnn.losses import gate_loss, gate_targets, im_loss, per_exit_ce, positive_weights


class ExitPrediction(NamedTuple):
    """What :func:`predict_exits` returns (unpacks like a tuple)."""

    logits: Tensor  # (N, L, C) per-exit logits
    gate_probs: Tensor  # (N, L-1)
    exit_index: Tensor  # (N,) long, 0-based exit taken by the deterministic rule


@torch.no_grad()
def predict_exits(heads: nn.Module, gates: Gates, features: Tensor, batch_size: int = 4096) -> ExitPrediction:
    """Per-exit logits, gate probabilities and the deterministic exit of every sample.

    Both modules are evaluated in eval mode; the mode of every submodule is restored afterwards.

    Args:
        heads: maps features ``(B, L, H)`` to per-exit logits ``(B, L, C)``.
        gates: the trained gates.
        features: cached features, shape ``(N, L, H)``.
        batch_size: rows per forward pass (bounds memory on large splits).

    Returns:
        :class:`ExitPrediction` ``(logits (N, L, C), gate_probs (N, L-1), exit_index (N,))``.
    """
    # Per-submodule modes: a plain .train() afterwards would also wake a frozen head kept in eval mode.
    modes = {module: module.training for root in (heads, gates) for module in root.modules()}
    heads.eval()
    gates.eval()
    try:
        device = next(gates.parameters()).device
        logits, probs = [], []
        for chunk in features.split(batch_size):
            chunk_logits = heads(chunk.to(device))  # (B, L, C)
            logits.append(chunk_logits)
            probs.append(gates(chunk_logits).probs)  # (B, L-1)
        all_probs = torch.cat(probs)
        return ExitPrediction(torch.cat(logits), all_probs, exit_decision(all_probs))
    finally:
        for module, training in modes.items():
            module.training = training


def alternation_phase(step: int, alternate_steps: int) -> str:
    """``"gate"`` or ``"im"``: the phase of optimizer step ``step`` (0-based); gate phase first."""
    return "gate" if (step // alternate_steps) % 2 == 0 else "im"


def sgd_with_cosine(
    params: list[Tensor], cfg: JeidnnConfig, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """Stage 2's optimizer: SGD with momentum and weight decay, cosine from ``cfg.lr`` to ``cfg.min_lr``.

    Args:
        params: the trainable parameters.
        cfg: stage-2 settings.
        total_steps: optimizer steps of the whole run (the cosine's length; at least 1 is used).
    """
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps), eta_min=cfg.min_lr
    )
    return optimizer, scheduler


def fit_on_cached_features(
    module: pl.LightningModule,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epochs: int,
    *,
    default_root_dir: str | None,
    logger: Any,
    enable_progress_bar: bool,
    accelerator: str,
) -> None:
    """Fit a stage-2 module for ``epochs`` epochs with the Lightning settings stage 2 shares."""
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(train_loader))),
        default_root_dir=default_root_dir,
    )
    with warnings.catch_warnings():
        # The data are in-memory tensors: worker processes would only add start-up time.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # The frozen final head is kept in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        trainer.fit(module, train_loader, val_loader)


class JeiDnnModule(pl.LightningModule):
    """Alternating JEI-DNN training of the gates and the IMs, with manual optimisation.

    Holds a deep copy of the warm-up heads (the final head, ``heads.heads[-1]``, frozen and kept in
    eval mode) and fresh :class:`Gates`. One SGD optimizer covers gates and IMs; each step only one of
    them has gradients, and SGD skips parameters without gradient, so the idle part is truly fixed
    (no weight decay, no momentum step). Phases switch every ``cfg.alternate_steps`` optimizer steps,
    starting with the gates. The learning rate follows a cosine from ``cfg.lr`` to ``cfg.min_lr`` over
    the whole run.

    Gate positive weights live in the ``pos_weight`` buffer: set them from val before fitting with
    :meth:`set_positive_weights` (as :func:`train_jeidnn` does); the validation loop recomputes them on
    val after every training epoch.

    Args:
        heads: warm-up heads; ``heads(features (B, L, H)) -> (B, L, C)``, ``heads.heads`` an
            ``nn.ModuleList`` of the ``L`` per-exit modules.
        costs: normalised exit costs, shape ``(L,)``.
        lam: accuracy/cost trade-off ``λ``.
        cfg: stage-2 settings.

    Example:
        >>> module = JeiDnnModule(heads, costs, lam=0.5, cfg=JeidnnConfig(epochs=2))
        >>> module.set_positive_weights(val_features, val_labels)
        >>> pl.Trainer(max_epochs=2).fit(module, train_loader, val_loader)
    """

    def __init__(self, heads: nn.Module, costs: Tensor, lam: float, cfg: JeidnnConfig) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.heads = copy.deepcopy(heads)
        num_exits = len(self.heads.heads)
        if costs.shape != (num_exits,):
            raise ValueError(f"costs must have shape ({num_exits},) like the heads, got {tuple(costs.shape)}")
        self.heads.heads[-1].requires_grad_(False)
        # Lightning records each submodule's mode when fit starts and restores it afterwards.
        self.heads.heads[-1].eval()
        self.gates = Gates(num_exits)
        self.lam = float(lam)
        self.cfg = cfg
        self.register_buffer("costs", costs.detach().float().clone())
        self.register_buffer("pos_weight", torch.ones(num_exits - 1))
        self.history: dict[str, list[Any]] = {
            key: [] for key in ("gate_loss", "im_loss", "val_accuracy", "val_cost", "pos_weight")
        }
        self._reset_epoch_sums()

    # ------------------------------------------------------------------ helpers

    @property
    def num_exits(self) -> int:
        return len(self.heads.heads)

    def train(self, mode: bool = True) -> JeiDnnModule:
        # Lightning switches the whole module to train mode; the frozen final head must stay in eval
        # mode so that dropout or batch-norm statistics never change it.
        super().train(mode)
        self.heads.heads[-1].eval()
        return self

    def im_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the IMs (every head except the frozen final one)."""
        return [p for head in self.heads.heads[:-1] for p in head.parameters() if p.requires_grad]

    def phase(self, step: int) -> str:
        """``"gate"`` or ``"im"``: the phase of optimizer step ``step`` (0-based)."""
        return alternation_phase(step, self.cfg.alternate_steps)

    def _val_targets(self, features: Tensor, labels: Tensor) -> Tensor:
        logits = predict_exits(self.heads, self.gates, features).logits
        return gate_targets(per_exit_ce(logits, labels.to(logits.device)), self.costs, self.lam)

    @torch.no_grad()
    def set_positive_weights(self, features: Tensor, labels: Tensor) -> Tensor:
        """Set the gates' positive weights from the current IMs' targets on ``features`` (val).

        Args:
            features: shape ``(N, L, H)``.
            labels: shape ``(N,)``.

        Returns:
            The new ``(L-1,)`` weights.
        """
        weights = positive_weights(
            self._val_targets(features, labels), self.cfg.max_positive_weight, self.cfg.min_positive_weight
        )
        self.pos_weight.copy_(weights)
        return self.pos_weight

    def _reset_epoch_sums(self) -> None:
        self._loss_sums = {"gate": [0.0, 0], "im": [0.0, 0]}
        self._val_targets_seen: list[Tensor] = []
        self._val_correct = 0.0
        self._val_cost = 0.0
        self._val_count = 0

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        params = list(self.gates.parameters()) + self.im_parameters()
        optimizer, scheduler = sgd_with_cosine(params, self.cfg, int(self.trainer.estimated_stepping_batches))
        # Manual optimisation: training_step steps the scheduler after every optimizer step.
        return [optimizer], [scheduler]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        features, labels = batch  # (B, L, H), (B,)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        phase = self.phase(self.global_step)
        if phase == "gate":
            # IMs fixed: their logits only feed the gate features and the targets. Eval mode (no
            # dropout), so the gates learn from the same IM outputs they will see at inference.
            with torch.no_grad():
                self.heads.eval()
                logits = self.heads(features)  # (B, L, C)
                self.train(True)
                targets = gate_targets(per_exit_ce(logits, labels), self.costs, self.lam)  # (B, L-1)
            loss = gate_loss(self.gates(logits).logits, targets, self.pos_weight)
        else:
            logits = self.heads(features)  # (B, L, C)
            # Gates fixed: π is a constant weight of the per-exit losses.
            with torch.no_grad():
                pi = exit_distribution(self.gates(logits).probs)  # (B, L)
            loss = im_loss(logits, labels, pi, self.cfg.im_loss)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        scheduler.step()
        sums = self._loss_sums[phase]
        sums[0] += loss.item() * labels.shape[0]
        sums[1] += labels.shape[0]
        self.log(f"train/{phase}_loss", loss, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        self._loss_sums = {"gate": [0.0, 0], "im": [0.0, 0]}

    def on_train_epoch_end(self) -> None:
        for phase in ("gate", "im"):
            total, count = self._loss_sums[phase]
            # NaN marks an epoch without any step of that phase (K larger than an epoch).
            self.history[f"{phase}_loss"].append(total / count if count else math.nan)

    def on_validation_epoch_start(self) -> None:
        self._val_targets_seen = []
        self._val_correct = 0.0
        self._val_cost = 0.0
        self._val_count = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        features, labels = batch  # (B, L, H), (B,)
        logits = self.heads(features)  # (B, L, C)
        exit_index = exit_decision(self.gates(logits).probs)  # (B,)
        rows = torch.arange(labels.shape[0], device=labels.device)
        predictions = logits[rows, exit_index].argmax(dim=-1)  # (B,)
        self._val_correct += (predictions == labels).sum().item()
        self._val_cost += self.costs[exit_index].sum().item()
        self._val_count += labels.shape[0]
        self._val_targets_seen.append(gate_targets(per_exit_ce(logits, labels), self.costs, self.lam))

    def on_validation_epoch_end(self) -> None:
        if self._val_count == 0:
            return
        accuracy = self._val_correct / self._val_count
        cost = self._val_cost / self._val_count
        self.log("val/accuracy", accuracy)
        self.log("val/cost", cost)
        if self.trainer.sanity_checking:
            return  # a partial pass over val must not change the weights
        # §4: the gate class weights are recounted on val after every epoch.
        targets = torch.cat(self._val_targets_seen)  # (N_val, L-1)
        self.pos_weight.copy_(
            positive_weights(targets, self.cfg.max_positive_weight, self.cfg.min_positive_weight)
        )
        for i, weight in enumerate(self.pos_weight.tolist()):
            self.log(f"val/pos_weight_{i}", weight)
        self.history["val_accuracy"].append(accuracy)
        self.history["val_cost"].append(cost)
        self.history["pos_weight"].append(self.pos_weight.tolist())


@dataclass
class JeiDnnResult:
    """Outcome of :func:`train_jeidnn`.

    Attributes:
        heads: the trained heads (IMs trained, final head unchanged), eval mode, on CPU.
        gates: the trained gates, eval mode, on CPU.
        history: per-epoch lists: ``gate_loss``, ``im_loss`` (mean training losses; NaN for an epoch
            without that phase), ``val_accuracy``, ``val_cost`` (deterministic rule), ``pos_weight``
            (the weights recomputed on val after that epoch), and ``initial_pos_weight``.
    """

    heads: nn.Module
    gates: Gates
    history: dict[str, Any] = field(default_factory=dict)


def train_jeidnn(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    heads: nn.Module,
    costs: Tensor,
    lam: float,
    cfg: JeidnnConfig,
    *,
    default_root_dir: str | None = None,
    logger: Any = False,
    enable_progress_bar: bool = True,
    accelerator: str = "cpu",
    seed: int = 0,
) -> JeiDnnResult:
    """Train gates and IMs for one ``λ`` on cached features; deterministic given ``seed``.

    Args:
        train_features: shape ``(N, L, H)``.
        train_labels: shape ``(N,)``, long.
        val_features: shape ``(M, L, H)``; gate class weights and per-epoch metrics.
        val_labels: shape ``(M,)``, long.
        heads: warm-up heads (copied, never modified).
        costs: normalised exit costs, shape ``(L,)``.
        lam: accuracy/cost trade-off ``λ``.
        cfg: stage-2 settings.
        default_root_dir: Lightning's output folder.
        logger: a Lightning logger, or False.
        enable_progress_bar: show Lightning's progress bar.
        accelerator: Lightning accelerator.
        seed: seeds the gate initialisation (through ``pl.seed_everything``, which also seeds the
            global Python, NumPy and torch generators) and the shuffling.

    Returns:
        :class:`JeiDnnResult` with heads and gates on CPU in eval mode and the training history.

    Example:
        >>> result = train_jeidnn(tr_x, tr_y, va_x, va_y, heads, costs, lam=0.5, cfg=JeidnnConfig())
        >>> logits, gate_probs, exit_index = predict_exits(result.heads, result.gates, test_x)
    """
    pl.seed_everything(seed, verbose=False)
    module = JeiDnnModule(heads, costs, lam, cfg)
    initial = module.set_positive_weights(val_features, val_labels).tolist()

    generator = torch.Generator().manual_seed(seed)
    train_set = TensorDataset(train_features, train_labels)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(TensorDataset(val_features, val_labels), batch_size=max(cfg.batch_size, 512))
    fit_on_cached_features(
        module,
        train_loader,
        val_loader,
        cfg.epochs,
        default_root_dir=default_root_dir,
        logger=logger,
        enable_progress_bar=enable_progress_bar,
        accelerator=accelerator,
    )

    module.cpu().eval()
    history = {key: list(values) for key, values in module.history.items()}
    history["initial_pos_weight"] = initial
    return JeiDnnResult(heads=module.heads, gates=module.gates, history=history)
