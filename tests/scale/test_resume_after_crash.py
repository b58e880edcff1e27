"""Exact resume of a real stage-1 CLI run (streaming shards, 2 data-loader workers) after SIGKILL
and after SIGTERM (preemption): every per-step loss logged after the resume equals the
uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from scale_runs import callback_arg, run, stage1_args, start, step_rows, val_rows, wait_for

MAX_STEPS = 12  # 8 batches per epoch: the resumed part crosses into the second epoch
EVERY = 4  # step checkpoints at 4, 8, 12 (+ last.ckpt)
INTERRUPT = 6  # mid-epoch, two steps after the last checkpoint


@pytest.fixture(scope="module")
def reference(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    status = run(stage1_args(small_corpus, out / "run", MAX_STEPS, EVERY), out / "log.txt")
    assert status == 0, (out / "log.txt").read_text()[-4000:]
    rows = step_rows(out / "run")
    assert sorted(rows) == list(range(MAX_STEPS))
    return out / "run"


def _assert_same_after(resumed: Path, reference: Path, first_step: int) -> None:
    expected, got = step_rows(reference), step_rows(resumed)
    steps = [s for s in range(first_step, MAX_STEPS)]
    assert [s for s in sorted(got) if s >= first_step] == steps
    for step in steps:
        assert got[step] == expected[step], f"step {step}: resumed {got[step]} != uninterrupted {expected[step]}"
    # validation inside the resumed part (after the 10th batch) too
    assert val_rows(resumed)[9] == val_rows(reference)[9]


def test_sigkill_mid_epoch_then_resume_is_exact(small_corpus: Path, reference: Path, tmp_path: Path) -> None:
    marker, log = tmp_path / "paused", tmp_path / "killed.txt"
    args = stage1_args(small_corpus, tmp_path / "run", MAX_STEPS, EVERY,
                       [callback_arg("scale_callbacks.PauseAt", step=INTERRUPT, marker=str(marker))])
    proc = start(args, log)
    wait_for(marker, proc, log)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data-loader workers
    assert proc.wait() == -signal.SIGKILL
    last = torch.load(tmp_path / "run/ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == EVERY  # the crash lost steps 5-6: they are redone

    status = run(stage1_args(small_corpus, tmp_path / "run", MAX_STEPS, EVERY, ["--ckpt_path=last"]), tmp_path / "resumed.txt")
    assert status == 0, (tmp_path / "resumed.txt").read_text()[-4000:]
    _assert_same_after(tmp_path / "run", reference, EVERY)


def test_sigterm_saves_stops_requeues_and_resumes_exactly(small_corpus: Path, reference: Path, tmp_path: Path) -> None:
    """SIGTERM to the whole process group (as SLURM sends it, data-loader workers included):
    last.ckpt at the next batch boundary, exit status 0, ``scontrol requeue`` called."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (fake_bin / "scontrol").chmod(0o755)
    args = stage1_args(small_corpus, tmp_path / "run", MAX_STEPS, EVERY,
                       [callback_arg("scale_callbacks.SignalAt", step=INTERRUPT), "--preemption.requeue=true"])
    log = tmp_path / "terminated.txt"
    status = run(args, log, SLURM_JOB_ID="4242", SCONTROL_LOG=str(tmp_path / "scontrol.txt"),
                 PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    assert status == 0, log.read_text()[-4000:]
    assert "SIGTERM received: saving" in log.read_text()
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    last = torch.load(tmp_path / "run/ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == INTERRUPT
    assert sorted(step_rows(tmp_path / "run")) == list(range(INTERRUPT))  # it stopped right there

    status = run(stage1_args(small_corpus, tmp_path / "run", MAX_STEPS, EVERY, ["--ckpt_path=last"]), tmp_path / "resumed.txt")
    assert status == 0, (tmp_path / "resumed.txt").read_text()[-4000:]
    _assert_same_after(tmp_path / "run", reference, INTERRUPT)
