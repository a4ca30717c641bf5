"""Data: sources (embedded sets, CSV/JSONL files, `datasets`), deterministic splits, a LightningDataModule.

Splits: one seeded permutation of all samples; `test`, `calib` and `val` take their
fractions from its front, `train` the rest. Optional caps keep the first samples of a
split, so a capped split is a subset of the uncapped one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from jeidnn.config.schema import DataConfig
from jeidnn.data.corpora import read_corpus
from jeidnn.data.images import pixel_values
from jeidnn.data.tables import pad_token_lists, read_table
from jeidnn.errors import JeidnnError, first_line

SPLITS = ("train", "val", "calib", "test")


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
    return RawData(
        [raw.inputs[i] for i in keep],
        [raw.labels[i] for i in keep],
        raw.label_names,
        raw.name,
        raw.modality,
        duplicates_dropped=dropped,
    )


@dataclass
class Splits:
    indices: dict[str, list[int]]
    """Positions into `RawData.inputs` per split."""
    sizes: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- sources


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
    inputs, values, names = [], [], cfg.labels
    for split in wanted:
        part = ds[split]
        _check_column(column, part.column_names, f"{cfg.path}[{split}]", f"data.{modality}_column")
        _check_column(cfg.label_column, part.column_names, f"{cfg.path}[{split}]", "data.label_column")
        feature = part.features[cfg.label_column]
        split_labels = part[cfg.label_column]
        if cfg.hf_splits is None and split_labels and all(v == -1 for v in split_labels):
            continue  # unlabelled test splits (GLUE) carry -1
        if names is None and hasattr(feature, "names"):
            names = list(feature.names)
        inputs.extend(part[column])
        values.extend(split_labels)
    labels, names = encode_labels(values, names, str(cfg.path))
    return RawData(
        inputs, labels, names, str(cfg.path) + (f"/{cfg.hf_subset}" if cfg.hf_subset else ""), modality
    )


def make_splits(n: int, cfg: DataConfig, seed: int) -> Splits:
    """Deterministic, disjoint train/val/calib/test positions."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_test = int(round(n * cfg.test_fraction))
    n_calib = int(round(n * cfg.calib_fraction))
    n_val = int(round(n * cfg.val_fraction))
    parts = {
        "test": perm[:n_test],
        "calib": perm[n_test : n_test + n_calib],
        "val": perm[n_test + n_calib : n_test + n_calib + n_val],
        "train": perm[n_test + n_calib + n_val :],
    }
    if cfg.max_train_samples is not None:
        parts["train"] = parts["train"][: cfg.max_train_samples]
    if cfg.max_eval_samples is not None:
        for s in ("val", "calib", "test"):
            parts[s] = parts[s][: cfg.max_eval_samples]
    for s in SPLITS:
        if not parts[s]:
            raise JeidnnError(
                f"split {s!r} is empty ({n} samples in all); use more data or a larger data.{s}_fraction"
                if s != "train"
                else f"split 'train' is empty ({n} samples in all); lower the val/calib/test fractions"
            )
    return Splits(parts, {s: len(v) for s, v in parts.items()})


# --------------------------------------------------------------------------- preprocessing


class IndexedDataset(Dataset):
    """Samples of one split: (position in split, encoded input, label)."""

    def __init__(self, encoded: list[Any], labels: list[int]) -> None:
        self.encoded = encoded
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[int, Any, int]:
        return i, self.encoded[i], self.labels[i]


class Collator:
    """Pads token ids per batch (dynamic padding) or runs the image processor."""

    def __init__(self, modality: str, preprocessor: Any, pad_token_id: int = 0) -> None:
        self.modality = modality
        self.preprocessor = preprocessor
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[tuple[int, Any, int]]) -> dict[str, Tensor]:
        index = torch.tensor([b[0] for b in batch])
        labels = torch.tensor([b[2] for b in batch])
        if self.modality == "image":
            pixels = pixel_values(self.preprocessor, [b[1] for b in batch])  # (B, 3, H, W)
            return {"pixel_values": pixels, "labels": labels, "index": index}
        padded = pad_token_lists({"input_ids": [b[1] for b in batch]}, self.pad_token_id)  # each (B, T)
        return {
            **padded,
            "token_type_ids": torch.zeros_like(padded["input_ids"]),
            "labels": labels,
            "index": index,
        }


def model_inputs(batch: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    return {k: batch[k] for k in names if k in batch}


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of similar length for inference passes (less padding, same results)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class JeidnnDataModule(pl.LightningDataModule):
    """Splits + encoded inputs for one run.

    Example:
        >>> dm = JeidnnDataModule(cfg.data, raw, splits, preprocessor, max_length=64, seed=0)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader(batch_size=32)))
    """

    def __init__(
        self, cfg: DataConfig, raw: RawData, splits: Splits, preprocessor: Any, max_length: int, seed: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.raw = raw
        self.splits = splits
        self.preprocessor = preprocessor
        self.max_length = max_length
        self.seed = seed
        self.datasets: dict[str, IndexedDataset] = {}
        pad = getattr(preprocessor, "pad_token_id", 0) if raw.modality == "text" else 0
        self.collator = Collator(raw.modality, preprocessor, pad if pad is not None else 0)

    def encode(self, inputs: list[Any]) -> list[Any]:
        if self.raw.modality == "image":
            return inputs
        return self.preprocessor(inputs, truncation=True, max_length=self.max_length)["input_ids"]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, positions in self.splits.indices.items():
            encoded = self.encode([self.raw.inputs[i] for i in positions])
            self.datasets[split] = IndexedDataset(encoded, [self.raw.labels[i] for i in positions])

    def lengths(self, split: str) -> list[int]:
        ds = self.datasets[split]
        return [len(x) for x in ds.encoded] if self.raw.modality == "text" else [1] * len(ds)

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, limit: int | None = None
    ) -> DataLoader:
        """Batches of `split`; `limit` keeps its first samples (splits are already shuffled)."""
        self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        dataset = self.datasets[split]
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, range(limit))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
        )

    def sorted_loader(self, split: str, batch_size: int) -> DataLoader:
        """Length-bucketed batches in a fixed order (inference only)."""
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_sampler=length_sorted_batches(self.lengths(split), batch_size),
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
        )

    def train_dataloader(self, batch_size: int = 32) -> DataLoader:
        return self.loader("train", batch_size, shuffle=True)

    def val_dataloader(self, batch_size: int | None = None) -> DataLoader:
        return self.sorted_loader("val", batch_size or self.cfg.eval_batch_size)

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(self.datasets[split].labels)
        return {self.raw.label_names[k]: counts.get(k, 0) for k in range(len(self.raw.label_names))}
