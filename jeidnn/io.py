"""Files a run writes: atomic writes (a killed process leaves the old file or the new one, never half) and
the one conversion of results to plain JSON.

Every file jeidnn writes for a user or for resuming goes through these helpers::

    write_json(run_dir / "report.json", report)          # NaN / inf -> null, tensors -> lists
    write_safetensors(path, {"features": x})             # tensors, optional string metadata
    with atomic_folder(out, overwrite=False) as tmp:     # a whole folder, renamed into place at the end
        model.save_pretrained(tmp)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from jeidnn.errors import JeidnnError


def json_safe(value: Any, nonfinite: Literal["null", "string"] = "null") -> Any:
    """Plain JSON values: tensors and numpy arrays -> lists, numpy scalars -> numbers, tuples -> lists, dict
    keys -> strings, and NaN / ±inf (JSON has none; Python would write ``Infinity``, which strict parsers
    refuse) -> ``None`` (``nonfinite="null"``: report.json, where a missing number reads as such) or
    ``"nan"`` / ``"inf"`` / ``"-inf"`` (``"string"``: a saved model's config.json, whose float fields go
    through ``float()`` on load and come back as the same floats).

    Example:
        >>> json_safe({"a": (1.0, float("inf"))}), json_safe(float("-inf"), nonfinite="string")
        ({'a': [1.0, None]}, '-inf')
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, nonfinite) for v in value]
    if hasattr(value, "tolist") and not isinstance(
        value, (str, bytes)
    ):  # torch.Tensor, np.ndarray, np scalar
        return json_safe(value.tolist(), nonfinite)
    if isinstance(value, float) and not math.isfinite(value):
        return None if nonfinite == "null" else str(value)
    return value


def _replace_from_tmp(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` on a sibling temporary path, then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    _replace_from_tmp(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as strict JSON (see :func:`json_safe`), atomically."""
    text = json.dumps(json_safe(data), indent=indent, allow_nan=False)
    write_text(path, text)


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of contiguous copies of ``tensors``, atomically."""
    from safetensors.torch import save_file  # torch-heavy: not needed by the JSON helpers

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    _replace_from_tmp(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; on success it replaces ``out``. A failure leaves no
    partial folder (and removes the parent folders this call created).

    Raises:
        JeidnnError: ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise JeidnnError(f"{out} already exists; pass --overwrite or choose another --out")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
