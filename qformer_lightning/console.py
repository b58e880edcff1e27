"""What a person sees while a pipeline runs: progress bars and one line per step on the console,
everything else (library logs, warnings, loader reports) in a log file.

:func:`details_to_file` is used by the quickstart; ``--verbose`` there keeps the old behaviour
(everything on the console).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.loggers import Logger

DETAIL_LOGGERS: tuple[str, ...] = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "transformers",
    "timm",
    "py.warnings",
    "qformer_lightning",
)
"""Loggers whose records go to the file. Lightning and transformers attach their own console
handlers to some of these, so the root logger alone is not enough."""

CONSOLE_LOGGERS: tuple[str, ...] = ("qformer_lightning.callbacks.grounding",)
"""Loggers whose warnings also reach the console: a collapse warning is for the person watching."""


@contextlib.contextmanager
def details_to_file(path: Path, append: bool = False) -> Iterator[Path]:
    """Send every log record and Python warning to ``path`` (overwritten, or appended to) for the duration.

    The console keeps what is printed to stdout/stderr directly (progress bars, the caller's own
    lines) and the warnings of :data:`CONSOLE_LOGGERS`. Output printed by libraries that bypass
    logging is not captured here; see :func:`subprocess_stderr_to_log` for child processes.

    Yields:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    names = ("", *DETAIL_LOGGERS, *CONSOLE_LOGGERS)
    saved = {name: _snapshot(logging.getLogger(name)) for name in names}
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    for name in DETAIL_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True  # to the root's file handler
        logger.setLevel(logging.INFO)
    for name in CONSOLE_LOGGERS:
        logging.getLogger(name).addHandler(console)
    logging.captureWarnings(True)
    progress = _transformers_progress(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per place, into the file
            yield path
    finally:
        _transformers_progress(progress)
        logging.captureWarnings(False)
        for name, state in saved.items():
            _restore(logging.getLogger(name), state)
        handler.close()


@contextlib.contextmanager
def subprocess_stderr_to_log(logger: logging.Logger, level: int = logging.INFO) -> Iterator[None]:
    """Capture what child processes write to this process's stderr (file descriptor 2: e.g. the
    Java PTB tokenizer's "PTBTokenizer tokenized ..." lines) and log it as one record."""
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace").strip()
            if text:
                logger.log(level, "%s", text)


def remove_unused_log_dirs(loggers: list[Logger], global_step: int) -> list[Path]:
    """After a failed run: delete the log directories of ``loggers`` when the run never finished a
    training step (they hold no curve, only an empty event file or nothing). Returns what was removed."""
    removed = []
    if global_step > 0:
        return removed
    for logger in loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir is not None and Path(log_dir).is_dir():
            shutil.rmtree(log_dir)
            removed.append(Path(log_dir))
    return removed


def _snapshot(logger: logging.Logger) -> tuple[list[logging.Handler], bool, int]:
    return logger.handlers[:], logger.propagate, logger.level


def _restore(logger: logging.Logger, state: tuple[list[logging.Handler], bool, int]) -> None:
    logger.handlers, logger.propagate, logger.level = state[0], state[1], state[2]


def _transformers_progress(enabled: bool) -> bool:
    """Turn transformers' own progress bars (e.g. GGUF de-quantization) on/off; returns the old state."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return enabled
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return before
