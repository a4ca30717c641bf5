"""One side-by-side fit of stage 2: every (variant, λ) of a plan trained at once by one LightningModule.

See :mod:`jeidnn.train.stage2` for the method; batches are rows of the feature cache.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from jeidnn.config.gating import GateVariant, JeidnnConfig
from jeidnn.model.gates import StackedGates
from jeidnn.model.policies import score_exits
from jeidnn.train.stage2 import StackedIMs, TrainedModel, VariantBlock


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
        optimizer, scheduler = self.sgd(int(self.trainer.estimated_stepping_batches))
        return [optimizer], [scheduler]

    def sgd(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """Stage 2's SGD over every parameter and its cosine schedule over ``total_steps`` steps."""
        cfg = self.cfg
        optimizer = torch.optim.SGD(
            self.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps), eta_min=cfg.min_lr
        )
        return optimizer, scheduler

    def on_train_epoch_start(self) -> None:
        self._losses: dict[str, list[list[Tensor]]] = {"gate": [], "im": []}

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self.train_step(batch, self.optimizers(), self.lr_schedulers())

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor], optimizer: Any, scheduler: Any) -> None:
        """One optimizer step of the phase due; the losses kept for the epoch's history."""
        features, labels, final_logits, *given = batch  # (B, L-1, H), (B,), (B, C)[, (B, L-1, C)]
        im_logits = given[0] if given else None  # out-of-fold IM outputs (`gate_data: crossfit`)
        # Own step count: Lightning's global_step counts optimizer steps, and a phase with every variant's
        # IMs frozen takes none.
        phase = alternation_phase(self._steps, self.cfg.alternate_steps)
        self._steps += 1
        im_trained = [b for b in self.blocks if b.variant.im_loss != "frozen"]  # frozen: the warm-up IMs
        # One draw of IM dropout masks per IM step, shared by every model of every variant: a variant trains
        # alike whichever variants train beside it.
        masks = im_trained[0].ims.dropout_masks(features) if phase == "im" and im_trained else None
        losses: list[Tensor | None] = [
            b.gate_phase_loss(features, labels, final_logits, im_logits)
            if phase == "gate"
            else b.im_phase_loss(features, labels, final_logits, masks)
            if b in im_trained
            else None
            for b in self.blocks
        ]  # one (K_v,) per block
        trained = [loss for loss in losses if loss is not None]
        if trained:
            optimizer.zero_grad(set_to_none=True)
            torch.cat(trained).sum().backward()
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
        self.end_validation()

    def end_validation(self) -> None:
        """Each model's val accuracy and cost at its native threshold; BCE positive weights recounted."""
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
    """(accuracy, mean cost) of one model at its native exit threshold; `costs` (L,) float64 on the CPU
    (summed there: MPS has no float64)."""
    exits = score_exits(scores)
    taken = logits[torch.arange(len(exits), device=exits.device), exits]  # (N, C)
    return float((taken.argmax(-1) == labels).float().mean()), float(costs.double()[exits.cpu()].mean())


class _CachedRows(Dataset):
    """Cached rows fetched a whole batch at a time: ``(features[:, :L-1], labels, final_logits)``, and the
    rows' given IM logits when there are any (`gate_data: crossfit`)."""

    def __init__(
        self, features: Tensor, labels: Tensor, final_logits: Tensor, im_logits: Tensor | None = None
    ) -> None:
        self.features, self.labels, self.final_logits = features, labels, final_logits
        self.im_logits = im_logits
        self.num_ims = features.shape[1] - 1

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, rows: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(rows)
        # index_select: the same rows as indexing, several times faster on the (N, L, H) features
        row = (
            self.features.index_select(0, index)[:, : self.num_ims],
            self.labels[index],
            self.final_logits[index],
        )
        return row if self.im_logits is None else (*row, self.im_logits[index])


def _batches(rows: _CachedRows, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    sampler = RandomSampler(rows, generator=generator) if generator is not None else SequentialSampler(rows)
    return DataLoader(
        rows, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None, generator=generator
    )


def eval_logits(module: nn.Module, inputs: Tensor) -> Tensor:
    """``module(inputs)`` in eval mode, 4096 rows at a time (``module`` is copied, its mode untouched)."""
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in inputs.split(4096)])


@torch.no_grad()
def first_model_logits(ims: StackedIMs, features: Tensor, rows: int = 4096) -> Tensor:
    """Model 0's eval-mode IM logits ``(N, L-1, C)`` from IM features ``(N, L-1, H)``, ``rows`` samples at a
    time: all ``K`` models over a whole split at once would hold ``(K, N, L-1, hidden)`` activations (about
    11 GB for `im_head: mlp` at SST-2 size). Leaves ``ims`` in train mode."""
    ims.eval()
    out = torch.cat([ims(chunk)[0] for chunk in features.split(rows)])
    ims.train()
    return out


def fit_on_cache(
    module: Stage2Module, train: DataLoader, val: DataLoader, epochs: int, device: torch.device
) -> None:
    """``epochs`` passes of ``module`` over ``train``, each followed by a pass over ``val``: what
    ``pl.Trainer.fit`` does with it (one optimizer step per batch, the schedule stepped every batch), without
    the trainer's per-step hooks, which cost more than a step on cached rows."""
    optimizer, scheduler = module.sgd(epochs * len(train))
    module.train()
    for _ in range(epochs):
        module.on_train_epoch_start()
        for batch in train:
            module.train_step(tuple(t.to(device) for t in batch), optimizer, scheduler)
        module.on_validation_epoch_start()
        with torch.no_grad():
            for batch in val:
                module.validation_step(tuple(t.to(device) for t in batch), 0)
            module.end_validation()
        module.on_train_epoch_end()


def start_blocks(
    train_features: Tensor,
    val: tuple[Tensor, Tensor, Tensor],
    heads: nn.Module,
    plan: Sequence[tuple[GateVariant, Tensor, Sequence[float]]],
    cfg: JeidnnConfig,
    seed: int,
    im_logits: Tensor | None = None,
) -> list[VariantBlock]:
    """The variant blocks of ``plan`` as training starts: fresh gates (each variant from its own random
    stream), gate-input statistics from the warm-up IMs on ``train_features`` ``(N, L, H)``, and BCE positive
    weights from ``val`` = (IM features ``(M, L-1, H)``, labels ``(M,)``, final logits ``(M, C)``)."""
    hidden_size = train_features.shape[-1]
    blocks = []
    for variant, costs, lambdas in plan:
        # Each variant's gates drawn from its own stream: adding a variant never changes another's start.
        stream = seed * 1_000_003 + zlib.crc32(variant.name.encode())
        block = VariantBlock(
            variant, heads, hidden_size, costs, lambdas, torch.Generator().manual_seed(stream)
        )
        if cfg.lambda_init == "shared":
            # Every λ starts from the gates a fit of one model draws: the models differ by λ alone, and a
            # later round's start is the first round's, whatever the number of models.
            start = StackedGates(
                variant, len(heads.heads), hidden_size, 1, torch.Generator().manual_seed(stream)
            )
            with torch.no_grad():
                for param, first in zip(block.gates.parameters(), start.parameters()):
                    param.copy_(first.expand_as(param))
        # The IM outputs the gates learn on set the statistics: the warm-up IMs' (every model starts from
        # them; alike for every block, so computed once) or the given out-of-fold ones.
        if im_logits is None:
            im_logits = first_model_logits(block.ims, train_features[:, :-1])  # (N, L-1, C)
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
    device: torch.device | str = "cpu",
    im_logits: Tensor | None = None,
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
        device: where the models train (the cached rows move there a batch at a time).
        im_logits: ``(N, L-1, C)``: the IM outputs the gates learn on instead of the IMs' own (`gate_data:
            crossfit`: out-of-fold outputs; every variant of ``plan`` has frozen IMs).

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
        train_features, train_labels, eval_logits(heads.heads[-1], train_features[:, -1]), im_logits
    )
    val_rows = _CachedRows(val_features, val_labels, eval_logits(heads.heads[-1], val_features[:, -1]))
    blocks = start_blocks(
        train_features, val_rows[list(range(len(val_rows)))], heads, plan, cfg, seed, im_logits
    )
    module = Stage2Module(blocks, cfg).to(device)
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # Every tensor of a step is tiny: intra-op threads only add hand-offs, and on a busy machine their
        # spin-waits made a step several times slower.
        torch.set_num_threads(1)
    try:
        fit_on_cache(
            module,
            _batches(train_rows, cfg.batch_size, torch.Generator().manual_seed(seed)),
            _batches(val_rows, max(cfg.batch_size, 1024)),
            cfg.epochs,
            torch.device(device),
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
