"""Exact mid-epoch resume through a real Lightning Trainer, with 2 data-loader workers."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qformer_lightning.data.shard_datamodule import ShardDataModule


class KeyRecorder(pl.LightningModule):
    """Records, per training step, the batch's keys and an image checksum."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[str], float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, list(batch["key"]), round(float(batch["image"].double().sum()), 3)))
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Crash(Exception):
    pass


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash


def _datamodule(corpus) -> ShardDataModule:
    return ShardDataModule(
        sources=[{"urls": corpus.shards("train"), "name": "synthetic"}],
        batch_size=8, num_workers=2, seed=3, image_size=16, interleave=3, shuffle_block=10,
    )


def _trainer(root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, max_epochs=2, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        num_sanity_val_steps=0,
    )


@pytest.mark.parametrize("checkpoint_step", [5, 15])  # 15 batches per epoch: mid-epoch and at its end
def test_resume_sees_the_uninterrupted_sequence(corpus, tmp_path: Path, checkpoint_step: int) -> None:
    reference = KeyRecorder()
    _trainer(tmp_path / "ref", []).fit(reference, _datamodule(corpus))
    assert len(reference.seen) == 2 * 15  # 120 samples / 8
    epoch0 = [k for e, keys, _ in reference.seen if e == 0 for k in keys]
    epoch1 = [k for e, keys, _ in reference.seen if e == 1 for k in keys]
    assert len(set(epoch0)) == 120 and set(epoch0) == set(epoch1) and epoch0 != epoch1

    interrupted = KeyRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=checkpoint_step, save_top_k=-1)
    with pytest.raises(Crash):
        _trainer(tmp_path / "run", [ckpt, CrashAt(checkpoint_step + 3)]).fit(interrupted, _datamodule(corpus))
    assert interrupted.seen == reference.seen[: checkpoint_step + 3]
    path = next((tmp_path / "ckpt").glob(f"*step={checkpoint_step}.ckpt"))

    resumed = KeyRecorder()
    _trainer(tmp_path / "run", []).fit(resumed, _datamodule(corpus), ckpt_path=path)
    assert resumed.seen == reference.seen[checkpoint_step:]
