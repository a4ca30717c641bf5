"""`jeidnn serve` on tiny models, started on a free loopback port inside the tests: answers equal
`predict`'s (alone and micro-batched with others; texts, and base64 PNGs on a tiny ViT), the bad-request
matrix (4xx, one line, the server keeps serving), a request that fails inside the model gets a 500 while the
others of its batch are answered, and /metrics counts what happened."""

import asyncio
import json

import pytest
from predict_model import LABELS, TEXTS, text_model

pytest.importorskip("fastapi", reason="the serving tests need the extra jeidnn[serve]")
httpx = pytest.importorskip("httpx", reason="the serving tests need the extra jeidnn[serve]")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jeidnn.serve.app import ServeSettings, create_app  # noqa: E402
from jeidnn.serve.batcher import MicroBatcher  # noqa: E402
from jeidnn.serve.server import running  # noqa: E402

MARKED = "[MASK]"  # the tokenizer keeps it whole (id 4): the patched model fails on it


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return text_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def url(model):
    settings = ServeSettings(max_batch_size=8, max_wait_ms=2, max_inputs=20, max_request_bytes=2000)
    with running(create_app(model, settings)) as base:
        yield base


def metrics(base: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    text = httpx.get(f"{base}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def reference(model, texts, alpha=None):
    return [p.to_json() for p in model.predict(texts, alpha=alpha)]


def test_answers_equal_predict(model, url):
    got = httpx.post(f"{url}/predict", json={"inputs": TEXTS}).json()["predictions"]
    assert got == reference(model, TEXTS)  # one request alone: predict's batch, to the last bit
    assert {row["exit_layer"] for row in got} == {1, 3}
    strict = httpx.post(f"{url}/predict", json={"inputs": TEXTS, "alpha": 0.05}).json()["predictions"]
    assert strict == reference(model, TEXTS, alpha=0.05)
    assert any(len(a["prediction_set"]) > len(b["prediction_set"]) for a, b in zip(strict, got))


async def _concurrently(base: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        return await asyncio.gather(*(client.post("/predict", json=body) for body in bodies))


def test_concurrent_requests_share_batches_and_get_their_own_rows(model, tmp_path):
    """Twelve requests of one or two texts arrive together: the batches hold several of them (8 rows at
    most), every request gets its own rows, and exits, labels and sets equal predict's on the same texts."""
    bodies = [{"inputs": [TEXTS[i % 6], TEXTS[(i * 5 + 1) % 6]][: 1 + i % 2]} for i in range(12)]
    with running(create_app(model, ServeSettings(max_batch_size=8, max_wait_ms=300))) as base:
        replies = asyncio.run(_concurrently(base, bodies))
        seen = metrics(base)
    for body, reply in zip(bodies, replies):
        assert reply.status_code == 200
        got, want = reply.json()["predictions"], reference(model, body["inputs"])
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert (a["label"], a["exit_layer"], a["cost"], a["prediction_set"]) == (
                b["label"], b["exit_layer"], b["cost"], b["prediction_set"],
            )  # fmt: skip
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)  # other padding: last bits
    rows = sum(len(b["inputs"]) for b in bodies)
    calls = seen[("jeidnn_batch_size_count", ())]
    assert seen[("jeidnn_batch_size_sum", ())] == rows == 18
    assert 3 <= calls < 12  # 18 rows in batches of at most 8: at least 3 calls, fewer than one per request
    assert seen[("jeidnn_batch_size_bucket", (("le", "8.0"),))] == calls  # no batch above 8 rows
    answered = [row for reply in replies for row in reply.json()["predictions"]]
    for layer in (1, 2, 3):
        taken = sum(row["exit_layer"] == layer for row in answered)
        assert seen[("jeidnn_exits_total", (("layer", str(layer)),))] == taken
    assert seen[("jeidnn_cost_total", ())] == pytest.approx(sum(row["cost"] for row in answered))
    assert seen[("jeidnn_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 12


BAD_REQUESTS = [
    # (body, status, what the one-line message says)
    (b'{"inputs": ["a"', 400, "not valid JSON"),
    (b'["a"]', 422, "the request body is a list"),
    (b'{"texts": ["a"]}', 422, "unknown field 'texts'"),
    (b'{"alpha": 0.1}', 422, "no `inputs`"),
    (b'{"inputs": "a text"}', 422, "`inputs` is a string; send a list"),
    (b'{"inputs": []}', 422, "`inputs` is empty"),
    (b'{"inputs": ["ok", 3]}', 422, "inputs[1] is an integer (3), not a text"),
    (b'{"inputs": ["ok", "  "]}', 422, "inputs[1] is an empty text"),
    (b'{"inputs": [{"image": "iVBORw0KGgo="}]}', 422, "inputs[0] is an image; this is a text model"),
    (b'{"inputs": ["ok"], "alpha": true}', 422, "`alpha` is a boolean"),
    (b'{"inputs": ["ok"], "alpha": NaN}', 422, "`alpha` is a float"),
    (
        b'{"inputs": ["ok"], "alpha": 0.2}',
        422,
        "alpha 0.2 was not calibrated for this model; available: 0.05, 0.1",
    ),
    (json.dumps({"inputs": ["ok"] * 21}).encode(), 413, "holds 21 inputs; this server takes at most 20"),
    (json.dumps({"inputs": ["x" * 3000]}).encode(), 413, "bytes; this server accepts at most 2000"),
    (b"\xff\xfe", 400, "not valid JSON"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_line_and_the_server_keeps_serving(model, url, body, status, message):
    reply = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error and "\n" not in error
    assert httpx.post(f"{url}/predict", json={"inputs": TEXTS[:2]}).json()["predictions"] == reference(
        model, TEXTS[:2]
    )


def test_other_paths_and_methods_and_health(model, url):
    assert httpx.get(f"{url}/predict").status_code == 405
    missing = httpx.get(f"{url}/nowhere")
    assert missing.status_code == 404 and missing.json() == {"error": "GET /nowhere: Not Found"}
    wrong = httpx.post(f"{url}/v1/continue", content=b"x")
    assert wrong.status_code == 404 and "POST /predict" in wrong.json()["error"]
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "role": "model", "labels": LABELS, "exit_layers": [1, 2, 3]}


def test_a_failure_inside_the_model_fails_only_its_request(model, monkeypatch):
    """The model raises on batches holding the marked text: its request gets a 500, the two others of the
    same batch their answers, and the error is counted."""
    forward = model.forward_dynamic

    def failing(inputs):
        if (inputs["input_ids"] == 4).any():
            raise RuntimeError("boom")
        return forward(inputs)

    monkeypatch.setattr(model, "forward_dynamic", failing)
    bodies = [{"inputs": [TEXTS[0]]}, {"inputs": [MARKED, TEXTS[1]]}, {"inputs": TEXTS[2:4]}]
    with running(create_app(model, ServeSettings(max_batch_size=8, max_wait_ms=300))) as base:
        replies = asyncio.run(_concurrently(base, bodies))
        seen = metrics(base)
    assert [r.status_code for r in replies] == [200, 500, 200]
    assert replies[1].json() == {"error": "the model failed on this request: boom"}
    monkeypatch.undo()
    assert replies[0].json()["predictions"] == reference(model, [TEXTS[0]])
    assert replies[2].json()["predictions"] == reference(model, TEXTS[2:4])
    assert seen[("jeidnn_model_errors_total", ())] == 1
    # One call on the whole batch (5 rows), then each request alone.
    assert seen[("jeidnn_batch_size_count", ())] == 4 and seen[("jeidnn_batch_size_sum", ())] == 10


def test_the_batcher_answers_each_job_once_in_batches_that_fit():
    """Without a model: 40 jobs of 1 to 5 rows arrive together; every job gets its own result, each job is
    computed exactly once, and no call holds more than 8 rows."""
    calls = []

    def compute(jobs):
        calls.append([job.items for job in jobs])
        return [[x * 10 for x in job.items] for job in jobs]

    async def go():
        batcher = MicroBatcher(compute, max_batch_size=8, max_wait_ms=20)
        await batcher.start()
        jobs = [list(range(i, i + 1 + i % 5)) for i in range(40)]
        results = await asyncio.gather(*(batcher.submit(items, len(items)) for items in jobs))
        await batcher.stop()
        return jobs, results

    jobs, results = asyncio.run(go())
    assert results == [[x * 10 for x in items] for items in jobs]
    assert sorted(map(tuple, (items for call in calls for items in call))) == sorted(map(tuple, jobs))
    assert all(sum(len(items) for items in call) <= 8 for call in calls)
    assert len(calls) < 40


def test_the_listening_socket_says_it_is_tcp():
    """asyncio turns Nagle's algorithm off only on sockets created as IPPROTO_TCP; without it every answer's
    body waited ~40 ms for the client's delayed ACK (uvicorn writes head and body apart)."""
    import socket

    from jeidnn.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


class _Text:
    """A stand-in text model for padding_groups, which reads only the modality and the token lists."""

    class config:  # noqa: N801
        modality = "text"


def _tokens(*lengths: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": [0] * n} for n in lengths]


def test_padding_groups_minimise_padded_tokens_plus_a_cost_per_group():
    from jeidnn.serve.runners import GROUP_OVERHEAD_TOKENS, padding_groups

    assert GROUP_OVERHEAD_TOKENS == 96
    # Three long and three short texts: 3 x 60 + 3 x 12 + 2 x 96 = 408 < 6 x 60 + 96 = 456 for one group.
    assert padding_groups(_Text, _tokens(10, 60, 12, 58, 11, 59), 64) == [[1, 5, 3], [2, 4, 0]]
    # Lengths 40 and 30: one group costs 2 x 40 + 96 = 176, two 40 + 30 + 192 = 262.
    assert padding_groups(_Text, _tokens(30, 40), 64) == [[1, 0]]
    # At most max_rows a group, every input once.
    groups = padding_groups(_Text, _tokens(*[5] * 7), 3)
    assert all(len(g) <= 3 for g in groups) and sorted(i for g in groups for i in g) == list(range(7))


# ---------------------------------------------------------------------- an image model
def _png(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def image_model():
    """A tiny random ViT whose threshold gates send some of IMAGES to the first exit and the rest on."""
    import torch
    from test_early_exit import split_value, tiny_model
    from transformers import ViTImageProcessor

    from jeidnn.model.rule_gates import ThresholdGates

    model = tiny_model("vit", "none", costs=[0.4, 0.7, 1.01])
    model.preprocessor = ViTImageProcessor(size={"height": 16, "width": 16})
    pixels = model.preprocessor(images=IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        maxprob = model.forward_full({"pixel_values": pixels}).exit_logits.softmax(-1).amax(-1)  # (N, 3)
    model.gates = ThresholdGates([split_value(maxprob[:, 0], min_side=3)[0], 2.0])
    return model


def _images(n: int, seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


IMAGES = _images(10)


def test_images_over_http_equal_predict(image_model):
    """Base64 PNGs (lossless: the server reads the very pixels `predict` gets) answered as `predict` answers
    them, alone and micro-batched; a text for an image model gets a 422 line and the server keeps serving."""
    want = [p.to_json() for p in image_model.predict(IMAGES)]
    assert {row["exit_layer"] for row in want} == {1, 3}
    bodies = [{"inputs": [{"image": _png(image)} for image in IMAGES[i : i + 2]]} for i in range(0, 10, 2)]
    with running(create_app(image_model, ServeSettings(max_batch_size=8, max_wait_ms=200))) as base:
        whole = httpx.post(f"{base}/predict", json={"inputs": [{"image": _png(i)} for i in IMAGES]})
        replies = asyncio.run(_concurrently(base, bodies))  # five requests of two images share batches
        refusals = [
            httpx.post(f"{base}/predict", json={"inputs": inputs})
            for inputs in (
                ["a text"],
                [{"image": _png(IMAGES[0]), "alpha": 0.1}],
                [{"image": "not base64!"}],
                [{"image": "aGVsbG8="}],  # base64 of "hello"
            )
        ]
        again = httpx.post(f"{base}/predict", json={"inputs": [{"image": _png(IMAGES[3])}]})
        seen = metrics(base)
    # The server batches up to 8 images, `predict` its own way: a row's logits may differ in the last bit
    # between batch compositions (CPU matmul kernels block by batch size).
    for i, reply in enumerate([whole, *replies]):
        got = reply.json()["predictions"]
        expected = want if i == 0 else want[2 * i - 2 : 2 * i]
        assert [{**a, "probability": None} for a in got] == [{**b, "probability": None} for b in expected]
        assert [a["probability"] for a in got] == pytest.approx(
            [b["probability"] for b in expected], abs=1e-6
        )
    calls = seen[("jeidnn_batch_size_count", ())] - 2  # the two single requests' calls aside
    assert 2 <= calls < 5  # ten images in batches of at most 8, not one call per request
    messages = [
        "inputs[0] is a string; this is an image model",
        "inputs[0] must be {\"image\": \"<base64 PNG or JPEG>\"}, got keys ['alpha', 'image']",
        "inputs[0].image is not base64",
        "inputs[0].image is not an image PIL can read",
    ]
    for reply, message in zip(refusals, messages):
        error = reply.json()["error"]
        assert reply.status_code == 422 and message in error and "\n" not in error
    assert again.json()["predictions"] == [want[3]]


def test_a_group_is_the_batch_predict_builds(model):
    """Texts tokenised one request at a time and padded per group give the very tensors `predict` builds
    (make_batches, longest first) for those texts."""
    import torch

    from jeidnn.hf.batches import make_batches
    from jeidnn.serve.runners import encode_texts, group_batch, padding_groups

    items = [row for text in TEXTS for row in encode_texts(model, [text])]  # one request per text
    (group,) = padding_groups(model, items, 64)  # six short texts: one group
    ((positions, want),) = make_batches(model, TEXTS, 64)
    assert group == positions
    got = group_batch(model, items, group)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert int(got["attention_mask"].sum()) < got["attention_mask"].numel()  # some rows are padded
