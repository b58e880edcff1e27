"""Preemption: on SIGTERM save a checkpoint at the next batch boundary, then exit cleanly.

Schedulers (SLURM at preemption or time limit, Kubernetes, spot instances) send SIGTERM and kill
the job some seconds later. :class:`PreemptionCheckpoint` turns the signal into a flag; at the end
of the current training batch every rank agrees on it (one all-reduce), the checkpoint is written
from the same place as ``ModelCheckpoint``'s step checkpoints (``on_train_batch_end``) under
the name ``last.ckpt``, so that ``--ckpt_path last`` resumes exactly there, and Lightning then ends
the run at that batch's end (``SIGTERMException``, exit status 0). Optionally the SLURM job is
requeued (``scontrol requeue``).

Why not Lightning's own SIGTERM handling: it saves nothing outside SLURM's SIGUSR1 requeue (whose
handler writes an ``hpc_ckpt`` from inside the signal handler, at an arbitrary point of a step),
and it aborts a running validation. Here a validation in progress finishes and the checkpoint
is taken at the following batch boundary. Forked data-loader workers inherit the handler, so a
SIGTERM sent to the whole process group (as SLURM does) does not kill them either.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for array jobs, else ``SLURM_JOB_ID``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """Run ``scontrol requeue`` for this job; False (with a warning) outside SLURM or on failure."""
    job = slurm_job_id()
    if job is None:
        rank_zero_warn("requeue requested, but SLURM_JOB_ID is not set: not a SLURM job, nothing requeued")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        rank_zero_warn(f"cannot requeue SLURM job {job}: `scontrol` is not on PATH")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
        return False
    rank_zero_info(f"requeued SLURM job {job}")
    return True


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` and stop at the next training-batch boundary after a termination signal.

    Args:
        signals: signal names to handle (``SIGTERM``; add ``SIGUSR1`` for SLURM's
            ``--signal=USR1@120``); an empty list disables the callback.
        dirpath: checkpoint directory; default: the first ``ModelCheckpoint``'s, else
            ``{default_root_dir}/checkpoints``.
        filename: checkpoint name without ``.ckpt``; ``last`` makes ``--ckpt_path last`` find it.
        requeue: after saving, requeue the SLURM job (rank 0 runs ``scontrol requeue``).
    """

    def __init__(
        self,
        signals: list[str] | None = None,
        dirpath: str | None = None,
        filename: str = "last",
        requeue: bool = False,
    ) -> None:
        names = ["SIGTERM"] if signals is None else list(signals)
        unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
        if unknown:
            raise ValueError(f"unknown signal name(s) {unknown}; use names such as 'SIGTERM' or 'SIGUSR1'")
        if not filename or "/" in filename:
            raise ValueError(f"filename must be a plain file name without '.ckpt', got {filename!r}")
        self.signals = [getattr(signal, n) for n in names]
        self.dirpath = dirpath
        self.filename = filename
        self.requeue = requeue
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ the handler
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, signal handlers not installed")
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers (trainer._run) and before the data-loader
        # workers of the first epoch are forked (they inherit this handler)
        self.received, self.saved_path = None, None
        self._install()

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Where the preemption checkpoint goes (module docstring)."""
        dirpath = self.dirpath
        if dirpath is None:
            callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
            dirpath = callbacks[0].dirpath if callbacks else str(Path(trainer.default_root_dir) / "checkpoints")
        return str(Path(dirpath) / f"{self.filename}.ckpt")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.signals or self.saved_path is not None:
            return
        # every rank takes part: a signal seen by any rank stops all of them at this same batch
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.checkpoint_path(trainer)
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"{name} received: saving {path} at global step {trainer.global_step} and stopping")
        trainer.save_checkpoint(path)
        self.saved_path = path
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()
        # Lightning raises SIGTERMException (exit status 0) at the end of this batch, on every rank
        trainer._signal_connector.received_sigterm = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
