"""Crash-safe checkpoint files: write to a temporary file beside the target, fsync, then rename.

A checkpoint path only ever names a complete file: a crash, a SIGKILL or a full disk during a
save leaves the previous file at that path untouched (``last.ckpt`` stays loadable), because the
new bytes go to ``.{name}.tmp-{pid}`` in the same directory and replace the target with one
``os.replace`` (atomic on POSIX file systems) only after they are flushed to disk. Temporary
files left by a killed save are removed by the next save to the same path.

Remote paths (``s3://``, ``gs://``, ...) go through Lightning's own writer: object stores publish
an object only once its upload completes.

Sharded checkpoints (FSDP, FSDP2) are directories that the strategy writes itself, never through a
``CheckpointIO``: :func:`swap_in` and :func:`recover_interrupted_swap` give them the same guarantee
(used by :mod:`qformer_lightning.scale.strategies`).
"""

from __future__ import annotations

import logging
import os
import shutil
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
            _remove(stale)  # a directory too, left by a sharded save to the same name
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


# ---------------------------------------------------------------------------- checkpoint directories
# FSDP's sharded checkpoints are directories (one file per rank + metadata) written by the strategy,
# not by a CheckpointIO. They are made atomic the same way: written whole beside the target, then
# swapped in by renames (see qformer_lightning.scale.strategies).

OLD_INFIX = ".old-"
"""While a directory is swapped in, the previous one is parked at ``.{target name}{OLD_INFIX}{token}``."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def parked_previous(path: Path) -> list[Path]:
    """Previous checkpoints parked next to ``path`` by swaps that never finished."""
    return sorted(path.parent.glob(f".{path.name}{OLD_INFIX}*"))


def directory_temporary(path: Path, token: str) -> Path:
    """Where a new checkpoint directory for ``path`` is written before the swap."""
    return path.with_name(f".{path.name}{TMP_INFIX}{token}")


def recover_interrupted_swap(path: Path) -> None:
    """Put back the previous checkpoint if a swap died between its two renames (``path`` missing,
    the previous one parked); then remove temporaries and parked copies left by interrupted saves."""
    parked = parked_previous(path)
    if not path.exists() and parked:
        os.replace(parked[-1], path)
        log.warning("restored %s from %s, left by a checkpoint save interrupted mid-swap", path, parked[-1].name)
        parked = parked[:-1]
    for stale in [*parked, *stale_temporaries(path)]:
        _remove(stale)
        log.info("removed %s, left by an interrupted checkpoint save", stale)


def swap_in(tmp: Path, path: Path, token: str) -> None:
    """Replace ``path`` (a file, a directory or nothing) by the complete directory ``tmp``.

    The previous checkpoint is renamed aside, ``tmp`` renamed to ``path``, then the previous one
    removed: at every instant either ``path`` or its parked copy is a complete checkpoint
    (:func:`recover_interrupted_swap` puts the parked copy back after a crash between the renames).
    """
    old = path.with_name(f".{path.name}{OLD_INFIX}{token}")
    meta = [f for f in tmp.iterdir() if f.is_file()]
    for f in meta:  # other ranks' shard files are flushed by torch.distributed.checkpoint itself
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    had_previous = path.exists() or path.is_symlink()
    if had_previous:
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if had_previous:
        _remove(old)
