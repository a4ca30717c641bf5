"""Early-exit inference: a backbone, its exit heads and gates as one deployable model.

Two forwards that must agree (the tests check it on every architecture):

* :meth:`EarlyExitModel.forward_full` runs every layer for every sample, evaluates every exit and
  lets the gates pick an exit from all per-exit logits: the reference path.
* :meth:`EarlyExitModel.forward_dynamic` runs layer by layer on the rows still running; a row leaves
  the batch at the exit its gate chooses, so its later layers are never computed.

:meth:`EarlyExitModel.save_pretrained` writes a folder without any pickle::

    folder/backbone/           the Hugging Face model and its tokenizer or image processor
    folder/exits.safetensors   heads.* and gates.* weights
    folder/jeidnn.json         labels, exit layers, costs, conformal quantiles, gate settings, ...
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from jeidnn.backbone import Backbone
from jeidnn.baselines import ConfidenceMeasure, apply_thresholds, confidence, patience_exits, static_exits
from jeidnn.errors import JeidnnError, first_line
from jeidnn.gates import DEFAULT_TAU, Gates, GateSettings, score_exits
from jeidnn.heads import ExitHeads
from jeidnn.predict import Prediction, make_batches, to_predictions

__all__ = [
    "EarlyExitModel",
    "EarlyExitOutput",
    "PatienceGates",
    "Prediction",
    "StaticGates",
    "ThresholdGates",
]

FORMAT_VERSION = 2
"""Version of the folder layout written by :meth:`EarlyExitModel.save_pretrained`."""

MEASURES: tuple[str, ...] = ("maxprob", "entropy", "margin")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars, which clutter `jeidnn predict`."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class ThresholdGates(nn.Module):
    """Threshold gating baseline: exit at the first exit whose confidence reaches its threshold.

    One threshold repeated at every exit is the global-threshold (DeeBERT-style) baseline.

    Args:
        thresholds: one threshold per intermediate exit, shape ``(L-1,)``.
        measure: ``maxprob``, ``entropy`` (negative entropy as confidence) or ``margin``.

    Example:
        >>> gates = ThresholdGates([0.9, 0.8], measure="maxprob")
        >>> gates.exits(torch.randn(4, 3, 5)).shape  # per-exit logits (N, L, C) -> 0-based exits (N,)
        torch.Size([4])
    """

    def __init__(self, thresholds: Sequence[float] | Tensor, measure: ConfidenceMeasure = "maxprob") -> None:
        super().__init__()
        if measure not in MEASURES:
            raise JeidnnError(f"unknown confidence measure {measure!r}; choose one of {', '.join(MEASURES)}")
        self.measure: ConfidenceMeasure = measure
        # Not persistent: the thresholds live in the model's config, readable by a person.
        self.register_buffer(
            "thresholds", torch.as_tensor(thresholds, dtype=torch.float32).flatten(), persistent=False
        )

    @property
    def num_exits(self) -> int:
        return self.thresholds.numel() + 1

    def forward(self, logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> confidence at every exit ``(N, L)``."""
        return confidence(logits.softmax(dim=-1), self.measure)

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exit: the first at or above its threshold."""
        return apply_thresholds(self(exit_logits), self.thresholds)

    def reads_exit(self, index: int) -> bool:
        return True

    def init_state(self, batch: int, device: torch.device | str | None = None) -> None:
        return None

    def step(self, index: int, exit_logits: Tensor, state: None) -> tuple[Tensor, None]:
        """Whether each running sample exits at intermediate exit ``index``: ``(B, C)`` -> ``(B,)`` bool."""
        return confidence(exit_logits.softmax(dim=-1), self.measure) >= self.thresholds[index], None


@dataclass
class PatienceState:
    """Per-sample state of :class:`PatienceGates` between exits."""

    run: Tensor  # (B,) long: consecutive exits so far whose argmax equals their predecessor's
    pred: Tensor  # (B,) long: argmax at the last exit seen

    def __getitem__(self, idx: Tensor) -> PatienceState:
        return PatienceState(self.run[idx], self.pred[idx])


def _predictions(exit_logits: Tensor) -> Tensor:
    """Argmax of the softmax, as the evaluation takes it (float32 softmax ties resolve the same way)."""
    return exit_logits.float().softmax(dim=-1).argmax(dim=-1)


class PatienceGates(nn.Module):
    """PABEE: exit once the argmax has stayed the same for ``patience`` consecutive exits.

    The rule of :func:`jeidnn.baselines.patience_exits`: a sample leaves at the first exit ``l`` whose
    prediction equals those of exits ``l - 1 .. l - patience``; ``patience = 0`` leaves at the first exit.

    Args:
        patience: ``t >= 0``.

    Example:
        >>> PatienceGates(1).exits(torch.tensor([[[0.0, 1.0], [0.0, 2.0], [3.0, 0.0]]])).tolist()
        [1]
    """

    def __init__(self, patience: int) -> None:
        super().__init__()
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise JeidnnError(f"patience must be a non-negative integer, got {patience!r}")
        self.patience = patience

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exits."""
        # The evaluation's own function (it works on the CPU): the reference path is the baseline's rule.
        return patience_exits(_predictions(exit_logits).cpu(), self.patience).to(exit_logits.device)

    def reads_exit(self, index: int) -> bool:
        return True

    def init_state(self, batch: int, device: torch.device | str | None = None) -> PatienceState:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return PatienceState(zeros, zeros)

    def step(self, index: int, exit_logits: Tensor, state: PatienceState) -> tuple[Tensor, PatienceState]:
        """Whether each running sample exits at exit ``index`` ``(B,)`` bool, and the state after it."""
        pred = _predictions(exit_logits)  # (B,)
        run = torch.where(pred == state.pred, state.run + 1, 0) if index > 0 else state.run
        return run >= self.patience, PatienceState(run, pred)


class StaticGates(nn.Module):
    """Static depth (layer pruning): every sample exits at the 0-based exit ``exit_index``.

    The layer-skipping path never runs the layers after that exit, nor the exit heads before it.

    Example:
        >>> StaticGates(1).exits(torch.randn(4, 3, 5)).tolist()
        [1, 1, 1, 1]
    """

    def __init__(self, exit_index: int) -> None:
        super().__init__()
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or exit_index < 0:
            raise JeidnnError(f"the static exit index must be a non-negative integer, got {exit_index!r}")
        self.exit_index = exit_index

    def exits(self, exit_logits: Tensor) -> Tensor:
        """Per-exit logits ``(N, L, C)`` -> ``(N,)`` 0-based exits, all ``exit_index``."""
        return static_exits(exit_logits.shape[0], self.exit_index).to(exit_logits.device)

    def reads_exit(self, index: int) -> bool:
        return index == self.exit_index

    def init_state(self, batch: int, device: torch.device | str | None = None) -> None:
        return None

    def step(self, index: int, exit_logits: Tensor, state: None) -> tuple[Tensor, None]:
        stop = index == self.exit_index
        return torch.full((exit_logits.shape[0],), stop, dtype=torch.bool, device=exit_logits.device), None


RuleGates = ThresholdGates | PatienceGates | StaticGates
"""Gates without parameters: an exit rule on the exits' logits (the baselines of docs/evaluation.md)."""


@dataclass
class EarlyExitOutput:
    """Result of an early-exit forward on a batch of ``B`` samples (``L`` exits, ``C`` classes).

    Attributes:
        logits: logits of the exit each sample took, ``(B, C)``.
        probs: their softmax, ``(B, C)``.
        exit_index: 0-based exit taken, ``(B,)`` long.
        exit_layer: 1-based backbone layer of that exit, ``(B,)`` long.
        cost: normalised cost of that exit (1 = the plain backbone), ``(B,)``.
        exit_logits: logits of every exit, ``(B, L, C)`` (full path only, else None).
        gate_scores: learned gates' exit scores, ``(B, L-1)`` (full path with learned gates only).
    """

    logits: Tensor  # (B, C)
    probs: Tensor  # (B, C)
    exit_index: Tensor  # (B,)
    exit_layer: Tensor  # (B,)
    cost: Tensor  # (B,)
    exit_logits: Tensor | None = None  # (B, L, C)
    gate_scores: Tensor | None = None  # (B, L-1)


class EarlyExitModel(nn.Module):
    """A backbone with exit heads and gates that stops each input at the exit its gate chooses.

    Args:
        backbone: the encoder.
        heads: one classifier per exit; ``heads.layers[-1]`` must be the backbone's last layer.
        gates: learned :class:`~jeidnn.gates.Gates`, a rule (:class:`ThresholdGates`, :class:`PatienceGates`,
            :class:`StaticGates`), or None (always the last exit).
        exit_threshold: learned gates: a sample exits at the first exit whose score reaches it (0.5 = the
            rule the gates were trained for; a budgeted export may pick another on calib).
        preprocessor: tokenizer (text) or image processor (images); None for tensor inputs only.
        labels: class names in class-index order (default ``"0" .. "C-1"``).
        costs: normalised cost of each exit (docs/method.md); default ``layer / num_layers``, a rough guess.
        conformal_quantiles: ``{"0.1": [q_1 .. q_L], ...}`` per-exit conformal quantiles per α.
        max_length: text inputs are truncated to this many tokens.
        metadata: anything JSON-serialisable to keep with the model (λ, GFLOPs, training run...).

    Example:
        >>> model = EarlyExitModel(backbone, heads, Gates(heads.num_exits), tokenizer, labels=["neg", "pos"],
        ...                        costs=[0.35, 0.68, 1.01], conformal_quantiles={"0.1": [0.4, 0.5, 0.6]})
        >>> model.predict(["what a great day"])[0].label
        'pos'
        >>> model.save_pretrained("out/model"); model = EarlyExitModel.from_pretrained("out/model")
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: ExitHeads,
        gates: Gates | RuleGates | None,
        preprocessor: Any = None,
        labels: Sequence[str] | None = None,
        costs: Sequence[float] | None = None,
        conformal_quantiles: Mapping[str, Sequence[float]] | None = None,
        max_length: int = 64,
        metadata: Mapping[str, Any] | None = None,
        exit_threshold: float = DEFAULT_TAU,
    ) -> None:
        super().__init__()
        num_exits, num_layers = heads.num_exits, backbone.num_layers
        if heads.layers[-1] != num_layers or sorted(set(heads.layers)) != heads.layers or heads.layers[0] < 1:
            raise JeidnnError(
                f"exit layers {heads.layers} must ascend within 1..{num_layers} and end at the last layer"
            )
        if isinstance(gates, (Gates, ThresholdGates)) and gates.num_exits != num_exits:
            raise JeidnnError(f"the gates expect {gates.num_exits} exits but the heads have {num_exits}")
        if isinstance(gates, StaticGates) and gates.exit_index >= num_exits:
            raise JeidnnError(
                f"static exit index {gates.exit_index} is out of range for a model with {num_exits} exits "
                f"(0-based, at most {num_exits - 1})"
            )
        labels = [str(i) for i in range(heads.num_classes)] if labels is None else [str(x) for x in labels]
        if len(labels) != heads.num_classes:
            raise JeidnnError(f"{len(labels)} labels {labels} for a model with {heads.num_classes} classes")
        costs = [layer / num_layers for layer in heads.layers] if costs is None else [float(c) for c in costs]
        if len(costs) != num_exits:
            raise JeidnnError(f"{len(costs)} exit costs {costs} for a model with {num_exits} exits")
        quantiles = {str(a): [float(q) for q in qs] for a, qs in (conformal_quantiles or {}).items()}
        for alpha, qs in quantiles.items():
            if len(qs) != num_exits:
                raise JeidnnError(
                    f"conformal quantiles for alpha {alpha} have {len(qs)} values, need {num_exits}"
                )
        self.backbone, self.heads, self.gates = backbone, heads, gates
        self.preprocessor = preprocessor
        self.labels, self.costs, self.conformal_quantiles = labels, costs, quantiles
        self.max_length = int(max_length)
        self.metadata = dict(metadata or {})
        self.register_buffer("cost_per_exit", torch.tensor(costs), persistent=False)  # (L,)
        self.register_buffer("layer_per_exit", torch.tensor(heads.layers), persistent=False)  # (L,)
        exit_at = {layer: k for k, layer in enumerate(heads.layers)}
        # For each 0-based backbone layer: the exit after it, or None (exits may sit on a subset of layers).
        self._exit_after_layer: list[int | None] = [exit_at.get(i + 1) for i in range(num_layers)]
        self.exit_threshold = float(exit_threshold)

    @property
    def num_exits(self) -> int:
        return self.heads.num_exits

    @property
    def num_classes(self) -> int:
        return self.heads.num_classes

    # ------------------------------------------------------------------ forwards
    def forward(self, inputs: Mapping[str, Tensor]) -> EarlyExitOutput:
        """Same as :meth:`forward_dynamic`."""
        return self.forward_dynamic(inputs)

    def forward_full(self, inputs: Mapping[str, Tensor]) -> EarlyExitOutput:
        """Every layer and every exit for every sample; the gates then choose the exit (reference path)."""
        features = self.backbone(dict(inputs), self.heads.layers)  # (B, L, H)
        exit_logits = self.heads(features)  # (B, L, C)
        batch = exit_logits.shape[0]
        gate_scores = None
        if isinstance(self.gates, Gates):
            gate_scores = self.gates.scores(exit_logits, features)  # (B, L-1)
            exit_index = score_exits(gate_scores, self.exit_threshold)
        elif self.gates is not None:
            exit_index = self.gates.exits(exit_logits)
        else:
            exit_index = torch.full((batch,), self.num_exits - 1, dtype=torch.long, device=exit_logits.device)
        logits = exit_logits[torch.arange(batch, device=exit_logits.device), exit_index]  # (B, C)
        return self._output(logits, exit_index, exit_logits, gate_scores)

    @torch.inference_mode()
    def forward_dynamic(self, inputs: Mapping[str, Tensor]) -> EarlyExitOutput:
        """Layer-skipping inference: each layer runs only on the rows that have not exited yet.

        Inference only (runs under ``torch.inference_mode``); call ``eval()`` first so dropout is off.
        Each gated exit costs one host synchronisation (how many rows stop there); an exit where nobody
        stops costs nothing else but the exit head and the gate on the running rows.
        """
        backbone, heads, gates = self.backbone, self.heads.heads, self.gates
        last = self.num_exits - 1
        hidden, mask = backbone.embed(dict(inputs))  # (B, T, H), mask (B, 1, T, T) or None
        # Mean pooling needs the (B, T) padding mask of the rows still running; cast once, not per exit.
        token_mask = inputs.get("attention_mask") if backbone.pooling == "mean" else None
        if token_mask is not None:
            token_mask = token_mask.to(hidden.dtype)
        batch = hidden.shape[0]
        learned = isinstance(gates, Gates)
        state = gates.init_state(batch, device=hidden.device) if gates is not None else None
        tau = self.exit_threshold
        rows: Tensor | None = None  # original row of each running sample; None = all of them, in order
        # (rows, logits (b, C), exit) of each group of samples that left, in the order they left.
        left: list[tuple[Tensor | None, Tensor, int]] = []
        for i, k in enumerate(self._exit_after_layer):
            hidden = backbone.run_layer(i, hidden, mask)  # (b, T, H)
            if k is None or (k < last and (gates is None or not (learned or gates.reads_exit(k)))):
                continue
            pooled = backbone.pool(hidden, token_mask)  # (b, H)
            logits = heads[k](pooled)  # (b, C)
            if k == last:  # everyone still running exits here
                left.append((rows, logits, k))
                break
            if learned:
                score, state = gates.step(k, logits, pooled, state)  # (b,)
                stop = score >= tau
            else:
                stop, state = gates.step(k, logits, state)
            n_stop = int(stop.sum())  # the one host sync of this exit
            if n_stop == 0:
                continue
            running = stop.shape[0]
            if n_stop == running:
                left.append((rows, logits, k))
                break
            # A stable sort puts the continuing rows first, in order, without a second sync (nonzero syncs).
            order = torch.argsort(stop, stable=True)  # (b,)
            keep, leave = order[: running - n_stop], order[running - n_stop :]
            left.append((rows[leave] if rows is not None else leave, logits.index_select(0, leave), k))
            # Only the per-sample tensors shrink: hidden states, the padding masks, the gate state.
            hidden = hidden.index_select(0, keep)
            mask = Backbone.select_rows(mask, keep)
            if token_mask is not None:
                token_mask = token_mask.index_select(0, keep)
            rows = rows[keep] if rows is not None else keep
            if state is not None:
                state = state[keep]
        if len(left) == 1:  # everyone left at the same exit: no scatter
            _, logits, k = left[0]
            return self._output(logits, torch.full((batch,), k, dtype=torch.long, device=logits.device))
        out_logits = hidden.new_empty(batch, self.num_classes)  # (B, C)
        out_exit = hidden.new_empty(batch, dtype=torch.long)  # (B,)
        for dest, logits, k in left:
            out_logits[dest], out_exit[dest] = logits, k
        return self._output(out_logits, out_exit)

    def _output(
        self,
        logits: Tensor,
        exit_index: Tensor,
        exit_logits: Tensor | None = None,
        gate_scores: Tensor | None = None,
    ) -> EarlyExitOutput:
        return EarlyExitOutput(
            logits=logits,
            probs=logits.softmax(dim=-1),
            exit_index=exit_index,
            exit_layer=self.layer_per_exit[exit_index],
            cost=self.cost_per_exit[exit_index],
            exit_logits=exit_logits,
            gate_scores=gate_scores,
        )

    # ------------------------------------------------------------------ predict
    def quantiles_for(self, alpha: float) -> Tensor:
        """The calibrated per-exit conformal quantiles ``(L,)`` for ``alpha``."""
        for key, qs in self.conformal_quantiles.items():
            if abs(float(key) - alpha) < 1e-9:
                return torch.tensor(qs, dtype=torch.float64)
        available = ", ".join(sorted(self.conformal_quantiles, key=float)) or "none"
        raise JeidnnError(f"alpha {alpha} was not calibrated for this model; available: {available}")

    def predict(
        self,
        inputs: Sequence[str] | Sequence[Any] | Mapping[str, Tensor],
        *,
        alpha: float | None = 0.1,
        batch_size: int = 64,
    ) -> list[Prediction]:
        """Predict texts, PIL images or a dict of model-ready tensors with the layer-skipping path.

        Args:
            inputs: list of texts (text models), list of PIL images (vision models), or tensors
                such as ``{"input_ids": (N, T), "attention_mask": (N, T)}``.
            alpha: miscoverage level of the conformal prediction sets (must have been calibrated);
                None skips the sets.
            batch_size: samples per forward.

        Returns:
            One :class:`Prediction` per input, in input order.
        """
        quantiles = None if alpha is None else self.quantiles_for(alpha)
        if batch_size < 1:
            raise JeidnnError(f"batch size must be a positive integer, got {batch_size}")
        was_training = self.training
        self.eval()
        device = self.cost_per_exit.device
        predictions: list[tuple[int, Prediction]] = []
        try:
            with torch.inference_mode():
                for positions, batch in make_batches(self, inputs, batch_size):
                    out = self.forward_dynamic({k: v.to(device) for k, v in batch.items()})
                    predictions.extend(zip(positions, to_predictions(self, out, quantiles)))
        finally:
            self.train(was_training)
        return [p for _, p in sorted(predictions, key=lambda item: item[0])]

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | Path) -> None:
        """Write the model to ``folder`` (backbone/, exits.safetensors, jeidnn.json); no pickle anywhere."""
        folder = Path(folder)
        (folder / "backbone").mkdir(parents=True, exist_ok=True)
        with _no_progress_bars():
            self.backbone.model.save_pretrained(folder / "backbone")
        if self.preprocessor is not None:
            self.preprocessor.save_pretrained(folder / "backbone")
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        if isinstance(self.gates, Gates):
            state.update({f"gates.{k}": v for k, v in self.gates.state_dict().items()})
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "exits.safetensors")
        )
        gates: dict[str, Any] = {"type": "none"}
        if isinstance(self.gates, Gates):
            gates = {
                "type": "learned",
                "settings": self.gates.settings.to_dict(),
                "hidden_size": self.gates.hidden_mean.shape[-1],
                "exit_threshold": self.exit_threshold,
            }
        elif isinstance(self.gates, ThresholdGates):
            gates = {
                "type": "threshold",
                "measure": self.gates.measure,
                "thresholds": self.gates.thresholds.tolist(),
            }
        elif isinstance(self.gates, PatienceGates):
            gates = {"type": "patience", "patience": self.gates.patience}
        elif isinstance(self.gates, StaticGates):
            gates = {"type": "static", "exit_index": self.gates.exit_index}
        config = {
            "format_version": FORMAT_VERSION,
            "arch": self.backbone.arch,
            "modality": self.backbone.modality,
            "num_layers": self.backbone.num_layers,
            "exit_layers": self.heads.layers,
            "hidden_size": self.backbone.hidden_size,
            "num_classes": self.num_classes,
            "head_activation": self.backbone.spec.head_activation,
            "im_head": self.heads.im_head,
            "pooling": self.backbone.pooling,
            "gates": gates,
            "labels": self.labels,
            "costs": self.costs,
            "conformal_quantiles": self.conformal_quantiles,
            "max_length": self.max_length,
            "preprocessor": None if self.preprocessor is None else type(self.preprocessor).__name__,
            "metadata": self.metadata,
        }
        (folder / "jeidnn.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> EarlyExitModel:
        """Load a folder written by :meth:`save_pretrained`; the model comes back in eval mode."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise JeidnnError(f"model folder not found: {folder}")
        for name in ("jeidnn.json", "exits.safetensors", "backbone/config.json"):
            if not (folder / name).is_file():
                raise JeidnnError(f"{folder / name} is missing; {folder} is not a saved jeidnn model")
        try:
            config = json.loads((folder / "jeidnn.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise JeidnnError(f"{folder / 'jeidnn.json'} is not valid JSON: {exc}") from None
        version = config.get("format_version") if isinstance(config, dict) else None
        if version != FORMAT_VERSION:
            raise JeidnnError(
                f"{folder / 'jeidnn.json'} has format version {version!r}; this jeidnn reads version "
                f"{FORMAT_VERSION}: re-export the model from its run with this version (retrain the run if "
                "needed)"
            )
        try:
            with _no_progress_bars():
                model = cls._build(folder, config)
        except KeyError as exc:
            raise JeidnnError(f"{folder / 'jeidnn.json'} lacks the key {exc}; re-export the model") from None
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
            first = first_line(exc)
            raise JeidnnError(f"cannot load the jeidnn model in {folder}: {first}") from None
        return model.eval()

    @classmethod
    def _build(cls, folder: Path, config: dict[str, Any]) -> EarlyExitModel:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        backbone = Backbone(
            AutoModel.from_pretrained(folder / "backbone"), source=str(folder), pooling=config["pooling"]
        )
        heads = ExitHeads(
            config["exit_layers"],
            config["hidden_size"],
            config["num_classes"],
            config["head_activation"],
            im_head=config["im_head"],
        )
        gate_cfg = config["gates"]
        gates: Gates | RuleGates | None = None
        threshold = DEFAULT_TAU
        if gate_cfg["type"] == "learned":
            gates = Gates(len(heads.layers), GateSettings(**gate_cfg["settings"]), gate_cfg["hidden_size"])
            threshold = float(gate_cfg["exit_threshold"])
        elif gate_cfg["type"] == "threshold":
            gates = ThresholdGates(gate_cfg["thresholds"], gate_cfg["measure"])
        elif gate_cfg["type"] == "patience":
            gates = PatienceGates(gate_cfg["patience"])
        elif gate_cfg["type"] == "static":
            gates = StaticGates(gate_cfg["exit_index"])
        elif gate_cfg["type"] != "none":
            raise JeidnnError(f"{folder / 'jeidnn.json'}: unknown gate type {gate_cfg['type']!r}")
        state = load_file(str(folder / "exits.safetensors"))
        heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
        if isinstance(gates, Gates):
            gates.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("gates.")})
        preprocessor = None
        if config["preprocessor"] is not None:
            loader = AutoTokenizer if backbone.modality == "text" else AutoImageProcessor
            preprocessor = loader.from_pretrained(folder / "backbone")
        return cls(
            backbone,
            heads,
            gates,
            preprocessor,
            config["labels"],
            config["costs"],
            config["conformal_quantiles"],
            config["max_length"],
            config.get("metadata"),
            threshold,
        )
