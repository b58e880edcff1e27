"""An unreadable checkpoint file (empty, cut short, not a torch file) given as ckpt_path or as a
task's `pretrained` gets a message naming the path, what is wrong, and the newest intact
checkpoint in the same directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qformer_lightning.convert import load_pretrained
from qformer_lightning.convert.checkpoint import read_checkpoint
from qformer_lightning.convert.lavis import read_lavis_checkpoint
from qformer_lightning.errors import (
    CheckpointFileError,
    check_checkpoint_file,
    check_checkpoint_task,
    checkpoint_file_problem,
    is_intact_checkpoint,
)
from qformer_lightning.tasks.base import Blip2Task, Optimization

TASK = "qformer_lightning.tasks.stage1.Stage1"


class TinyTask(Blip2Task):
    """A one-parameter task: its checkpoints are real Lightning checkpoints of this project."""

    def __init__(self) -> None:
        super().__init__(optim=Optimization(lr=0.1, warmup_steps=0, total_steps=2))
        self.weight = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return ((self.weight - batch) ** 2).mean()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(8, 4), batch_size=4)


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two checkpoints of a 2-step fit (step 1, step 2)."""
    root = tmp_path_factory.mktemp("ckpt")
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)],
    )
    trainer.fit(TinyTask())
    return [next((root / "ckpt").glob(f"*step={s}.ckpt")) for s in (1, 2)]


def _bad(kind: str, real: Path, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_text("hello, I am not a checkpoint\n")


PROBLEMS = {
    "empty": "is empty (0 bytes)",
    "truncated": "is truncated or corrupt",
    "text": "is not a torch checkpoint: not a zip archive (it starts with b'hello, I'",
}


def _at(path: Path, seconds: int) -> Path:
    os.utime(path, (1_700_000_000 + seconds, 1_700_000_000 + seconds))
    return path


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_bad_file_without_an_intact_sibling(kind: str, real_checkpoints: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "epoch=0-step=3.ckpt"
    _bad(kind, real_checkpoints[1], bad)
    (tmp_path / "notes.txt").write_text("x")  # not a checkpoint suffix: never a candidate
    with pytest.raises(CheckpointFileError) as err:
        check_checkpoint_task(bad, TASK)
    message = str(err.value)
    assert repr(str(bad)) in message and PROBLEMS[kind] in message
    assert f"no intact checkpoint is in {str(tmp_path)!r}" in message


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_bad_file_names_the_newest_intact_sibling(kind: str, real_checkpoints: list[Path], tmp_path: Path) -> None:
    older = _at(Path(shutil.copy(real_checkpoints[0], tmp_path / "epoch=0-step=1.ckpt")), 10)
    newer = _at(Path(shutil.copy(real_checkpoints[1], tmp_path / "epoch=0-step=2.ckpt")), 20)
    broken = tmp_path / "epoch=0-step=3.ckpt"  # newer than the intact ones, but cut short itself
    _bad("truncated", real_checkpoints[1], broken)
    _at(broken, 30)
    bad = tmp_path / "last.ckpt"
    _bad(kind, real_checkpoints[1], bad)
    _at(bad, 40)
    with pytest.raises(CheckpointFileError) as err:
        check_checkpoint_task(bad, TASK)
    message = str(err.value)
    assert repr(str(bad)) in message and PROBLEMS[kind] in message
    assert f"the newest intact checkpoint in the same directory is {str(newer)!r}" in message
    assert str(older) not in message and str(broken) not in message


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_pretrained_sources_get_the_same_message(kind: str, real_checkpoints: list[Path], tmp_path: Path) -> None:
    intact = Path(shutil.copy(real_checkpoints[0], tmp_path / "stage1.ckpt"))
    for name, read in [
        ("stage1-new.ckpt", read_checkpoint),  # Stage1/Stage2/retrieval `pretrained: x.ckpt`
        ("blip2_pretrained.pth", read_lavis_checkpoint),  # a LAVIS file
        ("model.pt", load_pretrained),  # tools/convert_checkpoint.py
    ]:
        bad = tmp_path / name
        _bad(kind, real_checkpoints[1], bad)
        with pytest.raises(CheckpointFileError) as err:
            read(bad)
        message = str(err.value)
        assert repr(str(bad)) in message and PROBLEMS[kind] in message, name
        assert f"is {str(intact)!r}" in message, name
        bad.unlink()


def test_intact_files_pass_and_are_read(real_checkpoints: list[Path], tmp_path: Path) -> None:
    for path in real_checkpoints:
        assert checkpoint_file_problem(path) is None and is_intact_checkpoint(path)
        check_checkpoint_file(path)
        check_checkpoint_task(path, "tests.TinyTask")  # another task would be refused by its name only
    checkpoint = read_checkpoint(real_checkpoints[1])
    assert checkpoint.kind == "qformer_lightning:TinyTask" and checkpoint.state == {}  # no `model.` module in the tiny task
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_file_problem(legacy) is None  # the pre-1.6 format: left to torch.load
    zipped = tmp_path / "archive.ckpt"
    shutil.make_archive(str(tmp_path / "archive"), "zip", root_dir=tmp_path, base_dir="legacy.pth")
    (tmp_path / "archive.zip").rename(zipped)
    assert "a zip archive without data.pkl" in checkpoint_file_problem(zipped)
    assert not is_intact_checkpoint(zipped) and not is_intact_checkpoint(tmp_path / "missing.ckpt")
