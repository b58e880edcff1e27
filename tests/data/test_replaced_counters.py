"""The bad-sample counters a task logs are the true running counts, in TensorBoard and in checkpoints,
also across a resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_bad_input import BAD, bad_shard  # noqa: F401 (bad_shard: fixture)

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.tasks.base import Blip2Task, Optimization

STEPS = 27  # 4.5 epochs of the 24-sample bad shard (6 batches of 4): the last epoch is cut mid-way


class CountingTask(Blip2Task):
    """A one-parameter task that logs the data skips and records, per step, the true running counts."""

    def __init__(self) -> None:
        super().__init__(optim=Optimization(lr=0.1, warmup_steps=0, total_steps=STEPS))
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.truth: list[Counter[str]] = []  # per training step of this run: counts up to and with it
        self._seen: Counter[str] = Counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._seen.update(batch["replaced"])
        self.truth.append(Counter(self._seen))
        self.log_data_skips(batch)
        return (self.weight - batch["image"].mean()) ** 2


def _datamodule(shard: Path) -> ShardDataModule:
    return ShardDataModule(
        sources=[ShardSource(str(shard))], batch_size=4, num_workers=0, image_size=16,
        max_image_pixels=200 * 200, interleave=2, shuffle_block=8, seed=5,
    )


def _fit(root: Path, shard: Path, task: CountingTask, ckpt_path: Path | None = None, every: int | None = None) -> None:
    callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every or STEPS, save_top_k=-1)]
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=STEPS, accelerator="cpu", devices=1, log_every_n_steps=1,
        logger=TensorBoardLogger(root, name="tb", version=0), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(task, _datamodule(shard), ckpt_path=ckpt_path)


def _scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per ``data/replaced_*`` tag, over every event file of the run, sorted by step."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted((root / "tb" / "version_0").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("data/replaced_"):
                out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(values.items()) for tag, values in out.items()}


def _check_log(scalars: dict[str, list[tuple[int, float]]], truth: list[Counter[str]]) -> None:
    """Each per-reason scalar, step by step, is the running count from its first replacement on."""
    reasons = set(truth[-1])
    assert reasons == {reason for _, reason in BAD.values()}
    assert set(scalars) == {f"data/replaced_{r}" for r in reasons} | {"data/replaced_total"}
    for reason in reasons:
        running = [float(t[reason]) for t in truth if t[reason] > 0]
        assert [v for _, v in scalars[f"data/replaced_{reason}"]] == running, reason
    assert [v for _, v in scalars["data/replaced_total"]] == [float(sum(t.values())) for t in truth]


def test_logged_counts_are_running_totals_equal_to_the_checkpoint(bad_shard: Path, tmp_path: Path) -> None:
    task = CountingTask()
    _fit(tmp_path, bad_shard, task)
    assert len(task.truth) == STEPS
    truth = task.truth[-1]
    assert sum(truth.values()) > 4 * len(BAD)  # four whole epochs and part of the fifth
    _check_log(_scalars(tmp_path), task.truth)
    meta = torch.load(next((tmp_path / "ckpt").glob(f"*step={STEPS}.ckpt")), weights_only=False)["qformer_lightning"]
    assert meta["replaced"] == dict(truth)
    assert meta["replaced_total"] == sum(truth.values())


def test_counts_continue_after_a_resume(bad_shard: Path, tmp_path: Path) -> None:
    reference = CountingTask()
    _fit(tmp_path / "ref", bad_shard, reference, every=10)
    resumed = CountingTask()
    _fit(tmp_path / "resumed", bad_shard, resumed, ckpt_path=next((tmp_path / "ref" / "ckpt").glob("*step=10.ckpt")))
    assert len(resumed.truth) == STEPS - 10
    scalars = _scalars(tmp_path / "resumed")  # this run logs steps 11..27 only
    for reason in reference.truth[-1]:
        expected = [float(t[reason]) for t in reference.truth[10:]]
        assert [v for _, v in scalars[f"data/replaced_{reason}"]] == expected, reason
    meta = torch.load(next((tmp_path / "resumed" / "ckpt").glob(f"*step={STEPS}.ckpt")), weights_only=False)
    assert meta["qformer_lightning"]["replaced"] == dict(reference.truth[-1])
