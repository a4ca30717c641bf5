"""Stage 2 for a whole λ sweep at once: every λ's gates and IMs trained together (DESIGN.md §3–§4).

:func:`train_jeidnn` trains one model per λ; each of its optimizer steps is tiny, its time goes to per-step
overhead (Python, Lightning, thread hand-offs), so a sweep of ``K`` values pays that overhead ``K`` times.
Here the ``K`` models live side by side in stacked parameters and share every data batch: one step of the
sweep is one step of each model. The models share no parameter, so the gradient of the summed loss is each
model's own gradient, and SGD (momentum, weight decay) acts element by element: one optimizer over the
stacked parameters is ``K`` separate optimizers. Each λ keeps its own gate targets and positive weights;
the frozen final head is shared and its logits are computed once, before training.

Given the same seed, the result for each λ matches :func:`train_jeidnn` run for that λ up to float rounding:
same gate initialisation, same shuffled batches, same dropout masks, same phases and learning rates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from jeidnn.config import JeidnnConfig
from jeidnn.gates import Gates, exit_decision, exit_distribution, gate_features
from jeidnn.jeidnn_module import JeiDnnResult, alternation_phase, fit_on_cached_features, sgd_with_cosine
from jeidnn.losses import gate_loss, gate_targets, im_loss, per_exit_ce, positive_weights

# IM layers that act on each element (or each row) alike, so one call covers all K models.
_ELEMENTWISE = (nn.Identity, nn.Tanh, nn.GELU, nn.ReLU)

# The reference losses of one model, mapped over the leading λ dim: each λ gets exactly train_jeidnn's loss.
_gate_targets = vmap(gate_targets, in_dims=(0, None, 0))  # ce (K, N, L), costs (L,), λ (K,) -> (K, N, L-1)
_gate_loss = vmap(gate_loss)  # (K, N, L-1), (K, N, L-1), (K, L-1) -> (K,)
_im_loss = vmap(im_loss, in_dims=(0, None, 0, None))  # (K, N, L, C), (N,), (K, N, L), mode -> (K,)
_positive_weights = vmap(positive_weights, in_dims=(0, None, None))  # (K, N, L-1), max, min -> (K, L-1)


def _leaf_layers(module: nn.Module) -> list[nn.Module]:
    """The modules without children, in registration order (the order a Sequential runs them)."""
    children = list(module.children())
    return [module] if not children else [leaf for child in children for leaf in _leaf_layers(child)]


class StackedIMs(nn.Module):
    """``K`` copies of the ``L-1`` IMs, evaluated in one batched pass.

    Each IM must be a chain of ``nn.Linear``, ``nn.Dropout`` and elementwise activations (both IM kinds of
    :class:`~jeidnn.heads.ExitHeads`, and a bare ``nn.Linear``), the same chain for every IM. A linear
    layer's weight becomes a ``(L-1, K, out, in)`` parameter and its bias ``(L-1, K, out)``.

    Dropout masks are shared by the ``K`` models and drawn IM by IM from the global generator, the way
    ``heads(features)`` draws them: :func:`train_jeidnn` runs with the same seed for every λ draw exactly
    these masks, so sharing them keeps each λ's run what it would be alone (and costs one model's draws).
    (With several dropout layers per IM the draws come layer by layer instead: still valid, not identical.)

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
                    supported = ", ".join(t.__name__ for t in (nn.Linear, nn.Dropout, *_ELEMENTWISE))
                    raise ValueError(
                        f"train_jeidnn_sweep batches IMs made of {supported}; IM {index} contains a "
                        f"{type(layer).__name__}. Train such heads one λ at a time with train_jeidnn."
                    )
            if [repr(layer) for layer in layers] != [repr(layer) for layer in template]:
                raise ValueError(
                    f"train_jeidnn_sweep needs IMs built alike; IM {index} is {layers}, IM 0 is {template}"
                )
        self.num_models = num_models
        # One entry per layer: the index into `params` of a linear layer's weight (its bias follows),
        # the (parameter-free) module itself otherwise.
        self._ops: list[int | nn.Module] = []
        self.params = nn.ParameterList()
        for position, layer in enumerate(template):
            if not isinstance(layer, nn.Linear):
                self._ops.append(copy.deepcopy(layer))
                continue
            if layer.bias is None:
                raise ValueError("train_jeidnn_sweep needs IM linear layers with a bias, got bias=False")
            self._ops.append(len(self.params))
            for name in ("weight", "bias"):
                tensors = [getattr(layers[position], name) for layers in per_im]
                trainable = {t.requires_grad for t in tensors}
                if len(trainable) > 1:
                    raise ValueError(f"IM {name}s of layer {position} are trainable in some IMs only")
                stacked = torch.stack([t.detach() for t in tensors])[:, None]  # (L-1, 1, out[, in])
                expanded = stacked.expand(-1, num_models, *stacked.shape[2:])  # (L-1, K, out[, in])
                self.params.append(nn.Parameter(expanded.clone(), requires_grad=trainable.pop()))

    def _dropout_noise(self, p: float, like: Tensor) -> Tensor:
        """Dropout multipliers (0 or ``1/(1-p)``), ``(L-1, B, F)``, for activations ``(L-1, B, [K,] F)``."""
        ones = like.new_ones(like.shape[1], like.shape[-1])  # (B, F)
        # F.dropout(x) is x times exactly this noise, drawn from the same generator calls.
        return torch.stack([F.dropout(ones, p, training=True) for _ in range(like.shape[0])])

    def forward(self, features: Tensor) -> Tensor:
        """IM logits of every model.

        Args:
            features: the IMs' features, shape ``(B, L-1, H)`` (shared by the ``K`` models).

        Returns:
            ``(K, B, L-1, C)`` logits.
        """
        z, shared = features.transpose(0, 1), True  # (L-1, B, F) while shared, then (L-1, B, K, F)
        for op in self._ops:
            if isinstance(op, int):
                weight, bias = self.params[op], self.params[op + 1]  # (L-1, K, out, in), (L-1, K, out)
                num_ims, k, out_features, in_features = weight.shape
                if shared:
                    # One matmul per IM for all K models: (B, in) @ (in, K·out), no copy of the weights.
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
                    noise = self._dropout_noise(op.p, z)  # (L-1, B, F)
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


class StackedGates(nn.Module):
    """``K`` copies of :class:`Gates`: weight ``(K, L-1, 4)``, bias ``(K, L-1)``.

    Args:
        gates: the initial gates of every model (copied, never modified).
        num_models: ``K``.
    """

    def __init__(self, gates: Gates, num_models: int) -> None:
        super().__init__()
        weight = torch.cat([gate.weight.detach() for gate in gates.gates])  # (L-1, 4)
        bias = torch.cat([gate.bias.detach() for gate in gates.gates])  # (L-1,)
        self.weight = nn.Parameter(weight.expand(num_models, *weight.shape).clone())  # (K, L-1, 4)
        self.bias = nn.Parameter(bias.expand(num_models, *bias.shape).clone())  # (K, L-1)

    def forward(self, logits: Tensor) -> Tensor:
        """Gate logits ``(K, B, L-1)`` from per-exit logits ``(K, B, L, C)``; the last exit is ignored."""
        # Detached, as in Gates: the gate loss must not train the IMs (§4).
        features = gate_features(logits[:, :, :-1].detach().softmax(dim=-1))  # (K, B, L-1, 4)
        return torch.einsum("kblf,klf->kbl", features, self.weight) + self.bias[:, None]

    @torch.no_grad()
    def write_into(self, model: int, gates: Gates) -> None:
        """Copy model ``model``'s weights into ``gates``."""
        for index, gate in enumerate(gates.gates):
            gate.weight.copy_(self.weight[model, index][None])
            gate.bias.copy_(self.bias[model, index][None])


class JeiDnnSweepModule(pl.LightningModule):
    """:class:`~jeidnn.jeidnn_module.JeiDnnModule` for ``K`` values of λ at once, with shared batches.

    Batches are ``(features (B, L-1, H), labels (B,), final_logits (B, C))``: the IMs' features and the
    frozen final head's logits, which never change and are computed once. Phases, optimizer and schedule
    are those of ``JeiDnnModule``; losses are averaged over samples per λ and summed over λ. Per-λ losses,
    val accuracy and val cost are accumulated on the device and read once per epoch.

    Args:
        heads: warm-up heads; ``heads.heads`` holds the ``L`` per-exit modules (only the IMs are used).
        gates: the initial gates of every λ.
        costs: normalised exit costs, shape ``(L,)``.
        lambdas: the ``K`` trade-offs.
        cfg: stage-2 settings.
    """

    def __init__(
        self, heads: nn.Module, gates: Gates, costs: Tensor, lambdas: Sequence[float], cfg: JeidnnConfig
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        num_exits = len(heads.heads)
        if costs.shape != (num_exits,):
            raise ValueError(f"costs must have shape ({num_exits},) like the heads, got {tuple(costs.shape)}")
        if gates.num_exits != num_exits:
            raise ValueError(f"gates cover {gates.num_exits} exits but the heads have {num_exits}")
        self.num_models = len(lambdas)
        self.cfg = cfg
        self.ims = StackedIMs(heads.heads[:-1], self.num_models)
        self.gates = StackedGates(gates, self.num_models)
        self.register_buffer("costs", costs.detach().float().clone())
        self.register_buffer("lambdas", torch.tensor([float(lam) for lam in lambdas]))
        self.register_buffer("pos_weight", torch.ones(self.num_models, num_exits - 1))
        self.history: list[dict[str, list[Any]]] = [
            {key: [] for key in ("gate_loss", "im_loss", "val_accuracy", "val_cost", "pos_weight")}
            for _ in lambdas
        ]

    def exit_logits(self, features: Tensor, final_logits: Tensor) -> Tensor:
        """Per-exit logits ``(K, B, L, C)`` from IM features ``(B, L-1, H)`` and final logits ``(B, C)``."""
        im_logits = self.ims(features)  # (K, B, L-1, C)
        final = final_logits[None, :, None].expand(self.num_models, -1, -1, -1)  # (K, B, 1, C)
        return torch.cat([im_logits, final.to(im_logits.dtype)], dim=2)

    def targets(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Gate targets ``(K, B, L-1)`` of each λ from logits ``(K, B, L, C)`` and labels ``(B,)``."""
        k, b, num_exits, _ = logits.shape
        ce = per_exit_ce(logits.reshape(k * b, num_exits, -1), labels.repeat(k)).view(k, b, num_exits)
        return _gate_targets(ce, self.costs, self.lambdas)

    @torch.no_grad()
    def set_positive_weights(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Set every λ's positive weights from logits ``(N, L, C)`` shared by all models (the warm-up IMs).

        Returns:
            The new ``(K, L-1)`` weights.
        """
        logits = logits.to(self.costs.device)
        targets = self.targets(logits.expand(self.num_models, *logits.shape), labels.to(logits.device))
        self.pos_weight.copy_(
            _positive_weights(targets, self.cfg.max_positive_weight, self.cfg.min_positive_weight)
        )
        return self.pos_weight

    # ------------------------------------------------------------------ Lightning hooks

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer, scheduler = sgd_with_cosine(params, self.cfg, int(self.trainer.estimated_stepping_batches))
        return [optimizer], [scheduler]

    def on_train_epoch_start(self) -> None:
        # Per-step (K,) losses and batch sizes, kept on the device and read once at the epoch's end.
        self._step_losses: dict[str, list[Tensor]] = {"gate": [], "im": []}
        self._step_sizes: dict[str, list[int]] = {"gate": [], "im": []}

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        features, labels, final_logits = batch  # (B, L-1, H), (B,), (B, C)
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        phase = alternation_phase(self.global_step, self.cfg.alternate_steps)
        if phase == "gate":
            # IMs fixed, and in eval mode (no dropout): the gates learn from the IM outputs they will
            # see at inference.
            with torch.no_grad():
                self.ims.eval()
                logits = self.exit_logits(features, final_logits)  # (K, B, L, C)
                self.ims.train()
                targets = self.targets(logits, labels)  # (K, B, L-1)
            losses = _gate_loss(self.gates(logits), targets, self.pos_weight)  # (K,)
        else:
            logits = self.exit_logits(features, final_logits)  # (K, B, L, C)
            with torch.no_grad():  # gates fixed
                g = torch.sigmoid(self.gates(logits))  # (K, B, L-1)
                pi = exit_distribution(g.flatten(0, 1)).view(*g.shape[:2], -1)  # (K, B, L)
            losses = _im_loss(logits, labels, pi, self.cfg.im_loss)  # (K,)
        optimizer.zero_grad(set_to_none=True)
        # No parameter is shared between λ: the gradient of the sum is each model's own.
        self.manual_backward(losses.sum())
        optimizer.step()
        scheduler.step()
        self._step_losses[phase].append(losses.detach())
        self._step_sizes[phase].append(labels.shape[0])

    def on_train_epoch_end(self) -> None:
        for phase in ("gate", "im"):
            sizes = self._step_sizes[phase]
            if sizes:
                losses = torch.stack(self._step_losses[phase]).double().cpu()  # (steps, K)
                weights = torch.tensor(sizes, dtype=torch.float64)  # (steps,)
                means = (weights @ losses / weights.sum()).tolist()  # (K,) sample-weighted means
            else:
                # NaN marks an epoch without any step of that phase (K larger than an epoch).
                means = [math.nan] * self.num_models
            for k, history in enumerate(self.history):
                history[f"{phase}_loss"].append(means[k])
                if sizes:
                    self.log(f"train/{phase}_loss_lambda_{k}", means[k])

    def on_validation_epoch_start(self) -> None:
        # Per-batch (K,) sums, read once at the epoch's end.
        self._val_targets: list[Tensor] = []
        self._val_correct: list[Tensor] = []
        self._val_cost: list[Tensor] = []
        self._val_count = 0

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        features, labels, final_logits = batch  # (B, L-1, H), (B,), (B, C)
        logits = self.exit_logits(features, final_logits)  # (K, B, L, C)
        k, b, _, num_classes = logits.shape
        g = torch.sigmoid(self.gates(logits))  # (K, B, L-1)
        exit_index = exit_decision(g.flatten(0, 1)).view(k, b)  # (K, B)
        taken = logits.gather(2, exit_index[:, :, None, None].expand(k, b, 1, num_classes))  # (K, B, 1, C)
        self._val_correct.append((taken.squeeze(2).argmax(dim=-1) == labels).sum(dim=1))
        self._val_cost.append(self.costs[exit_index].sum(dim=1))
        self._val_count += b
        self._val_targets.append(self.targets(logits, labels))

    def on_validation_epoch_end(self) -> None:
        if self._val_count == 0 or self.trainer.sanity_checking:
            return  # a partial pass over val must not change the weights
        count = self._val_count
        accuracy = [correct / count for correct in torch.stack(self._val_correct).sum(dim=0).tolist()]
        cost = [cost / count for cost in torch.stack(self._val_cost).double().sum(dim=0).tolist()]
        # §4: each λ's gate class weights are recounted on val after every epoch.
        targets = torch.cat(self._val_targets, dim=1)  # (K, N_val, L-1)
        self.pos_weight.copy_(
            _positive_weights(targets, self.cfg.max_positive_weight, self.cfg.min_positive_weight)
        )
        pos_weight = self.pos_weight.tolist()
        for k, history in enumerate(self.history):
            history["val_accuracy"].append(accuracy[k])
            history["val_cost"].append(cost[k])
            history["pos_weight"].append(pos_weight[k])
            self.log(f"val/accuracy_lambda_{k}", accuracy[k])
            self.log(f"val/cost_lambda_{k}", cost[k])


class _CachedRows(Dataset):
    """Cached rows fetched a whole batch at a time (one gather instead of a per-row collate).

    Items are ``(features[:, :L-1] (B, L-1, H), labels (B,), final_logits (B, C))`` for a list of rows.
    """

    def __init__(self, features: Tensor, labels: Tensor, final_logits: Tensor) -> None:
        self.features, self.labels, self.final_logits = features, labels, final_logits
        self.num_ims = features.shape[1] - 1

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        index = torch.as_tensor(rows)
        return self.features[index, : self.num_ims], self.labels[index], self.final_logits[index]


def _batches(rows: _CachedRows, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    """Batches of ``rows``; shuffled with ``generator`` in the very order ``train_jeidnn``'s loader draws.

    ``DataLoader(shuffle=True, generator=g)`` builds ``BatchSampler(RandomSampler(generator=g))`` and draws
    its base seed from ``g``: the same chain here yields the same batches.
    """
    sampler = RandomSampler(rows, generator=generator) if generator is not None else SequentialSampler(rows)
    return DataLoader(
        rows, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None, generator=generator
    )


@torch.no_grad()
def _eval_logits(module: nn.Module, inputs: Tensor, batch_size: int = 4096) -> Tensor:
    """``module(inputs)`` in eval mode, chunk by chunk, on ``inputs``' device (``module`` is copied)."""
    module = copy.deepcopy(module).eval()
    param = next(module.parameters(), None)
    device = param.device if param is not None else inputs.device
    return torch.cat([module(chunk.to(device)).to(inputs.device) for chunk in inputs.split(batch_size)])


def train_jeidnn_sweep(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    heads: nn.Module,
    costs: Tensor,
    lambdas: list[float],
    cfg: JeidnnConfig,
    *,
    default_root_dir: str | None = None,
    logger: Any = False,
    enable_progress_bar: bool = True,
    accelerator: str = "cpu",
    seed: int = 0,
) -> list[JeiDnnResult]:
    """Train gates and IMs for every λ at once on cached features; deterministic given ``seed``.

    Same arguments as :func:`~jeidnn.jeidnn_module.train_jeidnn`, with ``lambdas`` in place of one
    ``lam``. The heads must apply ``heads.heads[i]`` to ``features[:, i]`` (as
    :class:`~jeidnn.heads.ExitHeads` does), with IMs made of linear layers, dropout and elementwise
    activations (both ``im_head`` kinds).

    Every λ starts from the gates ``train_jeidnn`` draws for ``seed`` and sees its batches and dropout
    masks, so each result equals ``train_jeidnn``'s for that λ up to float rounding.

    Returns:
        One :class:`~jeidnn.jeidnn_module.JeiDnnResult` per λ, in order: a copy of ``heads`` holding that
        λ's IMs and its gates, both on CPU in eval mode, and its history (the keys of ``train_jeidnn``'s).

    Example:
        >>> results = train_jeidnn_sweep(tr_x, tr_y, va_x, va_y, heads, costs, [0.1, 0.5], JeidnnConfig())
        >>> logits, gate_probs, exit_index = predict_exits(results[1].heads, results[1].gates, test_x)
    """
    if len(lambdas) == 0:
        raise ValueError("lambdas must hold at least one trade-off value, got an empty list")
    num_exits = len(heads.heads)
    if train_features.dim() != 3 or train_features.shape[1] != num_exits:
        raise ValueError(
            f"expected train features of shape (N, {num_exits}, H), got {tuple(train_features.shape)}"
        )
    pl.seed_everything(seed, verbose=False)
    # train_jeidnn draws its gates right after seeding: every λ here starts from those same gates.
    gates = Gates(num_exits)
    module = JeiDnnSweepModule(heads, gates, costs, lambdas, cfg)

    val_logits = _eval_logits(heads, val_features)  # (M, L, C): the warm-up heads, shared by every λ
    initial = module.set_positive_weights(val_logits, val_labels).tolist()
    final_head = heads.heads[-1]
    train_rows = _CachedRows(train_features, train_labels, _eval_logits(final_head, train_features[:, -1]))
    val_rows = _CachedRows(val_features, val_labels, _eval_logits(final_head, val_features[:, -1]))

    # The stacked IMs rebuild heads(features) from heads.heads; check that reading on a few val rows.
    check = val_rows[list(range(min(64, len(val_rows))))]
    with torch.no_grad():
        rebuilt = module.eval().to(val_logits.device).exit_logits(check[0], check[2])[0]  # (b, L, C)
    module.train()
    if not torch.allclose(rebuilt, val_logits[: rebuilt.shape[0]], rtol=1e-4, atol=1e-4):
        raise ValueError(
            "train_jeidnn_sweep expects heads(features)[:, i] == heads.heads[i](features[:, i]), as in "
            "ExitHeads; these heads compute something else. Use train_jeidnn for them."
        )

    train_loader = _batches(train_rows, cfg.batch_size, torch.Generator().manual_seed(seed))
    val_loader = _batches(val_rows, max(cfg.batch_size, 512))
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
    results = []
    for k, history in enumerate(module.history):
        model_heads = copy.deepcopy(heads).cpu()
        module.ims.write_into(k, model_heads.heads[:-1])
        model_heads.heads[-1].requires_grad_(False)
        model_gates = copy.deepcopy(gates)
        module.gates.write_into(k, model_gates)
        model_history: dict[str, Any] = {key: list(values) for key, values in history.items()}
        model_history["initial_pos_weight"] = initial[k]
        results.append(
            JeiDnnResult(heads=model_heads.eval(), gates=model_gates.eval(), history=model_history)
        )
    return results
