"""Preemption under DDP (2 CPU processes, gloo): a SIGTERM that reaches only rank 1 stops both
ranks at the same batch boundary, after both took part in writing last.ckpt; exit status 0."""

from __future__ import annotations

from pathlib import Path

import torch

from scale_runs import callback_arg, run
from test_ddp_stage1 import SAME_LENGTH, _args


def test_sigterm_on_one_rank_checkpoints_and_stops_all(tmp_path: Path) -> None:
    out = tmp_path / "two"
    out.mkdir()
    args = [a.replace("--trainer.max_steps=2", "--trainer.max_steps=8") for a in _args(out, 2, SAME_LENGTH)]
    args.append(callback_arg("scale_callbacks.SignalAt", step=2, rank=1))
    status = run(args, out / "log.txt", timeout=150)
    log = (out / "log.txt").read_text()
    assert status == 0, log[-4000:]
    assert "a signal on another rank received: saving" in log  # rank 0 did not get it itself
    checkpoint = torch.load(out / "ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # not 8: both ranks stopped right after the signal
    assert not (out / "params.pt").exists()  # on_train_end never ran: the run ended on the signal
