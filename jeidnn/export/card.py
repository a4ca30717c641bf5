"""The model card of an exported model: ``README.md`` with Hugging Face metadata (YAML front matter).

It says which method and operating point the model is, how the export chose it, its accuracy and cost on
calib half A, val and test, where test samples leave, the guarantee (if one was certified), how the
conformal sets were fitted, the backbone and labels, and how to load and use it. Every number is formatted
from the export summary report.json holds (``export``), 4 decimals in the text and unrounded in the
``model-index`` metadata, so the card and the report agree.

Example:
    >>> write_card("runs/default/model", run, model, summary)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from jeidnn.config.schema import EMBEDDED_MODEL
from jeidnn.export.operating_point import Run

__all__ = ["model_card", "write_card"]

EMBEDDED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The hub model the embedded backbone's weights are."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
BAR = 40  # characters of a bar that holds every test sample
CHOSE_ON = {
    "budget": "Calib half A chose each method's configuration and val chose the method; test chose nothing.",
    "method": "Calib half A chose the configuration; val and test chose nothing.",
    "guarantee": "Calib chose and certified the operating point; test chose nothing.",
}


def _num(x: float | None) -> str:
    """A number of the card, as a test reading it compares it with report.json."""
    return "n/a" if x is None else f"{x:.4f}"


def _threshold(t: Any) -> str:
    return "∞" if t in ("inf", None) or (isinstance(t, float) and t == float("inf")) else f"{float(t):.4f}"


def base_model(name: str) -> str | None:
    """The hub name of the backbone a run started from, where there is one (not a local or random one)."""
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_NAME
    if _HUB_ID.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    return None


def _parameters(summary: dict, gates: dict) -> str:
    """The operating point's parameters in words (λ, τ, thresholds, patience, exit), then report.json's."""
    parts = []
    if "lambda" in summary:
        parts.append(f"λ = {summary['lambda']:g} (learned model {summary['model_index']})")
    kind = gates.get("kind")
    if kind == "learned":
        parts.append(f"exit threshold τ = {summary['exit_threshold']:g} on the gates' exit scores")
    elif kind == "threshold":
        values = ", ".join(_threshold(t) for t in gates["thresholds"])
        parts.append(f"{gates['measure']} thresholds at exits 1..{len(gates['thresholds'])}: {values}")
    elif kind == "patience":
        parts.append(f"patience t = {gates['patience']} (leave once the prediction holds for t more exits)")
    elif kind == "static":
        parts.append(f"every sample leaves at exit {gates['exit_index'] + 1}")
    elif kind == "product":
        values = ", ".join(_threshold(t) for t in gates["thresholds"])
        count = len(gates["thresholds"])
        parts.append(f"thresholds on the running product of max-probabilities at exits 1..{count}: {values}")
    elif kind == "patience_confidence":
        threshold = _threshold(gates["threshold"])
        parts.append(
            f"patience k = {gates['patience']} and max-probability threshold {threshold} (leave once the "
            "prediction holds for k more exits and is that confident)"
        )
    parts.append(f"report.json param `{json.dumps(summary['param'])}`")
    return "; ".join(parts)


def _metadata(run: Run, model: Any, summary: dict, test: dict) -> dict:
    task = "image-classification" if model.config.modality == "image" else "text-classification"
    dataset = run.report["dataset"].get("name", "unknown")
    meta: dict[str, Any] = {
        "library_name": "jeidnn",
        "tags": ["early-exit", "jeidnn", f"exit-policy-{summary['kind']}", "conformal-prediction", task],
        "pipeline_tag": task,
        "metrics": ["accuracy"],
    }
    base = base_model(str(run.report["backbone"].get("name", "")))
    if base is not None:
        meta["base_model"] = base
    meta["model-index"] = [
        {
            "name": f"{run.cfg.name}-{summary['method']}",
            "results": [
                {
                    "task": {"type": task},
                    "dataset": {"name": dataset, "type": dataset, "split": "test"},
                    "metrics": [
                        {"type": "accuracy", "value": test["accuracy"], "name": "test accuracy"},
                        {"type": "cost", "value": test["cost"], "name": "test cost (share of full FLOPs)"},
                    ],
                }
            ],
        }
    ]
    return meta


def _selection(summary: dict, budget: float) -> list[str]:
    selection = summary.get("selection", "method")
    how = {
        "budget": f"`budget`: every exportable method plays its calib-A choice within cost {budget:g}; the "
        "one most accurate on val is exported",
        "method": f"`method`: one named method, its configuration most accurate on calib half A within "
        f"cost {budget:g}",
        "guarantee": "`guarantee`: the cheapest operating point certified for the stated guarantee",
    }[selection]
    lines = [f"| selection | {how} |", f"| chosen by | {summary['chosen_by']} |", ""]
    rows = summary.get("considered") or []
    if selection == "budget" and rows:
        lines += [
            "### Methods considered",
            "",
            "| method | val accuracy | val cost | calib-A accuracy | calib-A cost |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            mark = " **(exported)**" if r["method"] == summary["method"] else ""
            if "skipped" in r:
                lines.append(f"| `{r['method']}` | skipped: {r['skipped']} | | | |")
            else:
                nums = (r["val_accuracy"], r["val_cost"], r["calib_accuracy"], r["calib_cost"])
                lines.append(f"| `{r['method']}`{mark} | " + " | ".join(map(_num, nums)) + " |")
        lines.append("")
    return lines


def _histogram(fractions: list[float], layers: list[int], costs: list[float]) -> list[str]:
    lines = ["| exit | layer | cost | fraction of test | |", "|---|---|---|---|---|"]
    for i, (f, layer, cost) in enumerate(zip(fractions, layers, costs, strict=True)):
        lines.append(f"| {i + 1} | {layer} | {_num(cost)} | {_num(f)} | {'█' * round(f * BAR)} |")
    return lines


def _guarantee(guarantee: dict | None, selection: str) -> list[str]:
    if guarantee is None:
        return [
            f"None stated: the `{selection}` selection picks for accuracy within a cost budget, not against "
            "a risk bound.",
            "",
        ]
    g = guarantee.get("guarantee", {})
    lines = [
        "| risk | ε | δ | kind | certified risk | test risk |",
        "|---|---|---|---|---|---|",
        f"| {g.get('risk')} | {g.get('epsilon')} | {g.get('delta')} | {g.get('kind')} | "
        f"{_num(guarantee.get('certified_risk'))} | {_num(guarantee.get('test_risk'))} |",
        "",
        f"Proof: {guarantee.get('proof')}",
        "",
    ]
    return lines


def _usage(task: str, text: bool, max_length: int) -> list[str]:
    sample = '["what a great day", "meh"]' if text else "[Image.open('cat.png')]"
    pipe_kwargs = f", truncation=True, max_length={max_length}" if text else ""
    lines = [
        "```python",
        "import jeidnn  # registers the jeidnn model type with the transformers Auto classes",
        "from jeidnn import EarlyExitModel",
        "from transformers import pipeline",
        *([] if text else ["from PIL import Image"]),
        "",
        'model = EarlyExitModel.from_pretrained("path/to/this/folder")  # or its hub name',
        f"for p in model.predict({sample}):  # layer-skipping inference",
        "    print(p.label, p.probability, p.exit_layer, p.cost, p.prediction_set)",
        "",
        f'classify = pipeline("{task}", model="path/to/this/folder")',
        f"print(classify({sample}{pipe_kwargs}))",
        "```",
        "",
    ]
    if text:
        lines += [
            "```bash",
            'jeidnn predict path/to/this/folder --text "what a great day"',
            "```",
            "",
        ]
    return lines


def model_card(run: Run, model: Any, summary: dict, pruning: dict | None = None) -> str:
    """README.md of the exported ``model`` of ``run``, from its export ``summary`` (report.json ``export``)
    and, for a pruned model, its ``pruning`` metadata (its test numbers replace the unpruned model's)."""
    cfg, info = run.cfg, run.report["backbone"]
    test = {
        "accuracy": (pruning or summary)["test_accuracy"],
        "cost": (pruning or summary)["test_cost"],
        "exit_fractions": (pruning or summary)["test_exit_fractions"],
    }
    text = model.config.modality != "image"
    task = "text-classification" if text else "image-classification"
    budget = summary["budget"] if summary["budget"] is not None else cfg.export.cost_budget
    dtype = str(next(model.backbone.parameters()).dtype).removeprefix("torch.")
    alphas = ", ".join(sorted(model.conformal_quantiles, key=float))
    groups = ", ".join(
        "{" + ", ".join(str(e + 1) for e in g) + "}" for g in summary.get("conformal_groups") or []
    )
    fit = (pruning or {}).get("refitted") or summary.get("conformal_fit", "calib half B")
    front = yaml.safe_dump(_metadata(run, model, summary, test), sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        front.rstrip(),
        "---",
        "",
        f"# {cfg.name}: {summary['label']} on {info.get('name')}",
        "",
        f"An early-exit {info.get('architecture', '')} classifier made with jeidnn: each input leaves at the "
        "first exit its gates allow, so easy inputs skip the later layers. Load it with `import jeidnn` "
        "(no remote code).",
        "",
        "## Operating point",
        "",
        "| | |",
        "|---|---|",
        f"| method | {summary['label']} (`{summary['method']}`, {summary['kind']}) |",
        f"| parameters | {_parameters(summary, model.config.gates)} |",
        *_selection(summary, budget),
        "## Accuracy and cost",
        "",
        "Cost: the mean FLOPs of the exits taken, relative to the full model (1 = every layer).",
        "",
        "| split | accuracy | cost |",
        "|---|---|---|",
        f"| calib half A | {_num(summary['calib_accuracy'])} | {_num(summary['calib_cost'])} |",
        f"| val | {_num(summary.get('val_accuracy'))} | {_num(summary.get('val_cost'))} |",
        f"| test{' (pruned)' if pruning else ''} | {_num(test['accuracy'])} | {_num(test['cost'])} |",
        "",
        CHOSE_ON[summary.get("selection", "method")],
        "",
        "## Exits on test",
        "",
        *_histogram(test["exit_fractions"], list(model.config.exit_layers), list(model.config.costs)),
        "",
        "## Guarantee",
        "",
        *_guarantee(summary.get("guarantee"), summary.get("selection", "method")),
        "## Conformal prediction sets",
        "",
        f"Per-exit split-conformal quantiles for α ∈ {{{alphas}}} (default α = {model.default_alpha}), "
        f"fitted on {fit}; exits sharing one quantile: {groups}. A prediction set holds every label whose "
        "probability at the exit taken is at least 1 − q.",
        "",
        "## Model",
        "",
        f"- backbone: `{info.get('name')}` ({info.get('architecture')}, {info.get('num_layers')} layers, "
        f"{info.get('pooling')} pooling), served in {dtype}; exit heads and gates in float32",
        f"- exits at layers {list(model.config.exit_layers)}",
        f"- labels: {', '.join(model.labels)}",
        f"- data: {run.report['dataset'].get('name')}; run `{cfg.name}`",
        "",
    ]
    if pruning:
        lines += [
            "## Pruning",
            "",
            f"Heads removed: {pruning['heads_fraction']:g}, FFN neurons: {pruning['ffn_fraction']:g}, "
            f"layers kept: {pruning['layers_kept']}; parameters {pruning['parameters_before']} → "
            f"{pruning['parameters_after']}. Test accuracy {_num(summary['test_accuracy'])} → "
            f"{_num(test['accuracy'])}, test cost {_num(summary['test_cost'])} → {_num(test['cost'])}.",
            "",
        ]
    lines += ["## Use", "", *_usage(task, text, model.config.max_text_length)]
    return "\n".join(lines)


def write_card(folder: str | Path, run: Run, model: Any, summary: dict, pruning: dict | None = None) -> None:
    """Write :func:`model_card` to ``folder/README.md``."""
    card = model_card(run, model, summary, pruning)
    (Path(folder) / "README.md").write_text(card, encoding="utf-8")
