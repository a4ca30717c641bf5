"""Labelled samples from the configured source: an embedded corpus, a CSV / JSON-lines file or a `datasets`
dataset (`data.source`), labels encoded as class indices, exact duplicate texts dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jeidnn.config.schema import DataConfig
from jeidnn.data.corpora import read_corpus
from jeidnn.data.tables import read_table
from jeidnn.errors import JeidnnError, first_line


@dataclass
class RawData:
    """All samples before splitting."""

    inputs: list[Any]
    """Texts (str) or images (PIL images / arrays)."""
    labels: list[int]
    label_names: list[str]
    name: str
    modality: str = "text"
    duplicates_dropped: int = 0
    test_positions: list[int] | None = None
    """Positions of the samples of `data.test_split`, which becomes `test` whole; None without it."""


def drop_duplicate_texts(raw: RawData) -> RawData:
    """Keep the first occurrence of every distinct text."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(raw.inputs):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    dropped = len(raw.inputs) - len(keep)
    if not dropped:
        return raw
    test = None
    if raw.test_positions is not None:
        fixed = set(raw.test_positions)
        test = [new for new, old in enumerate(keep) if old in fixed]
    return RawData(
        [raw.inputs[i] for i in keep],
        [raw.labels[i] for i in keep],
        raw.label_names,
        raw.name,
        raw.modality,
        duplicates_dropped=dropped,
        test_positions=test,
    )


def _check_column(column: str, columns: list[str], where: str, key: str) -> None:
    if column not in columns:
        raise JeidnnError(
            f"column {column!r} not found in {where} (columns: {', '.join(map(str, columns)) or 'none'}); "
            f"set {key}"
        )


def encode_labels(values: list[Any], names: list[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Map raw label values (names or integer ids) to class indices."""
    if any(v is None or (isinstance(v, str) and not v.strip()) for v in values):
        i = next(i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip()))
        raise JeidnnError(f"empty label in {where} (record {i}); every sample needs a label")
    odd = next(
        (i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, str))), None
    )
    if odd is not None:
        raise JeidnnError(
            f"label {values[odd]!r} in {where} (record {odd}) is a {type(values[odd]).__name__}; "
            "labels must be names or integer ids"
        )
    if names is not None and len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise JeidnnError(f"data.labels names {twice} more than once; give each class one distinct name")
    ints = all(isinstance(v, int) for v in values)
    if names is None:
        distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        names = [str(v) for v in distinct]
        lookup = {v: i for i, v in enumerate(distinct)}
    else:
        if ints:
            bad = next((v for v in values if not 0 <= v < len(names)), None)
            if bad is not None:
                raise JeidnnError(
                    f"label {bad} in {where} is out of range for data.labels with {len(names)} names; "
                    "fix data.labels or the label column"
                )
            lookup = {i: i for i in range(len(names))}
        else:
            lookup = {name: i for i, name in enumerate(names)}
            bad = next((v for v in values if str(v) not in lookup), None)
            if bad is not None:
                raise JeidnnError(
                    f"label {bad!r} in {where} is not one of data.labels {names}; add it or fix the data"
                )
            values = [str(v) for v in values]
    if len(names) < 2:
        raise JeidnnError(
            f"{where} has {len(names)} distinct label(s) {names}; classification needs at least 2"
        )
    return [lookup[v] for v in values], names


def load_raw(cfg: DataConfig, modality: str) -> RawData:
    """Read every sample of the configured source (text duplicates dropped if configured)."""
    raw = _load_source(cfg, modality)
    if cfg.drop_duplicates and raw.modality == "text":
        raw = drop_duplicate_texts(raw)
    return raw


def _load_source(cfg: DataConfig, modality: str) -> RawData:
    if cfg.source == "hf":
        return _load_hf(cfg, modality)
    if modality != "text":
        raise JeidnnError(f"data.source {cfg.source!r} holds text, but the backbone takes {modality} inputs")
    if cfg.source == "embedded":
        texts, values, name = read_corpus(cfg.path)
        labels, names = encode_labels(values, cfg.labels, name)
        return RawData(texts, labels, names, name, "text")
    table = read_table(cfg.path, cfg.source, what="data file", option="data.path")
    texts = table.column(cfg.text_column, "data.text_column")
    raw_labels = table.column(cfg.label_column, "data.label_column")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise JeidnnError(
                f"record {i} of {table.path} has an empty or non-text {cfg.text_column!r}; clean the file"
            )
    if cfg.source == "csv":
        # CSV stores every value as text; integer ids arrive as "0", "1", ...
        if all(isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in raw_labels):
            raw_labels = [int(v) for v in raw_labels]
    labels, names = encode_labels(raw_labels, cfg.labels, str(table.path))
    return RawData(texts, labels, names, table.path.name, "text")


def _load_hf(cfg: DataConfig, modality: str) -> RawData:
    try:
        import datasets
    except ImportError:
        raise JeidnnError("data.source hf needs the `datasets` package: pip install datasets") from None
    local = Path(cfg.path).expanduser()
    try:
        if local.exists():
            saved = (local / "dataset_dict.json").exists() or (local / "dataset_info.json").exists()
            ds = (
                datasets.load_from_disk(str(local))
                if saved
                else datasets.load_dataset(str(local), cfg.hf_subset)
            )
        else:
            ds = datasets.load_dataset(cfg.path, cfg.hf_subset)
    except Exception as exc:  # datasets raises many types; all mean "cannot load this name"
        first = first_line(exc)
        raise JeidnnError(
            f"cannot load dataset {cfg.path!r} ({first}); check data.path / data.hf_subset"
        ) from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    column = cfg.text_column if modality == "text" else cfg.image_column
    wanted = cfg.hf_splits or list(ds.keys())
    missing = [s for s in wanted if s not in ds]
    if missing:
        raise JeidnnError(f"dataset {cfg.path!r} has no split(s) {missing}; available: {list(ds.keys())}")
    if cfg.test_split is not None and cfg.test_split not in ds:
        raise JeidnnError(
            f"dataset {cfg.path!r} has no split {cfg.test_split!r} (data.test_split); "
            f"available: {list(ds.keys())}"
        )
    inputs, values, names, test = [], [], cfg.labels, None
    for split in wanted:
        part = ds[split]
        _check_column(column, part.column_names, f"{cfg.path}[{split}]", f"data.{modality}_column")
        _check_column(cfg.label_column, part.column_names, f"{cfg.path}[{split}]", "data.label_column")
        feature = part.features[cfg.label_column]
        split_labels = part[cfg.label_column]
        if cfg.hf_splits is None and split_labels and all(v == -1 for v in split_labels):
            if split == cfg.test_split:
                raise JeidnnError(
                    f"split {split!r} of dataset {cfg.path!r} has no labels (all -1); "
                    "name a labelled split in data.test_split"
                )
            continue  # unlabelled test splits (GLUE) carry -1
        if names is None and hasattr(feature, "names"):
            names = list(feature.names)
        if split == cfg.test_split:
            test = list(range(len(inputs), len(inputs) + len(split_labels)))
        inputs.extend(part[column])
        values.extend(split_labels)
    labels, names = encode_labels(values, names, str(cfg.path))
    name = str(cfg.path) + (f"/{cfg.hf_subset}" if cfg.hf_subset else "")
    return RawData(inputs, labels, names, name, modality, test_positions=test)
