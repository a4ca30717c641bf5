"""`jeidnn serve` under concurrent clients, against the same texts through `jeidnn predict` (the reference).

The server runs as its own process (``python -m jeidnn.cli serve MODEL --port P --threads T``) on loopback;
this process drives it with N concurrent clients (one kept-alive connection each, one text per request)
for a fixed number of requests at each N, and reads the server's /metrics before and after for the
micro-batch sizes. Reference: the same texts through ``jeidnn predict``
(:func:`jeidnn.hf.predict.predict_cli`, ``--batch-size 64``) in this process, and the offline batch-64
throughput of ``EarlyExitModel.predict`` (tokenisation included, as the server's) at the same number of
torch threads, best of 3.

Checked for every answer: one answer per request, none lost or repeated (each request carries one text and
gets one row); exit, label, cost and conformal set equal predict's; the probability within 1e-5 (a batch of
other texts pads differently, which moves the last float bits).

Usage:
    python benchmarks/serve.py /work/runs/default/model --run /work/runs/default --requests 512
writes benchmarks/results/serve.md and serve.json (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.hf.predict import predict_cli
from jeidnn.serve.run_inputs import run_test_inputs
from jeidnn.serve.server import bind

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("label", "exit_layer", "cost", "prediction_set")


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    command = [
        sys.executable, "-m", "jeidnn.cli", "serve", str(args.model_dir), "--port", str(port),
        "--device", "cpu", "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
        "--max-wait-ms", str(args.max_wait_ms), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc): what it cost, whatever else ran."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_histogram(url: str) -> dict[str, float]:
    """The server's micro-batch histogram so far: count, sum and cumulative buckets."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "jeidnn_batch_size_count":
                out["count"] = s.value
            elif s.name == "jeidnn_batch_size_sum":
                out["sum"] = s.value
            elif s.name == "jeidnn_batch_size_bucket":
                out[s.labels["le"]] = s.value
    return out


async def post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, body: bytes):
    """One HTTP/1.1 POST /predict on a kept-alive connection: (status, JSON answer). A minimal client: the
    server answers with a Content-Length; httpx's pool costs this process more CPU than the server spends
    per request at 128 connections, and would measure the client."""
    writer.write(
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, json.loads(await reader.readexactly(length))


async def drive(url: str, texts: list[str], clients: int) -> tuple[list[dict | None], list[float], float]:
    """Send one request per text from `clients` concurrent clients (one connection each); answers (None if
    failed) and latencies."""
    answers: list[dict | None] = [None] * len(texts)
    latencies = [0.0] * len(texts)
    counts = [0] * len(texts)
    queue = iter(range(len(texts)))
    port = int(url.rsplit(":", 1)[1])

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in queue:
                start = time.perf_counter()
                status, reply = await post_json(
                    reader, writer, port, json.dumps({"inputs": [texts[i]]}).encode()
                )
                latencies[i] = time.perf_counter() - start
                counts[i] += 1
                rows = reply.get("predictions") if status == 200 else None
                answers[i] = rows[0] if rows and len(rows) == 1 else None
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    assert counts == [1] * len(texts), "a request was sent twice or not at all"
    return answers, latencies, wall


def compare(answers: list[dict | None], reference: list[dict]) -> dict:
    failed = sum(a is None for a in answers)
    pairs = [(a, b) for a, b in zip(answers, reference) if a is not None]
    return {
        "answered": len(pairs),
        "failed": failed,
        "differ": {f: sum(a[f] != b[f] for a, b in pairs) for f in FIELDS},
        "max_probability_diff": max(
            (abs(a["probability"] - b["probability"]) for a, b in pairs), default=0.0
        ),
        "bit_identical_probabilities": sum(a["probability"] == b["probability"] for a, b in pairs),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--run", type=Path, help="the model's run folder: its test split is the texts")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=512, help="requests (one text each) per client count")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the server and the offline run"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = args.run or args.model_dir.resolve().parent
    texts = run_test_inputs(run)[: args.requests]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        inputs, preds, log = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl", Path(tmp) / "server.log"
        inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        predict_cli(str(args.model_dir), None, str(inputs), output=str(preds), batch_size=64, device="cpu")
        reference = [json.loads(line) for line in preds.read_text().splitlines()]
        model = EarlyExitModel.from_pretrained(args.model_dir)
        model.predict(texts[:64], batch_size=64)  # warm-up
        offline, offline_cpu = [], []
        for _ in range(3):
            start, cpu = time.perf_counter(), time.process_time()
            model.predict(texts, batch_size=64)
            offline.append(len(texts) / (time.perf_counter() - start))
            offline_cpu.append(1000 * (time.process_time() - cpu) / len(texts))
        del model
        proc, url = start_server(args, log)
        rows = []
        try:
            asyncio.run(drive(url, texts[:32], 8))  # warm-up
            for clients in args.clients:
                before, cpu = batch_histogram(url), cpu_seconds(proc.pid)
                answers, latencies, wall = asyncio.run(drive(url, texts, clients))
                cpu, after = cpu_seconds(proc.pid) - cpu, batch_histogram(url)
                calls = after["count"] - before["count"]
                buckets = {le: after[le] - before.get(le, 0.0) for le in after if le not in ("count", "sum")}
                exits: dict[int, int] = {}
                for a in answers:
                    if a is not None:
                        exits[a["exit_layer"]] = exits.get(a["exit_layer"], 0) + 1
                rows.append(
                    {
                        "clients": clients,
                        "requests": len(texts),
                        "throughput_per_s": len(texts) / wall,
                        "p50_ms": 1000 * percentile(latencies, 0.5),
                        "p99_ms": 1000 * percentile(latencies, 0.99),
                        "server_cpu_ms_per_request": 1000 * cpu / len(texts),
                        "model_calls": calls,
                        "mean_batch": (after["sum"] - before["sum"]) / calls,
                        "batch_buckets": buckets,
                        "exit_histogram": dict(sorted(exits.items())),
                        **compare(answers, reference),
                    }
                )
                r = rows[-1]
                print(
                    f"{clients:>4} clients: {r['throughput_per_s']:.1f}/s, p50 {r['p50_ms']:.1f} ms, p99 "
                    f"{r['p99_ms']:.1f} ms, mean batch {r['mean_batch']:.1f}, differ {r['differ']}, "
                    f"max |dp| {r['max_probability_diff']:.2e}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(30)
    best_offline = max(offline)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "texts": f"first {len(texts)} texts of the test split of {run}",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "offline_batch64_per_s": offline,
        "offline_batch64_cpu_ms_per_text": offline_cpu,
        "settings": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, best_offline, min(offline_cpu)) + "\n")
    print(f"offline batch 64: {best_offline:.1f}/s; wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def markdown(result: dict, offline: float, offline_cpu: float) -> str:
    lines = [
        "# `jeidnn serve` under concurrent clients",
        "",
        f"Generated by `{result['command']}` at commit {result['commit']}; do not edit by hand. How: the "
        "docstring of benchmarks/serve.py.",
        "",
        f"{result['texts']}, one text per request; the server in its own process with "
        f"{result['threads']} torch thread(s), `--max-batch-size {result['settings']['max_batch_size']} "
        f"--max-wait-ms {result['settings']['max_wait_ms']:g}`, clients in this process, "
        f"{result['cpu_count']} CPU cores shared with other work (load average before "
        f"{result['load_average']['before']}, after {result['load_average']['after']}). Offline reference: "
        "`EarlyExitModel.predict(texts, batch_size=64)` at the same thread count, best of 3: "
        f"**{offline:.1f} texts/s**, {offline_cpu:.2f} ms of CPU per text. Server CPU: the server process's "
        "user + system time per request (the HTTP layer, the batching and the model), which other work on "
        "the machine does not inflate as it does wall-clock time.",
        "",
        "| clients | throughput (req/s) | × offline batch 64 | p50 (ms) | p99 (ms) | server CPU (ms / req) "
        "| model calls "
        "| mean batch | failed | exits / labels / costs / sets ≠ predict | max \\|Δp\\| "
        "| exit histogram (layer: requests) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        differ = " / ".join(str(r["differ"][f]) for f in FIELDS)
        histogram = ", ".join(f"{k}: {v}" for k, v in r["exit_histogram"].items())
        lines.append(
            f"| {r['clients']} | {r['throughput_per_s']:.1f} | {r['throughput_per_s'] / offline:.2f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_cpu_ms_per_request']:.2f} | "
            f"{r['model_calls']:.0f} | {r['mean_batch']:.1f} | "
            f"{r['failed']} | {differ} | {r['max_probability_diff']:.1e} | {histogram} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
