"""Stage 1 on 2 CPU processes (DDP, gloo) equals one process with the same global batch.

Both runs see the same global batches (``scale_callbacks.GlobalBatchData``: rank r takes the r-th
half of each global batch of 8) and draw the hardest ITM negative instead of a sampled one, so
the step is a deterministic function of the global batch. Then the DDP-averaged gradients of the
first step equal the single-process gradients (all-gather-with-grad convention, ITC over the
global batch, ITM negatives mined globally), and so do the parameters after two steps and the
ITC retrieval validation metrics.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from parity_checks import (
    assert_same_gradients,
    assert_same_retrieval_validation,
    assert_same_start,
    assert_same_training,
    demo_lrs,
    relative,
)
from scale_runs import callback_arg, run

SAME_LENGTH = ["a red circle", "a blue square", "a green triangle"]  # 5 tokens each with [CLS] / [SEP]
WIDTH = 64  # the demo Q-Former's hidden size


def _args(out: Path, devices: int, captions: list[str]) -> list[str]:
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "scale_callbacks.GlobalBatchData", "init_args": {
        "global_batch": 8, "num_train": 32, "num_val": 16, "image_size": 32, "captions": captions}}}))
    return [
        "fit", "--config", "configs/demo/stage1.yaml", "--config", str(data),
        "--model.init_args.model.init_args.vision.init_args.image_size=32",
        "--model.init_args.model.init_args.vision.init_args.checkpoint_path=null",  # a random frozen ViT
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", f"--trainer.default_root_dir={out}",
        "--trainer.logger=false", f"--trainer.callbacks.dirpath={out}/ckpt", "--trainer.enable_progress_bar=false",
        "--trainer.use_distributed_sampler=false", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        *(["--trainer.strategy=ddp"] if devices > 1 else []),
        callback_arg("scale_callbacks.HardestNegatives"), callback_arg("scale_callbacks.StepRecord", path=str(out), state=True),
    ]


def _fit(out: Path, devices: int, captions: list[str]) -> Path:
    out.mkdir()
    status = run(_args(out, devices, captions), out / "log.txt", timeout=150)
    assert status == 0, (out / "log.txt").read_text()[-4000:]
    return out


def test_two_processes_match_one(tmp_path: Path) -> None:
    one = _fit(tmp_path / "one", 1, SAME_LENGTH)
    two = _fit(tmp_path / "two", 2, SAME_LENGTH)

    assert_same_start(one, two)
    assert_same_gradients(one, two)  # a wrong DDP scaling would be off by O(1)
    assert_same_training(torch.load(one / "start_params.pt"), torch.load(one / "params.pt"),
                         torch.load(two / "params.pt"), demo_lrs(2, 30), WIDTH)
    assert_same_retrieval_validation(one, two, step=2)


def test_two_processes_with_different_caption_lengths_per_rank(tmp_path: Path) -> None:
    """Ranks whose captions tokenise to different lengths pad to a common length before gathering.

    The ITC and ITM heads then get the single-process gradients. ITG differs by design: its loss
    is a mean over each rank's own tokens (as in LAVIS), so ranks with different token counts
    weight tokens differently from one process; those gradients are only compared loosely.
    """
    captions = ["two small blue squares on the left side of the image", *SAME_LENGTH, "a red square", *SAME_LENGTH]
    one = _fit(tmp_path / "one", 1, captions)
    two = _fit(tmp_path / "two", 2, captions)  # rank 0's batches hold the long caption, rank 1's never
    grads_one, grads_two = torch.load(one / "grads.pt"), torch.load(two / "grads.pt")
    heads = ["model.vision_proj.weight", "model.text_proj.weight", "model.itm_head.linear.weight", "model.temp"]
    for name in heads:  # ITC-only and ITM-only parameters
        assert relative(grads_one[name], grads_two[name]) < 1e-4, name
    flat_one = torch.cat([g.flatten() for g in grads_one.values()])
    flat_two = torch.cat([grads_two[k].flatten() for k in grads_one])
    assert relative(flat_one, flat_two) < 0.2  # same direction; ITG token weighting differs
