"""Every supported backbone family through the whole run on a tiny random config.

For each family in ``TINY_CONFIGS``: ``python train.py`` (stages 0-4 and the export), ``jeidnn export`` of a
threshold operating point, the Auto classes and ``transformers.pipeline`` on the exported folder, the
layer-skipping forward equal to the all-layers forward, the same exits at batch 1 and batch 64, and
``jeidnn prune`` (or its one-line refusal for a family whose structure it cannot prune).
"""

import json

import pytest
import torch
from tiny_models import TEXT_ARCHS, TINY_CONFIGS, few_steps_argv, write_sentiment_csv

from jeidnn.cli.main import main, train_main
from jeidnn.model.families import family_of


def run_family(tmp_path, arch: str, data: list[str] | None = None):
    """``python train.py`` on a tiny random ``arch`` (configs/smoke.yaml, fewer steps); the run folder."""
    if data is None:
        csv = write_sentiment_csv(tmp_path / "data.csv", n=300)
        data = ["--data.source", "csv", "--data.path", str(csv)]
    model = ["--model.random_config", json.dumps(TINY_CONFIGS[arch])]
    assert train_main(few_steps_argv(model, data, tmp_path / "runs", arch)) == 0
    return tmp_path / "runs" / arch


TEXTS = [
    "the road was awful today",
    "a lovely day",
    "my phone",
    "it was okay really very fine the car the road the day",
]


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_family_whole_run(tmp_path, arch, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run = run_family(tmp_path, arch)
    report = json.loads((run / "report.json").read_text())
    assert report["backbone"]["architecture"] == TINY_CONFIGS[arch]["model_type"]
    assert (run / "model" / "config.json").is_file()

    out = tmp_path / "exported"
    export = ["export", str(run), "--method", "threshold_maxprob", "--budget", "0.7", "--out", str(out)]
    assert main(export) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    predictions = model.predict(TEXTS)
    labels = [p["label"] for p in pipeline("text-classification", model=str(out))(TEXTS)]
    assert labels == [p.label for p in predictions]
    assert set(labels) <= {"negative", "neutral", "positive"}

    # Texts the run never saw: a fitted threshold is a calib sample's own confidence, and at a tie the exit
    # of that very sample is decided by float noise, which differs between batch shapes.
    unseen = write_sentiment_csv(tmp_path / "unseen.csv", n=96, seed=1)
    texts = [line.split(",")[0] for line in unseen.read_text().splitlines()[1:]]
    inputs = dict(tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt"))
    with torch.no_grad():
        full, dynamic = model.forward_full(inputs), model.forward_dynamic(inputs)
    assert torch.equal(full.exit_index, dynamic.exit_index)
    torch.testing.assert_close(full.logits, dynamic.logits, atol=1e-5, rtol=1e-4)
    assert len(set(full.exit_index.tolist())) > 1, "the operating point should spread the samples over exits"
    one_by_one = [(p.exit_layer, p.label) for p in model.predict(texts, batch_size=1, sets=False)]
    assert one_by_one == [(p.exit_layer, p.label) for p in model.predict(texts, batch_size=64, sets=False)]

    pruned = tmp_path / "pruned"
    code = main(["prune", str(run), "--heads", "0.5", "--out", str(pruned), "--quiet"])
    refusal = family_of(TINY_CONFIGS[arch]["model_type"]).prune_refusal
    if refusal is None:
        assert code == 0 and (pruned / "config.json").is_file()
    else:
        assert code == 2 and not pruned.exists()
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and refusal in err[-1]


class FakeImages:
    """The part of a `datasets.Dataset` the loader reads: PIL images whose dominant colour is the class."""

    def __init__(self, n: int, seed: int = 0):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        labels = [int(v) for v in rng.integers(0, 3, n)]
        images = []
        for label in labels:
            pixels = rng.integers(0, 120, (16, 16, 3))
            pixels[..., label] += 120 if rng.random() < 0.85 else 0  # some images carry no cue
            images.append(Image.fromarray(pixels.astype("uint8")))
        self.columns = {"image": images, "label": labels}
        self.column_names = list(self.columns)
        import types

        self.features = {"label": types.SimpleNamespace(names=["red", "green", "blue"])}

    def __getitem__(self, column):
        return list(self.columns[column])


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_vision_family_whole_run(tmp_path, arch, monkeypatch):
    import sys
    import types

    from transformers import AutoModelForImageClassification, pipeline

    data = FakeImages(300)
    fake = types.SimpleNamespace(
        Dataset=type("Dataset", (), {}), DatasetDict=dict, load_dataset=lambda path, subset: {"train": data}
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.chdir(tmp_path)
    run = run_family(tmp_path, arch, ["--data.source", "hf", "--data.path", "colours"])

    out = tmp_path / "exported"
    export = ["export", str(run), "--method", "threshold_maxprob", "--budget", "0.7", "--out", str(out)]
    assert main(export) == 0
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    images = data["image"][:96]
    predictions = model.predict(images[:4])
    top = pipeline("image-classification", model=str(out))(images[:4], top_k=1)  # one [best] per image
    assert [best["label"] for (best,) in top] == [p.label for p in predictions]

    inputs = {"pixel_values": model.preprocessor(images=images, return_tensors="pt")["pixel_values"]}
    with torch.no_grad():
        full, dynamic = model.forward_full(inputs), model.forward_dynamic(inputs)
    assert torch.equal(full.exit_index, dynamic.exit_index)
    torch.testing.assert_close(full.logits, dynamic.logits, atol=1e-5, rtol=1e-4)
    one_by_one = [(p.exit_layer, p.label) for p in model.predict(images, batch_size=1, sets=False)]
    assert one_by_one == [(p.exit_layer, p.label) for p in model.predict(images, batch_size=64, sets=False)]
    assert main(["prune", str(run), "--heads", "0.5", "--out", str(tmp_path / "pruned"), "--quiet"]) == 0
