"""The first training epoch is data epoch 0, and Lightning's iterability check (an ``iter()`` it
never advances) starts no set of loader workers."""

import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from qformer_lightning.data import stream
from qformer_lightning.data.shard_datamodule import ShardDataModule


def _note_worker_start(log: Path, worker_id: int) -> None:
    """``worker_init_fn``: one line per worker process started."""
    with open(log, "a") as f:
        f.write(f"{worker_id}\n")


def _counting_loader(log: Path) -> type[DataLoader]:
    class CountingDataLoader(DataLoader):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, worker_init_fn=functools.partial(_note_worker_start, log), **kwargs)

    return CountingDataLoader


class Steps(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _datamodule(corpus, num_workers: int) -> ShardDataModule:
    return ShardDataModule(sources=[{"urls": corpus.shards("train"), "name": "synthetic"}], batch_size=8,
                           num_workers=num_workers, seed=0, image_size=16, interleave=3, shuffle_block=10)


def test_iter_alone_starts_nothing(corpus, tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "workers.log"
    monkeypatch.setattr(stream, "DataLoader", _counting_loader(log))
    loader = _datamodule(corpus, 2).train_dataloader()
    iter(loader)  # what Lightning's _check_dataloader_iterable does
    assert loader.state_dict()["epoch"] == -1 and not log.exists()
    next(iter(loader))
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batches"] == 1
    assert sorted(log.read_text().split()) == ["0", "1"]


def test_fresh_fit_trains_on_data_epoch_0_with_one_set_of_workers(corpus, tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "workers.log"
    monkeypatch.setattr(stream, "DataLoader", _counting_loader(log))
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    trainer.fit(Steps(), _datamodule(corpus, 2))
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    ckpt = torch.load(tmp_path / "three.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["batches"]) == (0, 3)
    assert sorted(log.read_text().split()) == ["0", "1"]  # one start per worker, none thrown away
