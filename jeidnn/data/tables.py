"""Text tables: the one reader of CSV and JSON-lines files, and the one padding of token lists.

Training data (`data.source: csv / jsonl`), `jeidnn predict --input`, the speed benchmark's
``--inputs`` and the embedded corpora all read their files through :func:`read_table`, so a file
that one of them accepts the others accept too. Files are UTF-8 (a byte-order mark is dropped,
as Excel writes one); any other encoding is refused with the byte offset of the first undecodable
byte, except where a caller names the encoding of a file it knows (the embedded tweet corpus is
latin-1). A leading ``~`` in a path is the user's home folder.

:func:`pad_token_lists` right-pads per-sample token lists into a batch for both the training
collator (:class:`jeidnn.data.datamodule.Collator`) and prediction (:func:`jeidnn.hf.batches.make_batches`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from jeidnn.errors import JeidnnError

__all__ = ["Table", "check_texts", "pad_token_lists", "read_table", "read_texts", "table_kind"]

TableKind = Literal["csv", "jsonl"]
SUFFIXES: dict[str, TableKind] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

# csv refuses fields over 131,072 characters by default; a long document is a valid text (the
# tokenizer truncates it), so the limit only guards against a runaway unclosed quote.
_CSV_FIELD_LIMIT = 1 << 27


@dataclass
class Table:
    """The records of one CSV or JSON-lines file.

    Example:
        >>> table = read_table("~/tweets.csv")  # doctest: +SKIP
        >>> texts = table.column("text", "--column")  # doctest: +SKIP
    """

    path: Path
    """The file, with ``~`` expanded."""
    columns: list[str]
    """CSV: the header row; JSON lines: every key of any record, in order of first appearance."""
    rows: list[dict[str, Any]]
    """One dict per record; a CSV row shorter than the header lacks its last keys' values (None)."""

    def column(self, name: str, option: str) -> list[Any]:
        """Every record's value of column `name` (None where a record lacks it).

        Raises:
            JeidnnError: no such column; the message lists the columns and names `option`, the setting
                that chose the column (e.g. ``data.text_column``, ``--column``).
        """
        if name not in self.columns:
            found = ", ".join(map(str, self.columns)) or "none"
            raise JeidnnError(f"column {name!r} not found in {self.path} (columns: {found}); set {option}")
        return [row.get(name) for row in self.rows]


def table_kind(path: str | Path, option: str) -> TableKind:
    """``csv`` or ``jsonl`` from the file name's suffix (.csv; .jsonl or .ndjson)."""
    kind = SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise JeidnnError(f"unsupported file {path} for {option}: give a .csv or .jsonl file")
    return kind


def read_table(
    path: str | Path,
    kind: TableKind | None = None,
    *,
    what: str = "file",
    option: str = "the path",
    encoding: str = "utf-8",
    delimiter: str = ",",
) -> Table:
    """Read every record of a CSV (header row first) or JSON-lines (one object per line) file.

    Args:
        path: the file; ``~`` is expanded.
        kind: ``csv`` or ``jsonl``; None picks it from the suffix.
        what: the file's role in error messages, e.g. ``"data file"``.
        option: the setting that named the file, quoted in error messages (``data.path``, ``--input``).
        encoding: the file's encoding. UTF-8 unless the caller knows better; a UTF-8 byte-order mark
            is dropped.
        delimiter: the CSV field separator.

    Raises:
        JeidnnError: the file is missing, unreadable, empty, not valid text in `encoding`, malformed,
            or has no records. Every message is one line naming the file.
    """
    shown = str(path)
    path = Path(path).expanduser()
    kind = kind or table_kind(path, option)
    text = _decode(_read_bytes(path, shown, what, option), path, what, encoding)
    if not text.strip():
        raise JeidnnError(f"{what} {path} is empty; give a file with a header row and records")
    if kind == "csv":
        columns, rows = _parse_csv(text, path, delimiter)
    else:
        columns, rows = _parse_jsonl(text, path)
    if not rows:
        raise JeidnnError(f"{what} {path} has no records (only a header row); add some rows")
    return Table(path, columns, rows)


def _read_bytes(path: Path, shown: str, what: str, option: str) -> bytes:
    if not path.exists():
        raise JeidnnError(f"{what} not found: {shown}; check {option}")
    if path.is_dir():
        raise JeidnnError(f"{what} {shown} is a folder, not a file; check {option}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise JeidnnError(f"cannot read {what} {shown}: {exc.strerror}; check its permissions") from None


def _decode(data: bytes, path: Path, what: str, encoding: str) -> str:
    utf8 = codecs.lookup(encoding).name == "utf-8"
    start = len(codecs.BOM_UTF8) if utf8 and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        source = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "latin1"
        raise JeidnnError(
            f"{what} {path} is not {encoding} text: byte 0x{data[offset]:02x} at offset {offset} "
            f"(line {line}) cannot be decoded; save the file as UTF-8 (e.g. `iconv -f {source} -t utf-8`)"
        ) from None


def _parse_csv(text: str, path: Path, delimiter: str) -> tuple[list[str], list[dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    # strict: a stray quote is an error rather than a field that silently swallows the following lines.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        columns = list(reader.fieldnames or [])
        # Fields beyond the header land under the key None; they belong to no column.
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        # line_num counts the lines of the records read so far: the bad record starts on the next one.
        line = reader.line_num + 1
        raise JeidnnError(f"line {line} of {path} is not valid CSV ({exc}); fix the file") from None
    return columns, rows


def _parse_jsonl(text: str, path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    columns: dict[str, None] = {}  # ordered set
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JeidnnError(
                f"line {number} of {path} is not valid JSON ({exc.msg}); fix the file"
            ) from None
        if not isinstance(row, dict):
            raise JeidnnError(
                f"line {number} of {path} is a JSON {type(row).__name__}, not an object; "
                'each line must be one record such as {"text": "..."}'
            )
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return list(columns), rows


def check_texts(texts: Sequence[Any], where: str) -> list[str]:
    """Refuse non-strings and empty texts; `where` names the position, e.g. ``"row {} of data.csv"``."""
    for i, text in enumerate(texts, start=1):
        if isinstance(text, str) and text.strip():
            continue
        place = where.replace("{}", str(i), 1)
        if not isinstance(text, str):
            raise JeidnnError(f"{place} is a {type(text).__name__} ({text!r}), not a text")
        raise JeidnnError(f"{place} is an empty text ({text!r}); remove it or give some words")
    return list(texts)


def read_texts(
    path: str | Path,
    column: str = "text",
    *,
    skip_empty: bool = False,
    option: str = "--input",
    column_option: str = "--column",
    encoding: str = "utf-8",
) -> list[str]:
    """The texts of `column` in a CSV or JSON-lines file (kind from the suffix), in file order.

    Empty texts are an error unless `skip_empty` (then they are dropped).
    """
    table = read_table(path, what="input file", option=option, encoding=encoding)
    texts = table.column(column, column_option)
    if skip_empty:
        texts = [t for t in texts if not isinstance(t, str) or t.strip()]
        if not texts:
            raise JeidnnError(f"column {column!r} of {table.path} holds only empty texts")
    return check_texts(texts, f"row {{}} of {table.path}")


def pad_token_lists(columns: Mapping[str, Sequence[Sequence[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad per-sample token lists to the batch's longest sample.

    Right padding whatever the tokenizer's ``padding_side``: the exits read the token at position 0
    (CLS) or average the real tokens under ``attention_mask``.

    Args:
        columns: ``input_ids`` (B lists of token ids) and optionally other per-token lists of the
            tokenizer (``attention_mask``, ``token_type_ids``), each B lists of the same lengths.
        pad_token_id: fills ``input_ids``; every other key is filled with 0.

    Returns:
        Every given key and ``attention_mask`` (built from the lengths when not given), each (B, T) int64
        with T the longest sample.
    """
    ids = columns["input_ids"]
    lengths = [len(row) for row in ids]
    longest = max(lengths)
    out = {}
    for key, rows in columns.items():
        fill = pad_token_id if key == "input_ids" else 0
        out[key] = torch.tensor([list(row) + [fill] * (longest - len(row)) for row in rows], dtype=torch.long)
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    return out  # each (B, T)
