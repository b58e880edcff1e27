"""Atomic checkpoint writes: a save that fails or is killed half-way leaves the previous
checkpoint intact and loadable; the CLI uses the atomic writer by default."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qformer_lightning.scale.checkpointing import AtomicCheckpointIO, atomic_torch_save, stale_temporaries

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((256, 256), value)}, "global_step": int(value)}


def _half_write_then(exc: BaseException):
    """A ``torch.save`` stand-in that writes the first half of the real bytes, then raises ``exc``."""
    real = torch.save

    def save(obj, f) -> None:
        buffer = io.BytesIO()
        real(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        raise exc

    return save


def test_failed_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint(_checkpoint(1.0), path)
    assert io_plugin.load_checkpoint(path)["global_step"] == 1

    monkeypatch.setattr(torch, "save", _half_write_then(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        io_plugin.save_checkpoint(_checkpoint(2.0), path)
    monkeypatch.undo()

    loaded = io_plugin.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.full((256, 256), 1.0))
    assert stale_temporaries(path) == []  # the partial temporary file was removed
    # the simulated crash does destroy a file written in place: the check above can fail
    monkeypatch.setattr(torch, "save", _half_write_then(OSError(28, "No space left on device")))
    with open(tmp_path / "in_place.ckpt", "wb") as f, pytest.raises(OSError):
        torch.save(_checkpoint(2.0), f)
    monkeypatch.undo()
    with pytest.raises(Exception):
        torch.load(tmp_path / "in_place.ckpt", weights_only=False)

    io_plugin.save_checkpoint(_checkpoint(3.0), path)
    assert io_plugin.load_checkpoint(path)["global_step"] == 3


def test_killed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while the new bytes are half written: the old file is intact, the next save cleans up."""
    path, marker = tmp_path / "last.ckpt", tmp_path / "writing"
    atomic_torch_save(_checkpoint(1.0), path)
    script = textwrap.dedent(f"""
        import io, time, torch
        from pathlib import Path
        from qformer_lightning.scale.checkpointing import atomic_torch_save
        real = torch.save
        def save(obj, f):
            buffer = io.BytesIO(); real(obj, buffer); data = buffer.getvalue()
            f.write(data[: len(data) // 2]); f.flush()
            Path({str(marker)!r}).write_text("half")
            while True:
                time.sleep(0.05)
        torch.save = save
        atomic_torch_save({{"state_dict": {{"w": torch.zeros(256, 256)}}, "global_step": 2}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the saving process ended early"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    stale = stale_temporaries(path)
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the half-written new checkpoint
    assert torch.load(path, weights_only=False)["global_step"] == 1
    atomic_torch_save(_checkpoint(3.0), path)
    assert torch.load(path, weights_only=False)["global_step"] == 3
    assert stale_temporaries(path) == []


def test_storage_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), tmp_path / "x.ckpt", storage_options={"a": 1})


@pytest.mark.parametrize("strategy", [None, "configs/strategy/ddp.yaml"])
def test_cli_uses_atomic_writes_and_preemption_by_default(strategy: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from qformer_lightning.cli import Blip2CLI
    from qformer_lightning.scale.signals import PreemptionCheckpoint

    monkeypatch.chdir(ROOT)
    args = ["--config", "configs/demo/stage1.yaml", *(["--config", strategy] if strategy else []), "--trainer.devices=1"]
    cli = Blip2CLI(args=args, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    preemption = [c for c in cli.trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
    assert len(preemption) == 1 and preemption[0].signals == [signal.SIGTERM] and not preemption[0].requeue
    assert "model:" in cli.model.run_config and "Stage1" in cli.model.run_config


def test_preemption_rejects_unknown_signal() -> None:
    from qformer_lightning.scale.signals import PreemptionCheckpoint

    with pytest.raises(ValueError, match="SIGTERMM"):
        PreemptionCheckpoint(signals=["SIGTERMM"])
