"""Non-finite losses in a real stage-1 fit: ``stop`` raises naming the step and the sample keys,
with the weights untouched by that step; ``skip`` skips the optimizer step and trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from qformer_lightning.tasks.base import NonFiniteLossError
from scale_runs import stage1_cli

NAN_BATCH = 2  # the third training batch of the epoch gets a NaN loss (first time it is seen)


class Snapshots(pl.Callback):
    """The trainable parameters and the batch keys at the start of every training batch."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.keys: list[list[str]] = []
        self.global_steps: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})
        self.keys.append(list(batch["key"]))
        self.global_steps.append(trainer.global_step)


def _poison(task, batch_idx: int) -> list[int]:
    """Make ``compute_losses`` return a NaN total loss (still attached to the graph) on ``batch_idx``."""
    original, hits = task.compute_losses, []

    def compute_losses(batch: dict) -> dict:
        losses = original(batch)
        if task.trainer.training and task._batch_idx == batch_idx and not hits:
            hits.append(task.global_step)
            losses["loss"] = losses["loss"] * torch.tensor(float("nan"))
        return losses

    task.compute_losses = compute_losses
    return hits


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_stop_names_step_and_keys_and_leaves_weights(small_corpus: Path, tmp_path: Path) -> None:
    cli = stage1_cli(small_corpus, tmp_path, max_steps=5, extra=["--model.init_args.nonfinite=stop"])
    snapshots = Snapshots()
    cli.trainer.callbacks.append(snapshots)
    hits = _poison(cli.model, NAN_BATCH)
    with pytest.raises(NonFiniteLossError) as error:
        cli.trainer.fit(cli.model, cli.datamodule)
    assert hits == [NAN_BATCH]
    message = str(error.value)
    assert f"global step {NAN_BATCH}" in message
    assert all(key in message for key in snapshots.keys[NAN_BATCH]) and len(snapshots.keys[NAN_BATCH]) == 8
    after = {n: p.detach() for n, p in cli.model.named_parameters() if p.requires_grad}
    assert _changed(snapshots.params[NAN_BATCH - 1], snapshots.params[NAN_BATCH])  # earlier steps did train
    assert not _changed(snapshots.params[NAN_BATCH], after), "the NaN step changed weights"
    assert all(torch.isfinite(p).all() for p in after.values())


def test_skip_skips_the_update_and_trains_on(small_corpus: Path, tmp_path: Path) -> None:
    """The skipped batch still counts as a step for Lightning (``global_step`` counts
    ``optimizer.step`` calls, and the lr schedule follows it), but AdamW gets no gradient: the
    weights and AdamW's moments and step counts are untouched."""
    cli = stage1_cli(small_corpus, tmp_path, max_steps=5, extra=["--model.init_args.nonfinite=skip"])
    snapshots = Snapshots()
    cli.trainer.callbacks.append(snapshots)
    hits = _poison(cli.model, NAN_BATCH)
    cli.trainer.fit(cli.model, cli.datamodule)

    assert hits == [NAN_BATCH]
    assert snapshots.global_steps == [0, 1, 2, 3, 4] and cli.trainer.global_step == 5
    changed = [bool(_changed(snapshots.params[i], snapshots.params[i + 1])) for i in range(4)]
    assert changed == [True, True, False, True], "only the NaN batch must leave the weights unchanged"
    assert cli.model.num_skipped_steps == 1
    assert float(cli.trainer.callback_metrics["train/skipped_steps"]) == 1.0
    optimizer = cli.trainer.optimizers[0]
    assert {float(s["step"]) for s in optimizer.state.values()} == {4.0}  # 4 real AdamW updates of 5 batches
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
