"""What every `jeidnn` command shares: user errors end as one line on stderr and exit status 2, without a
traceback or a usage dump.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from jeidnn.errors import JeidnnError


def guarded(fn: Callable[[], int | None]) -> int:
    """Run `fn`, turning JeidnnError into a one-line message and exit status 2."""
    try:
        return int(fn() or 0)
    except JeidnnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ...; see PROG --help` on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see {self.prog} --help\n")
