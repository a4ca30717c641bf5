"""Multi-tier split inference of a run's exported model: the plan for a few links, a loopback measurement
with a simulated link, and the answers of float32 / float16 / int8 payloads against the whole model.

1. **Plan** (:func:`jeidnn.serve.plan.plan_run`, what ``jeidnn split --plan`` computes): per-layer times
   measured once on this machine (batch 1), then for each (bandwidth, RTT) setting the expected latency, bytes
   and server load of every split layer K at the exported operating point and at other exit thresholds.
2. **Loopback**: the model split at ``--at`` (float16 payloads), the server tier and the device tier each
   served by ``jeidnn serve``'s application in this process, the device tier's payloads delayed by
   ``bytes / bandwidth + RTT`` (``ServeSettings.link_delay``); one client sends test texts one at a time. Both
   tiers run on this machine, so the plan to compare with is the one at device speed 1.
3. **Payloads**: the test split run through both tiers (no HTTP) with each payload dtype: agreement with the
   whole model (label, exit) and test accuracy.

Usage:
    python benchmarks/multitier.py /work/runs/default --at 4 --threads 1
writes benchmarks/results/multitier.md, .json and .png (the plan of the middle link; ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from jeidnn.evaluate.predictions import RunPredictions
from jeidnn.hf.batches import make_batches
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.serve.app import ServeSettings, create_app
from jeidnn.serve.payload import Payload, decode, encode
from jeidnn.serve.plan import Link, operating_points, plan, plan_run, plan_table, write_plan
from jeidnn.serve.run_inputs import run_test_inputs
from jeidnn.serve.server import running
from jeidnn.serve.tiers import load_tier, run_device, run_server, split_model

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [(1.0, 100.0), (20.0, 30.0), (100.0, 5.0)]  # (Mbit/s, RTT ms): slow mobile, LTE, Wi-Fi / LAN


def through_tiers(device, server, model, texts: list[str], dtype: str) -> tuple[list[int], list[int]]:
    """Labels and exits of `texts` through the two tiers with `dtype` payloads (batches of 64)."""
    labels, exits = [0] * len(texts), [0] * len(texts)
    for positions, batch in make_batches(model, texts, 64):
        out = run_device(device, batch)
        for rows, logits, k in out.left:
            for r, row in zip(rows.tolist(), logits.argmax(-1).tolist()):
                labels[positions[r]], exits[positions[r]] = row, k
        if len(out.rows):
            data = encode(
                Payload(out.hidden, out.lengths, out.gate_state, device.split_id, device.split_layer), dtype
            )
            p = decode(data, model.backbone.hidden_size)
            logits, k = run_server(server, p.hidden, p.lengths, p.gate_state)
            for r, row, e in zip(out.rows.tolist(), logits.argmax(-1).tolist(), k.tolist()):
                labels[positions[r]], exits[positions[r]] = row, e
    return labels, exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--at", type=int, default=4, help="split layer K of the loopback measurement")
    parser.add_argument("--device-speed", type=float, default=0.25, help="device speed of the plans")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.7])
    parser.add_argument("--loopback", type=int, default=200, help="texts sent one at a time over loopback")
    parser.add_argument("--num-test", type=int, help="test texts of the payload comparison (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multitier.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = EarlyExitModel.from_pretrained(args.run / "model")
    texts = run_test_inputs(args.run)
    report = json.loads((args.run / "report.json").read_text())
    labels = RunPredictions.read(report, args.run).warmup_source(model.num_exits).labels["test"].tolist()

    # 1. plans
    plans, times = [], None
    for bandwidth, rtt in SETTINGS:
        link = Link(bandwidth, rtt, args.device_speed)
        rows, times, header = plan_run(args.run, link, "float16", args.thresholds, times=times)
        plans.append({"bandwidth_mbps": bandwidth, "rtt_ms": rtt, "rows": rows, "header": header})
        print(header.split(". Layer")[0], flush=True)

    middle = plans[len(plans) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        link = Link(middle["bandwidth_mbps"], middle["rtt_ms"], args.device_speed)
        write_plan(Path(tmp), middle["rows"], times, link, middle["header"], "float16")
        shutil.copy(Path(tmp) / "plan.png", args.out.with_suffix(".png"))

    # 2. loopback, with the plan at device speed 1
    link = Link(20.0, 30.0, 1.0)
    local_plan, _, _ = plan_run(args.run, link, "float16", None, times=times)
    predicted = next(r for r in local_plan if r["split_layer"] == args.at)
    with tempfile.TemporaryDirectory() as tmp:
        device_dir, server_dir = split_model(model, args.at, Path(tmp) / "split", payload_dtype="float16")
        device, server = load_tier(device_dir), load_tier(server_dir)
        delay = lambda n: n * 8 / (link.bandwidth_mbps * 1e6) + link.rtt_ms / 1000  # noqa: E731
        sample = texts[: args.loopback]
        with running(create_app(server, ServeSettings(max_wait_ms=0))) as server_url:
            settings = ServeSettings(upstream=server_url, max_wait_ms=0, link_delay=delay)
            with (
                running(create_app(device, settings)) as url,
                httpx.Client(base_url=url, timeout=60) as client,
            ):
                for text in sample[:10]:  # warm-up
                    client.post("/predict", json={"inputs": [text]})
                sent_before = sent_bytes(client.get("/metrics").text)
                latencies, offloaded = [], 0
                for text in sample:
                    start = time.perf_counter()
                    row = client.post("/predict", json={"inputs": [text]}).json()["predictions"][0]
                    latencies.append(time.perf_counter() - start)
                    offloaded += row["exit_layer"] > args.at
                payload_bytes = sent_bytes(client.get("/metrics").text) - sent_before
        plan_sample = plan_on(args.run, model, times, link, sample, args.at)  # like for like
        loopback = {
            "split_layer": args.at,
            "texts": len(sample),
            "link": {"bandwidth_mbps": link.bandwidth_mbps, "rtt_ms": link.rtt_ms},
            "measured_mean_ms": 1000 * statistics.mean(latencies),
            "measured_p50_ms": 1000 * statistics.median(latencies),
            "measured_offload_fraction": offloaded / len(sample),
            "measured_bytes_per_request": payload_bytes / len(sample),
            "planned_mean_ms_same_texts": plan_sample["latency_ms"],
            "planned_offload_fraction_same_texts": plan_sample["offload_fraction"],
            "planned_bytes_per_request_same_texts": plan_sample["bytes_per_request"],
            "planned_mean_ms_test_split": predicted["latency_ms"],
        }
        print(loopback, flush=True)

        # 3. payload dtypes against the whole model on the test split
        texts, labels = texts[: args.num_test], labels[: args.num_test]
        whole = model.predict(texts, sets=False)
        whole_labels = [model.labels.index(p.label) for p in whole]
        whole_exits = [model.heads.layers.index(p.exit_layer) for p in whole]
        payloads = [
            {
                "dtype": "whole model",
                "accuracy": sum(a == b for a, b in zip(whole_labels, labels)) / len(labels),
                "label_agreement": 1.0,
                "exit_agreement": 1.0,
            }
        ]
        for dtype in ("float32", "float16", "int8"):
            got, exits = through_tiers(device, server, model, texts, dtype)
            payloads.append(
                {
                    "dtype": dtype,
                    "accuracy": sum(a == b for a, b in zip(got, labels)) / len(labels),
                    "label_agreement": sum(a == b for a, b in zip(got, whole_labels)) / len(labels),
                    "exit_agreement": sum(a == b for a, b in zip(exits, whole_exits)) / len(labels),
                }
            )
            print(payloads[-1], flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "threads": args.threads,
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "layer_times": times.__dict__ if times else None,
        "plans": plans,
        "loopback": loopback,
        "payloads": payloads,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, args) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def sent_bytes(metrics: str) -> float:
    """The device tier's ``jeidnn_payload_bytes_total``."""
    return next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("jeidnn_payload_bytes_total")
    )


def plan_on(run: Path, model: EarlyExitModel, times, link: Link, texts: list[str], at: int) -> dict:
    """The exported operating point's plan row at K = `at` over `texts`, the first test texts."""
    point = operating_points(run, model)[0]
    point.exits = point.exits[: len(texts)]
    encoded = model.preprocessor(texts, truncation=True, max_length=model.max_length)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in encoded])
    text_bytes = torch.tensor([len(t.encode()) for t in texts], dtype=torch.float64)
    rows = plan(
        times, model.heads.layers, [point], lengths, text_bytes, model.backbone.hidden_size, link, "float16"
    )
    return next(r for r in rows if r["split_layer"] == at)


def markdown(result: dict, args: argparse.Namespace) -> str:
    times = result["layer_times"]
    lines = [
        "# Multi-tier split inference",
        "",
        f"Generated by `{result['command']}` at commit {result['commit']}; do not edit by hand. How: the "
        "docstring of benchmarks/multitier.py. "
        f"{result['threads']} torch thread(s); load average before {result['load_average']['before']}, after "
        f"{result['load_average']['after']} (2 CPU cores shared with other work).",
        "",
        "## Plans",
        "",
        f"Device speed {args.device_speed:g} × this machine's, float16 payloads. Layer times per sample at "
        f"batch 1 (ms): embeddings {1000 * times['embed']:.2f}, layers "
        f"{', '.join(f'{1000 * t:.2f}' for t in times['layers'])}, exit heads and gates "
        f"{', '.join(f'{1000 * t:.2f}' for t in times['exits'])}. K = 0: the server alone (the text "
        f"travels); K = {len(times['layers'])}: the device alone. Bold: the lowest expected latency of each "
        "operating point.",
    ]
    png = args.out.with_suffix(".png").name
    lines += ["", f"![expected latency and server load against K, the middle link]({png})"]
    for p in result["plans"]:
        lines += [
            "",
            f"### {p['bandwidth_mbps']:g} Mbit/s, RTT {p['rtt_ms']:g} ms",
            "",
            plan_table(p["rows"]),
        ]
    lb = result["loopback"]
    lines += [
        "",
        "## Loopback measurement",
        "",
        f"Split at K = {lb['split_layer']}, float16 payloads, both tiers served on this machine, the link "
        f"simulated as {lb['link']['bandwidth_mbps']:g} Mbit/s and RTT {lb['link']['rtt_ms']:g} ms; one "
        f"client, {lb['texts']} test texts one at a time.",
        "",
        "| | mean latency (ms) | offloaded | bytes / request |",
        "|---|---|---|---|",
        f"| measured (HTTP, two servers) | {lb['measured_mean_ms']:.1f} | "
        f"{lb['measured_offload_fraction']:.3f} | {lb['measured_bytes_per_request']:,.0f} |",
        f"| planned, same texts, device speed 1 | {lb['planned_mean_ms_same_texts']:.1f} | "
        f"{lb['planned_offload_fraction_same_texts']:.3f} | "
        f"{lb['planned_bytes_per_request_same_texts']:,.0f} |",
        "",
        "## Payload dtypes on the test split",
        "",
        f"The exported operating point split at K = {lb['split_layer']}, run through both tiers (no HTTP).",
        "",
        "| payload | test accuracy (%) | same label as the whole model | same exit |",
        "|---|---|---|---|",
    ]
    for p in result["payloads"]:
        lines.append(
            f"| {p['dtype']} | {100 * p['accuracy']:.2f} | {100 * p['label_agreement']:.2f} % | "
            f"{100 * p['exit_agreement']:.2f} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
