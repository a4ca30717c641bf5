"""Deterministic train / val / calib / test splits of a run's samples.

Splits: one seeded permutation of all samples; `test`, `calib` and `val` take their
fractions from its front, `train` the rest. With `data.test_split` the named dataset split is `test`
(in a seeded order) and `calib`, `val` and `train` come the same way from a seeded permutation of the
other samples. Optional caps keep the first samples of a split, so a capped split is a subset of the
uncapped one.

`jeidnn prune` reads the data again and rebuilds the splits from the config, then matches them to the
run's saved predictions by position: :func:`split_fingerprint` identifies the splits a run
saw, and :func:`check_fingerprint` refuses data that no longer gives them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from jeidnn.config.schema import DataConfig
from jeidnn.data.sources import RawData
from jeidnn.errors import JeidnnError

SPLITS = ("train", "val", "calib", "test")


@dataclass
class Splits:
    """Which samples each of train / val / calib / test holds, in split order."""

    indices: dict[str, list[int]]
    """Positions into `RawData.inputs` per split."""
    sizes: dict[str, int] = field(default_factory=dict)


def make_splits(n: int, cfg: DataConfig, seed: int, test_positions: list[int] | None = None) -> Splits:
    """Deterministic, disjoint train/val/calib/test positions.

    Args:
        n: number of samples.
        test_positions: the samples of `data.test_split` (:attr:`RawData.test_positions`), which become
            `test`; required with `data.test_split`, and None without it.
    """
    if (cfg.test_split is None) != (test_positions is None):
        raise ValueError("pass RawData.test_positions to make_splits exactly when data.test_split is set")
    g = torch.Generator().manual_seed(seed)
    if test_positions is None:
        perm = torch.randperm(n, generator=g).tolist()
        n_test = int(round(n * cfg.test_fraction))
        test, rest = perm[:n_test], perm[n_test:]
    else:
        fixed = set(test_positions)
        others = [i for i in range(n) if i not in fixed]
        rest = [others[j] for j in torch.randperm(len(others), generator=g).tolist()]
        test = [test_positions[j] for j in torch.randperm(len(test_positions), generator=g).tolist()]
        n = len(others)  # val and calib take their fractions of the samples outside test
    n_calib = int(round(n * cfg.calib_fraction))
    n_val = int(round(n * cfg.val_fraction))
    parts = {
        "test": test,
        "calib": rest[:n_calib],
        "val": rest[n_calib : n_calib + n_val],
        "train": rest[n_calib + n_val :],
    }
    if cfg.max_train_samples is not None:
        parts["train"] = parts["train"][: cfg.max_train_samples]
    if cfg.max_eval_samples is not None:
        for s in ("val", "calib", "test"):
            parts[s] = parts[s][: cfg.max_eval_samples]
    for s in SPLITS:
        if s == "test" and not parts[s] and test_positions is not None:
            raise JeidnnError(f"split 'test' is empty: data.test_split {cfg.test_split!r} holds no samples")
        if not parts[s]:
            raise JeidnnError(
                f"split {s!r} is empty ({n} samples in all); use more data or a larger data.{s}_fraction"
                if s != "train"
                else f"split 'train' is empty ({n} samples in all); lower the val/calib/test fractions"
            )
    return Splits(parts, {s: len(v) for s, v in parts.items()})


# --------------------------------------------------------------------------- fingerprint


def _input_bytes(x: Any) -> bytes:
    """A text's UTF-8 bytes; an image's mode, size and pixels; an array's dtype, shape and values."""
    if isinstance(x, str):
        return b"str:" + x.encode("utf-8")
    if hasattr(x, "mode") and hasattr(x, "tobytes"):  # a PIL image
        return f"image:{x.mode}:{x.size}:".encode() + x.tobytes()
    array = np.ascontiguousarray(np.asarray(x))
    return f"array:{array.dtype.str}:{array.shape}:".encode() + array.tobytes()


def split_fingerprint(raw: RawData, splits: Splits) -> str:
    """sha256 (hex) over the label names and, split by split in `SPLITS` order, every sample's input and
    label in split order: equal fingerprints mean the same samples, labels and order in every split.

    Example:
        >>> raw = RawData(["a", "b", "c", "d"], [0, 1, 0, 1], ["neg", "pos"], "toy")
        >>> splits = Splits({"train": [0], "val": [1], "calib": [2], "test": [3]})
        >>> len(split_fingerprint(raw, splits))
        64
    """
    h = hashlib.sha256()

    def update(data: bytes) -> None:  # length-prefixed, so that no two sequences of items hash alike
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for name in raw.label_names:
        update(name.encode("utf-8"))
    for split in SPLITS:
        positions = splits.indices[split]
        update(f"{split}:{len(positions)}".encode())
        for i in positions:
            update(_input_bytes(raw.inputs[i]))
            update(int(raw.labels[i]).to_bytes(8, "little", signed=True))
    return h.hexdigest()


def check_fingerprint(raw: RawData, splits: Splits, expected: str | None, cfg: DataConfig) -> None:
    """Refuse data whose splits are not the ones a run saw (`expected`, its :func:`split_fingerprint`).

    A run without a recorded fingerprint (`expected` None) is not checked.

    Raises:
        JeidnnError: one line naming the data and what to do.
    """
    if expected is None:
        return
    actual = split_fingerprint(raw, splits)
    if actual == expected:
        return
    if cfg.source in ("csv", "jsonl"):
        where = f"data file {cfg.path}"
    elif cfg.source == "hf":
        where = f"dataset {raw.name}"
    else:
        where = f"embedded corpus {raw.name}"
    raise JeidnnError(
        f"the {where} changed since the run: its splits differ from the run's (fingerprint {actual[:12]}, "
        f"the run recorded {expected[:12]}); use the data the run was trained on, or train a new run"
    )
