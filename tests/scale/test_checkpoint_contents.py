"""Small, complete checkpoints: trainable weights, optimizer, scheduler, loops, data-loader state and
the resolved config, without the frozen ViT (reloaded from its source); restoring into a fresh task
gives identical state; a checkpoint of another stage is refused, naming both tasks."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from scale_runs import stage1_cli as _cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(small_corpus: Path, vit_source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, set]:
    """Two training steps, then ``trainer.save_checkpoint``; also the names of the trainable parameters."""
    out = tmp_path_factory.mktemp("trained")
    cli = _cli(small_corpus, out, vit_source)
    cli.trainer.fit(cli.model, cli.datamodule)
    path = out / "two_steps.ckpt"
    cli.trainer.save_checkpoint(path)
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    return path, torch.load(path, map_location="cpu", weights_only=False), trainable


def test_checkpoint_holds_everything_but_the_frozen_vit(trained: tuple[Path, dict, set], vit_source: Path) -> None:
    path, ckpt, trainable = trained
    meta = ckpt["qformer_lightning"]
    # the ViT as built (last block removed, no final norm), every tensor of it
    vit_keys = {f"model.vision.vit.{k}" for k in torch.load(vit_source, weights_only=True)
                if not k.startswith(("blocks.2.", "norm."))}
    assert set(meta["dropped_frozen_keys"]) == vit_keys and not any(k.startswith("model.vision.vit.") for k in ckpt["state_dict"])
    assert meta["task"] == "Stage1" and meta["task_class"] == "qformer_lightning.tasks.stage1.Stage1"
    assert trainable <= set(ckpt["state_dict"]) and "model.temp" in trainable and len(trainable) > 50
    assert ckpt["global_step"] == 2 and len(ckpt["optimizer_states"]) == 1 and len(ckpt["lr_schedulers"]) == 1
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["batches"] == 2 and loader["batch_size"] == 8
    config = yaml.safe_load(meta["config"])
    assert config["model"]["class_path"] == "qformer_lightning.tasks.stage1.Stage1"
    assert config["trainer"]["max_steps"] == 2 and config["data"]["init_args"]["batch_size"] == 8
    assert config["preemption"]["signals"] is None or config["preemption"]["signals"] == ["SIGTERM"]
    assert meta["num_skipped_steps"] == 0


def test_restore_into_a_fresh_task_is_identical(trained: tuple[Path, dict, set], small_corpus: Path, vit_source: Path,
                                                 tmp_path: Path) -> None:
    path, ckpt, _ = trained
    # another init (restoring must overwrite it); a changed seed_everything is a changed data layout
    cli = _cli(small_corpus, tmp_path, vit_source, seed=123, extra=["--data.init_args.on_layout_change=fresh_epoch"])
    model = cli.model
    differs = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(p, ckpt["state_dict"][k])]
    assert differs, "the fresh task already equals the checkpoint: the test would prove nothing"
    cli.trainer.fit(model, cli.datamodule, ckpt_path=path)  # max_steps reached: restore only
    assert cli.trainer.global_step == 2
    state = model.state_dict()
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(state[name], value), name
    vit = torch.load(vit_source, weights_only=True)
    for name, value in model.model.vision.vit.state_dict().items():
        assert torch.equal(value, vit[name]), f"frozen {name} not reloaded from its source"
    assert all(not p.requires_grad for p in model.model.vision.vit.parameters())
    _assert_same_tree(cli.trainer.optimizers[0].state_dict(), ckpt["optimizer_states"][0])
    assert cli.trainer.lr_scheduler_configs[0].scheduler.state_dict()["last_epoch"] == 2
    assert cli.trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == ckpt["lr_schedulers"][0]["_last_lr"]


def _assert_same_tree(a, b, where: str = "optimizer") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_checkpoint_of_another_stage_is_refused(small_corpus: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "stage2"))
    try:
        from stage2_tiny import tiny_model
    finally:
        sys.path.remove(str(ROOT / "tests" / "stage2"))
    from qformer_lightning.tasks.stage2 import Stage2

    stage2 = Stage2(tiny_model("opt"))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(stage2)
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")

    cli = _cli(small_corpus, tmp_path, None)
    with pytest.raises(ValueError) as error:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=tmp_path / "stage2.ckpt")
    message = str(error.value)
    assert "qformer_lightning.tasks.stage2.Stage2" in message and "qformer_lightning.tasks.stage1.Stage1" in message
    assert "pretrained" in message
