"""Crash-safe checkpoint files: write to a temporary file beside the target, fsync, then rename.

A checkpoint path only ever names a complete file: a crash, a SIGKILL or a full disk during a
save leaves the previous file at that path untouched (``last.ckpt`` stays loadable), because the
new bytes go to ``.{name}.tmp-{pid}`` in the same directory and replace the target with one
``os.replace`` (atomic on POSIX file systems) only after they are flushed to disk. Temporary
files left by a killed save are removed by the next save to the same path.

Remote paths (``s3://``, ``gs://``, ...) go through Lightning's own writer: object stores publish
an object only once its upload completes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_INFIX = ".tmp-"
"""Temporary files are named ``.{target name}{TMP_INFIX}{pid}``."""


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files left next to ``path`` by saves that never finished."""
    return sorted(path.parent.glob(f".{path.name}{TMP_INFIX}*"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Raises:
        whatever ``torch.save`` or the file system raises; ``path`` then still holds its previous
        content (or does not exist), and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        if stale.name != f".{path.name}{TMP_INFIX}{os.getpid()}":
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted checkpoint save", stale)
    tmp = path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose local saves are atomic and durable (see module docstring).

    The CLI installs it by default (``Blip2CLI``); in Python pass ``Trainer(plugins=[AtomicCheckpointIO()])``.
    Loading and removal are :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` 's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Raises:
            TypeError: ``storage_options`` given (not supported, as in ``TorchCheckpointIO``).
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)
