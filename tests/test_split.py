"""`jeidnn split`: a device tier and a server tier whose two halves of the layer-skipping loop give the whole
model's exits and numbers (float32 payloads: to the last bit, on every family kind and gate state), over
loopback too; payload formats; the device tier without its server (degraded answers or a 502); the refusals;
and `jeidnn split --plan` (against a hand-computed plan and on a tiny finished run)."""

import json
from pathlib import Path

import pytest
import torch
from predict_model import LABELS, TEXTS, text_model
from safetensors.torch import load, load_file
from test_early_exit import shape_gates, split_value, tiny_inputs, tiny_model, tiny_tokenizer
from tiny_models import tiny_run_overrides, write_sentiment_csv

from jeidnn.cli.main import main, train_main
from jeidnn.errors import JeidnnError
from jeidnn.hf.modeling import EarlyExitModel
from jeidnn.model.rule_gates import PatienceConfidenceGates, PatienceGates, PatienceState, ProductGates
from jeidnn.serve.payload import Payload, concat, decode, encode
from jeidnn.serve.plan import LayerTimes, Link, OperatingPoint, payload_bytes, plan
from jeidnn.serve.tiers import load_tier, run_device, run_server, split_model

try:  # the tiers, payloads and plans run without the serving stack; the HTTP tests need it
    import httpx

    from jeidnn.serve.app import ServeSettings, create_app
    from jeidnn.serve.server import bind, running
except ImportError:
    httpx = None
needs_serving = pytest.mark.skipif(httpx is None, reason="the HTTP tests need the extra jeidnn[serve]")


def through_tiers(device, server, inputs, dtype="float32"):
    """Logits (B, C) and exits (B,) of `inputs` run by the device tier, encoded, decoded, run by the
    server."""
    out = run_device(device, inputs)
    batch = next(iter(inputs.values())).shape[0]
    logits = torch.full((batch, device.model.num_classes), float("nan"))
    exits = torch.full((batch,), -1)
    for rows, group, k in out.left:
        logits[rows], exits[rows] = group, k
    if len(out.rows):
        data = encode(
            Payload(out.hidden, out.lengths, out.gate_state, device.split_id, device.split_layer), dtype
        )
        payload = decode(data, device.model.backbone.hidden_size)
        logits[out.rows], exits[out.rows] = run_server(
            server, payload.hidden, payload.lengths, payload.gate_state
        )
    return logits, exits, out


CASES = [  # (arch, gates): trajectory gates carry their state over; patience its agreement count (K = 2)
    ("bert", "trajectory_mlp_conditional"),
    ("distilbert", "hidden_mlp"),
    ("electra", "paper"),
    ("gpt2", "trajectory_mlp_conditional"),
    ("qwen2", "trajectory_mlp_conditional"),
    ("deberta-v2", "paper"),
    ("modernbert", "trajectory_mlp_conditional"),
    ("vit", "trajectory_mlp_conditional"),
    ("bert", "patience"),
]


@pytest.mark.parametrize("arch,gates", CASES)
def test_split_tiers_equal_the_whole_model_to_the_last_bit(arch, gates, tmp_path):
    model = tiny_model(arch, "none" if gates == "patience" else gates)
    inputs = tiny_inputs(arch, 16)
    if gates == "patience":
        model.gates = PatienceGates(1)
    else:
        shape_gates(model, inputs, "somebody")
    with torch.no_grad():
        whole = model.forward_dynamic(inputs)
    assert len(set(whole.exit_index.tolist())) > 1
    at = 2 if gates == "patience" else 1  # patience 1 cannot leave at the first exit
    device_dir, server_dir = split_model(model, at, tmp_path / "split", payload_dtype="float32")
    device, server = load_tier(device_dir), load_tier(server_dir)
    logits, exits, out = through_tiers(device, server, inputs)
    assert 0 < len(out.rows) < 16  # some rows leave on the device, some go on
    assert torch.equal(exits, whole.exit_index)
    assert torch.equal(logits, whole.logits)


RULE_TEXTS = [
    *TEXTS,
    *("a quiet evening", "never again", "best film of the year", "why?", "rain, rain, rain", "lovely"),
]


def rule_model(folder: Path, kind: str) -> EarlyExitModel:
    """A tiny BERT (mean pooling: the texts' confidences spread) whose history-aware rule gates, split at
    K = 1, send some of RULE_TEXTS to each exit and decide on the server from the device's state.

    ``product_maxprob``: the first threshold between the texts' max-probabilities at exit 1, the second
    between the products of those that go on. ``patience_confidence`` (patience 1: nobody leaves at exit 1)
    a threshold between the max-probabilities at exit 2 of the texts whose prediction held there."""
    model = tiny_model("bert", "none", pooling="mean", costs=[0.4, 0.7, 1.01])
    model.preprocessor = tiny_tokenizer(folder)
    inputs = dict(model.preprocessor(RULE_TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = model.forward_full(inputs).exit_logits  # (N, 3, C)
    maxprob, pred = logits.softmax(-1).amax(-1), logits.argmax(-1)  # (N, 3)
    if kind == "product_maxprob":
        first = split_value(maxprob[:, 0], min_side=3)[0]
        going = maxprob[:, 0] < first
        product = (maxprob[:, 0] * maxprob[:, 1])[going]
        model.gates = ProductGates([first, split_value(product, min_side=2)[0]])
    else:
        held = pred[:, 0] == pred[:, 1]
        model.gates = PatienceConfidenceGates(1, split_value(maxprob[held, 1], min_side=1)[0])
    return model


@pytest.mark.parametrize("kind", ["product_maxprob", "patience_confidence"])
def test_history_aware_rule_states_cross_the_split(kind, tmp_path):
    """The running product / agreement count after exit 1 travels in the payload: the server's exits and
    numbers equal the whole model's, and a fresh state on the server would have given other exits."""
    model = rule_model(tmp_path, kind)
    inputs = dict(model.preprocessor(RULE_TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        whole = model.forward_dynamic(inputs)
    device_dir, server_dir = split_model(model, 1, tmp_path / "split", payload_dtype="float32")
    device, server = load_tier(device_dir), load_tier(server_dir)
    assert type(server.model.gates) is type(model.gates)
    logits, exits, out = through_tiers(device, server, inputs)
    assert set(exits.tolist()) == ({0, 1, 2} if kind == "product_maxprob" else {1, 2})
    assert torch.equal(exits, whole.exit_index) and torch.equal(logits, whole.logits)
    fresh = server.model.gates.init_state(len(out.rows))
    _, forgetful = run_server(server, out.hidden, out.lengths, fresh)
    assert not torch.equal(forgetful, whole.exit_index[out.rows])


@needs_serving
@pytest.mark.parametrize("kind", ["product_maxprob", "patience_confidence"])
def test_history_aware_rules_over_loopback_equal_the_whole_model(kind, tmp_path):
    model = rule_model(tmp_path, kind)
    device_dir, server_dir = split_model(model, 1, tmp_path / "split", payload_dtype="float32")
    with running(create_app(load_tier(server_dir))) as server_url:
        device = create_app(load_tier(device_dir), ServeSettings(upstream=server_url, max_wait_ms=1))
        with running(device) as url:
            got = httpx.post(f"{url}/predict", json={"inputs": RULE_TEXTS}).json()["predictions"]
    assert [{k: v for k, v in row.items() if k != "degraded"} for row in got] == [
        p.to_json() for p in model.predict(RULE_TEXTS)
    ]
    assert not any(row["degraded"] for row in got) and {row["exit_layer"] for row in got} >= {2, 3}


def test_tier_folders_hold_their_parts_only(tmp_path):
    model = tiny_model("bert", "paper")
    model.preprocessor = None
    device_dir, server_dir = split_model(model, 2, tmp_path / "s")
    whole = {k for k in model.state_dict() if k not in model._keys_to_ignore_on_save}
    device, server = (
        set(load_file(device_dir / "model.safetensors")),
        set(load_file(server_dir / "model.safetensors")),
    )
    layer = "backbone.model.encoder.layer."
    assert {k for k in device if k.startswith(layer)} == {
        k for k in whole if k.startswith((layer + "0.", layer + "1."))
    }
    assert {k for k in server if k.startswith(layer)} == {k for k in whole if k.startswith(layer + "2.")}
    assert not any("embeddings" in k for k in server) and any("embeddings" in k for k in device)
    assert {k for k in device if k.startswith("heads.")} == {
        k for k in whole if k.startswith(("heads.heads.0.", "heads.heads.1."))
    }
    assert {k for k in server if k.startswith("heads.")} == {
        k for k in whole if k.startswith("heads.heads.2.")
    }
    assert device | server == whole  # nothing lost; shared: the gates and BERT's pooler
    assert device & server == {k for k in whole if k.startswith(("gates.", "backbone.model.pooler."))}
    info = json.loads((device_dir / "config.json").read_text())["jeidnn_tier"]
    assert info["role"] == "device" and info["split_layer"] == 2
    assert json.loads((server_dir / "config.json").read_text())["jeidnn_tier"]["split_id"] == info["split_id"]
    with pytest.raises(JeidnnError, match="is the server tier of a split model"):
        EarlyExitModel.from_pretrained(server_dir)
    with pytest.raises(JeidnnError, match="is not a tier of a split model"):
        load_tier(tmp_path)


@pytest.mark.parametrize("at,message", [(0, "--at 0 must be a layer between 1 and 2"), (3, "--at 3 must be")])
def test_split_layer_is_checked(at, message, tmp_path):
    with pytest.raises(JeidnnError, match=message):
        split_model(tiny_model("bert", "paper"), at, tmp_path / "s")
    assert not (tmp_path / "s").exists()
    subset = tiny_model("bert", "paper", layers=[2, 3])
    with pytest.raises(JeidnnError, match="leaves the device without an exit"):
        split_model(subset, 1, tmp_path / "s")


def test_payload_formats():
    """int8 rounds each number to its token's scale (max |x| / 127, so within half a step); float16 to its
    own precision; only real tokens travel, and padding comes back as zeros."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    lengths = torch.tensor([5, 2, 3])
    payload = Payload(hidden, lengths, None, "abc", 1)
    for dtype in ("float32", "float16", "int8"):
        data = encode(payload, dtype)
        back = decode(data, 8)
        mask = payload.token_mask().bool()
        assert torch.equal(back.lengths, lengths) and back.hidden.shape == (3, 5, 8)
        assert torch.equal(back.hidden[~mask], torch.zeros(int((~mask).sum()), 8))
        scale = hidden.abs().amax(-1, keepdim=True) / 127  # (3, 5, 1)
        error = (back.hidden - hidden).abs()[mask]
        if dtype == "float32":
            assert torch.equal(back.hidden[mask], hidden[mask])
        elif dtype == "int8":
            assert (error <= scale.expand_as(hidden)[mask] / 2 + 1e-7).all()
        else:
            assert (error <= hidden.abs()[mask] * 2**-11 + 1e-8).all()
        tensors = load(data)  # only the 10 real tokens travel; int8 adds one float32 scale per token
        assert tensors["hidden"].shape == (10, 8) and tensors["hidden"].dtype == getattr(torch, dtype)
        assert ("scale" in tensors) == (dtype == "int8")
    one, ten = (
        Payload(hidden[:1, :1].expand(1, n, 8), torch.tensor([n]), None, "x" * 16, 1) for n in (1, 10)
    )
    expected = [len(encode(one, "float16")), len(encode(ten, "float16"))]
    assert payload_bytes(8, torch.tensor([1, 10]), "float16").tolist() == expected


def test_gate_states_concatenate_and_round_trip():
    """Two device batches' payloads become one: their rows and gate states (a bare tensor: the running
    product; a dataclass: the agreement count) one after the other, and back unchanged from the bytes."""
    a = Payload(torch.ones(2, 3, 8), torch.tensor([3, 1]), torch.tensor([0.5, 0.25]), "s", 1)
    b = Payload(torch.full((1, 2, 8), 2.0), torch.tensor([2]), torch.tensor([0.125]), "s", 1)
    both = decode(encode(concat([a, b])), 8)
    assert torch.equal(both.gate_state, torch.tensor([0.5, 0.25, 0.125]))
    assert both.hidden.shape == (3, 3, 8) and torch.equal(both.lengths, torch.tensor([3, 1, 2]))
    assert torch.equal(both.hidden[2], torch.cat([torch.full((2, 8), 2.0), torch.zeros(1, 8)]))
    patience = [PatienceState(torch.tensor([1, 0]), torch.tensor([2, 1])), PatienceState.start(1)]
    back = decode(
        encode(
            concat(
                [
                    Payload(a.hidden, a.lengths, patience[0], "s", 1),
                    Payload(b.hidden, b.lengths, patience[1], "s", 1),
                ]
            )
        ),
        8,
    ).gate_state
    assert torch.equal(back.run, torch.tensor([1, 0, 0])) and torch.equal(back.pred, torch.tensor([2, 1, 0]))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"garbage", "not a safetensors file"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "format is None"),
        (b"\x09\x00\x00\x00\x00\x00\x00\x00{}", "its header is longer than the body"),
        (encode(Payload(torch.ones(2, 3, 8), torch.tensor([3, 1]), None, "s", 1))[:-4], "cannot be read"),
        (
            encode(Payload(torch.ones(2, 3, 4), torch.tensor([3, 1]), None, "s", 1)),
            r"shape \(4, 4\), expected \(4, 8\)",
        ),
        (
            encode(Payload(torch.ones(2, 3, 8), torch.tensor([3, 1]), torch.ones(3), "s", 1)),
            "gate state tensor 'gate' does not hold one row per sample",
        ),
    ],
)
def test_malformed_payloads_are_refused(data, message):
    with pytest.raises(JeidnnError, match=message):
        decode(data, 8)


@pytest.fixture(scope="module")
def split_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiers")
    model = text_model(tmp)
    device_dir, server_dir = split_model(model, 1, tmp / "split", payload_dtype="float32")
    return model, device_dir, server_dir


@needs_serving
def test_split_over_loopback_equals_the_whole_model(split_dirs):
    model, device_dir, server_dir = split_dirs
    server = load_tier(server_dir)
    with running(create_app(server)) as server_url:
        device = load_tier(device_dir)
        with running(create_app(device, ServeSettings(upstream=server_url, max_wait_ms=1))) as url:
            got = httpx.post(f"{url}/predict", json={"inputs": TEXTS}).json()["predictions"]
            alone = [
                httpx.post(f"{url}/predict", json={"inputs": [t]}).json()["predictions"][0] for t in TEXTS
            ]
            for dtype in ("float16", "int8"):  # other payloads still answer every input
                lossy = create_app(device, ServeSettings(upstream=server_url, payload_dtype=dtype))
                with running(lossy) as lossy_url:
                    rows = httpx.post(f"{lossy_url}/predict", json={"inputs": TEXTS}).json()["predictions"]
                    assert [r["exit_layer"] for r in rows] == [r["exit_layer"] for r in got]
            device_metrics = httpx.get(f"{url}/metrics").text
        garbage = httpx.post(f"{server_url}/v1/continue", content=b"garbage")
        assert garbage.status_code == 400 and "not a safetensors file" in garbage.json()["error"]
        other = Payload(torch.zeros(1, 2, 32), torch.tensor([2]), None, "another", 1)
        wrong = httpx.post(f"{server_url}/v1/continue", content=encode(other))
        assert wrong.status_code == 409 and "deploy both halves of one split" in wrong.json()["error"]
        refused = httpx.post(f"{server_url}/predict", json={"inputs": TEXTS})
        assert refused.status_code == 404 and "server tier" in refused.json()["error"]
    want = [p.to_json() for p in model.predict(TEXTS)]
    assert [{k: v for k, v in row.items() if k != "degraded"} for row in got] == want
    assert [{k: v for k, v in row.items() if k != "degraded"} for row in alone] == [
        p.to_json() for text in TEXTS for p in model.predict([text])
    ]  # one row: a fresh gate state travels (its fields share memory until rows are selected)
    assert not any(row["degraded"] for row in got)
    forwarded = sum(row["exit_layer"] > 1 for row in got)
    assert forwarded > 0 and f"jeidnn_forwarded_total {float(2 * forwarded)}" in device_metrics  # both ways


@needs_serving
def test_device_tier_without_its_server(split_dirs):
    """Server down: the forwarded inputs are answered from the deepest local exit (layer 1), marked degraded
    and counted; with on_upstream_failure=fail those requests get a 502, the local ones their answers."""
    model, device_dir, _ = split_dirs
    closed = bind("127.0.0.1", 0)
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there now
    device = load_tier(device_dir)
    upstream = f"http://127.0.0.1:{port}"
    with running(create_app(device, ServeSettings(upstream=upstream, max_wait_ms=1))) as url:
        got = httpx.post(f"{url}/predict", json={"inputs": TEXTS}).json()["predictions"]
        seen = httpx.get(f"{url}/metrics").text
    with torch.no_grad():
        encoded = model.preprocessor(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
        full = model.forward_full(dict(encoded))  # predict truncates at the model's max_length, 16
    first = full.exit_logits[:, 0].softmax(-1)  # (B, C): the deepest exit on the device
    for row, probs, k in zip(got, first, full.exit_index.tolist()):
        assert row["degraded"] == (k > 0)
        if row["degraded"]:
            assert row["exit_layer"] == 1 and row["cost"] == 0.4
            assert row["label"] == LABELS[int(probs.argmax())]
            assert row["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    degraded = sum(row["degraded"] for row in got)
    assert degraded > 0 and f"jeidnn_degraded_total {float(degraded)}" in seen
    strict = ServeSettings(upstream=upstream, max_wait_ms=1, on_upstream_failure="fail")
    local = [t for t, k in zip(TEXTS, full.exit_index.tolist()) if k == 0]
    with running(create_app(device, strict)) as url:
        failed = httpx.post(f"{url}/predict", json={"inputs": TEXTS})
        fine = httpx.post(f"{url}/predict", json={"inputs": local})
    assert failed.status_code == 502 and "cannot reach the server tier" in failed.json()["error"]
    assert fine.status_code == 200 and len(fine.json()["predictions"]) == len(local)


@needs_serving
def test_serve_settings_are_checked(split_dirs):
    _, device_dir, server_dir = split_dirs
    with pytest.raises(JeidnnError, match="give --upstream URL of its server tier"):
        create_app(load_tier(device_dir))
    with pytest.raises(JeidnnError, match="--upstream is for a device tier"):
        create_app(load_tier(server_dir), ServeSettings(upstream="http://x"))
    with pytest.raises(JeidnnError, match="--max-batch-size must be a positive integer, got 0"):
        ServeSettings(max_batch_size=0).check()
    with pytest.raises(JeidnnError, match="--upstream 'x:1' must be an http"):
        ServeSettings(upstream="x:1").check()


def test_plan_against_a_hand_computation():
    """Two samples, three layers, K = 1, device at half speed: sample 0 exits at layer 1 on the device,
    sample 1 at layer 3 on the server with 10 tokens."""
    times = LayerTimes(embed=1.0, layers=[2.0, 3.0, 4.0], exits=[0.5, 0.5, 1.0], batch_size=1, num_inputs=2)
    point = OperatingPoint("p", torch.tensor([0, 2]), 1.0, 0.5)
    link = Link(bandwidth_mbps=8e-6, rtt_ms=1000.0, device_speed=0.5)  # 1 byte per second, 1 s round trip
    lengths, text = torch.tensor([4, 10]), torch.tensor([7.0, 9.0], dtype=torch.float64)
    rows = plan(times, [1, 2, 3], [point], lengths, text, 8, link, "float32")
    by_k = {r["split_layer"]: r for r in rows}
    sent = float(payload_bytes(8, torch.tensor([10]), "float32")[0])
    device0 = (1 + 2 + 0.5) / 0.5  # embeddings, layer 1, exit 1 on the device at half speed
    device1 = device0  # sample 1 also runs them before it goes on
    server1 = 3 + 4 + 0.5 + 1.0  # layers 2-3 and exits 2-3 on the server
    assert by_k[1]["latency_ms"] == pytest.approx(1000 * (device0 + device1 + sent + 1 + server1) / 2)
    assert by_k[1]["offload_fraction"] == 0.5 and by_k[1]["bytes_per_request"] == pytest.approx(sent / 2)
    assert by_k[1]["server_load"] == pytest.approx(server1 / 2 / (1 + 9 + 1.0))
    alone = [(1 + 2 + 0.5), (1 + 9 + 2.0)]  # K = 0: the server runs everything, the text travels
    assert by_k[0]["latency_ms"] == pytest.approx(1000 * (alone[0] + 7 + 40 + 1 + alone[1] + 9 + 40 + 1) / 2)
    assert by_k[3]["latency_ms"] == pytest.approx(1000 * (alone[0] + alone[1]) / 0.5 / 2)
    assert by_k[3]["server_load"] == 0 and by_k[0]["offload_fraction"] == 1


def test_split_and_plan_commands(tmp_path, capsys):
    csv = write_sentiment_csv(tmp_path / "t.csv", n=300)
    args = [
        "--config",
        str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"),
        *tiny_run_overrides(csv, tmp_path / "runs", "t"),
    ]
    fast = ["--warmup.max_epochs", "5", "--eval.bootstrap", "100", "--eval.resplits", "2", "--quiet"]
    fast += ["--export.selection", "method", "--export.method", "jeidnn_paper"]  # learned: τ can move
    assert train_main([*args, *fast]) == 0
    run = tmp_path / "runs" / "t"
    assert main(["split", str(run / "model"), "--at", "1", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "device" / "tokenizer_config.json").is_file()
    assert main(["split", str(run / "model"), "--at", "1", "--out", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["split", str(run / "model"), "--at", "9", "--out", str(tmp_path / "t")]) == 2
    assert "--at 9 must be a layer between 1 and 2" in capsys.readouterr().err
    assert main(["split", "--plan", str(run), "--rtt-ms", "-1"]) == 2
    assert "--rtt-ms must be >= 0, got -1.0" in capsys.readouterr().err
    plan_args = ["--plan", str(run), "--thresholds", "inf", "--num-inputs", "4", "--threads", "1"]
    assert main(["split", *plan_args, "--out", str(tmp_path / "plan")]) == 0
    result = json.loads((tmp_path / "plan" / "plan.json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 4 and (tmp_path / "plan" / "plan.png").is_file()
    nobody = [r for r in rows if "inf" in r["operating_point"]]  # τ = inf: everybody takes the last exit
    assert [r["offload_fraction"] for r in nobody] == [1.0, 1.0, 1.0, 0.0]
    assert nobody[0]["server_load"] > 1  # the server alone, and every gated exit on the way
    assert "| K |" in (tmp_path / "plan" / "plan.md").read_text()


def test_plan_of_an_image_run(tmp_path, monkeypatch):
    """`jeidnn split --plan` on a tiny ViT run: an image is 4 x 4 patches + the class token = 17 real tokens,
    its payload those tokens in float16, and at K = 0 it travels as the base64 PNG of `/predict`."""
    import base64
    import io
    import sys
    import types

    from test_families import FakeImages, run_family

    from jeidnn.serve.run_inputs import run_test_inputs

    data = FakeImages(300)
    fake = types.SimpleNamespace(
        Dataset=type("Dataset", (), {}), DatasetDict=dict, load_dataset=lambda path, subset: {"train": data}
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.chdir(tmp_path)
    run = run_family(tmp_path, "vit", ["--data.source", "hf", "--data.path", "colours"])
    plan_args = ["--plan", str(run), "--num-inputs", "4", "--threads", "1", "--out", str(tmp_path / "plan")]
    assert main(["split", *plan_args]) == 0
    rows = json.loads((tmp_path / "plan" / "plan.json").read_text())["rows"]
    assert [r["split_layer"] for r in rows] == [0, 1, 2, 3]  # one operating point: the exported one
    images = run_test_inputs(run, "image")
    sizes = []
    for image in images:
        png = io.BytesIO()
        image.save(png, format="PNG")
        sizes.append(len(json.dumps({"image": base64.b64encode(png.getvalue()).decode()})))
    assert rows[0]["offload_fraction"] == 1
    assert rows[0]["bytes_per_request"] == pytest.approx(sum(sizes) / len(sizes) + 40)  # {"inputs": [...]}
    one = len(encode(Payload(torch.zeros(1, 17, 32), torch.tensor([17]), None, "x" * 16, 1), "float16"))
    assert 17 * 32 * 2 < one < 17 * 32 * 2 + 400  # the tokens, and a header of a few hundred bytes
    for r in rows[1:3]:
        assert r["bytes_per_request"] == pytest.approx(r["offload_fraction"] * one)
    assert rows[3]["offload_fraction"] == 0 and rows[3]["server_load"] == 0
    assert "test images (mean 17.0 real tokens" in (tmp_path / "plan" / "plan.md").read_text()
