"""Batches of a run's splits: encoded inputs per split, the collator that pads them, and the
LightningDataModule that hands out training and inference loaders.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from jeidnn.config.schema import DataConfig
from jeidnn.data.images import pixel_values
from jeidnn.data.sources import RawData
from jeidnn.data.splits import Splits
from jeidnn.data.tables import pad_token_lists


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
        >>> batch = next(iter(dm.loader("train", batch_size=32, shuffle=True)))
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

    def val_dataloader(self, batch_size: int | None = None) -> DataLoader:
        return self.sorted_loader("val", batch_size or self.cfg.eval_batch_size)

    def label_counts(self, split: str) -> dict[str, int]:
        counts = Counter(self.datasets[split].labels)
        return {self.raw.label_names[k]: counts.get(k, 0) for k in range(len(self.raw.label_names))}
