"""Status messages of the command line: ``[jeidnn] message`` lines on stderr.

Modules log through ``logging.getLogger(__name__)`` (names under ``jeidnn.``); the CLI entry points call
:func:`setup_logging` once. Real output (predictions, ``--print_config``) goes to stdout, never here.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest's capsys swaps it between tests)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it; the property wins
        pass


def setup_logging(quiet: bool = False) -> None:
    """Log INFO and above from ``jeidnn.*`` as ``[jeidnn] message`` on stderr; ``quiet`` keeps WARNING and up.

    Safe to call more than once (one handler). Also quiets the banners of Lightning and known harmless
    library warnings, which would otherwise drown the per-stage messages.
    """
    logger = logging.getLogger("jeidnn")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[jeidnn] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    _quiet_libraries()


def _quiet_libraries() -> None:
    # Lightning's banner lines (GPU/TPU availability, a logging-service tip) and a known torch/Lightning
    # deprecation notice say nothing about the run.
    # Importing pytorch_lightning resets its root logger to INFO, so the level goes on the loggers that
    # print the banners (children keep their own level whenever the package is imported).
    for package in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        for name in (package, f"{package}.utilities.rank_zero", f"{package}.accelerators.cuda"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # transformers' own "Loading weights" / "Writing model shards" bars interleave with the stage lines.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


PAUSE_ENV = "JEIDNN_PAUSE_AT"


def pause_point(name: str) -> None:
    """Test hook: with the environment variable JEIDNN_PAUSE_AT=<name>, log a line and wait here to be killed
    (tests/test_resume.py kills a run at a known point this way)."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    logging.getLogger(__name__).warning("paused at %s (%s); waiting to be killed", name, PAUSE_ENV)
    while True:
        time.sleep(1)
