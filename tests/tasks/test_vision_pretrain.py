"""VisionPretrain: CLIP-style training of a tiny ViT learns (the contrastive loss falls on a fixed
batch), and the exported file loads into TimmVisionEncoder, as EVA-CLIP's would, with the same
features."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.synthetic import make_synthetic_corpus
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.nn.clip_text import TextTower
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.vision_pretrain import VisionPretrain, caption_word_loss

IMAGE = 16
VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vit_pretrain") / "synthetic"
    return make_synthetic_corpus(root, num_train=64, num_val=16, num_test=8, image_size=IMAGE, shard_size=32)


def _datamodule(corpus) -> ShardDataModule:
    root = Path(corpus.root)
    return ShardDataModule(
        sources=[ShardSource(urls=str(root / "shards/train/*.tar"), name="synthetic")],
        val_sources=[ShardSource(urls=str(root / "shards/val/*.tar"), name="val")],
        batch_size=16, num_workers=0, image_size=IMAGE, shuffle_block=64, seed=0, crop_scale=(1.0, 1.0),
        hflip_swaps_text=True, caption_top_k=5,
    )


def _task(export_path: Path) -> VisionPretrain:
    torch.manual_seed(0)
    vision = TimmVisionEncoder(image_size=IMAGE, num_removed_blocks=0, frozen=False, model_kwargs=VIT)
    text = TextTower(vocab_size=30523, width=32, depth=1, num_heads=2, max_length=32)
    optim = Optimization(lr=3e-3, min_lr=3e-3, warmup_lr=3e-3, warmup_steps=0, weight_decay=0.0)
    return VisionPretrain(vision, text, embed_dim=16, export_path=str(export_path), optim=optim)


def test_pretraining_learns_and_exports_a_timm_file(corpus, tmp_path) -> None:
    torch.set_num_threads(1)
    export = tmp_path / "vit.safetensors"
    task = _task(export)
    dm = _datamodule(corpus)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    before = {k: v.clone() for k, v in task.vision.vit.state_dict().items()}
    with torch.no_grad():
        loss_before = task.compute_loss(batch).item()
    trainer = pl.Trainer(
        max_steps=24, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=1, val_check_interval=24, check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=dm)
    task.eval()
    with torch.no_grad():
        loss_after = task.compute_loss(batch).item()
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)
    assert "val/txt_r1" in trainer.callback_metrics
    assert any(not torch.equal(before[k], v) for k, v in task.vision.vit.state_dict().items())  # the ViT trained

    # the file holds the whole ViT in timm's names; a BLIP-2 encoder (last block cut) loads it
    assert export.is_file()
    encoder = TimmVisionEncoder(image_size=IMAGE, checkpoint_path=str(export), num_removed_blocks=1, model_kwargs=VIT)
    encoder.load_weights()
    images = batch["image"][:4]
    with torch.no_grad():
        vit = task.vision.vit
        tokens, _ = vit._pos_embed(vit.patch_embed(images))  # (B, N, Dv); timm Eva returns (tokens, rope)
        expected = vit.blocks[0](tokens)  # the second-last block's output (2 blocks)
        torch.testing.assert_close(encoder.forward_vit(images), expected, rtol=0, atol=0)
        whole = TimmVisionEncoder(image_size=IMAGE, checkpoint_path=str(export), num_removed_blocks=0, model_kwargs=VIT)
        torch.testing.assert_close(whole.forward_vit(images), task.vision.forward_vit(images), rtol=0, atol=0)


def test_export_path_must_be_safetensors(tmp_path) -> None:
    with pytest.raises(ValueError, match="safetensors"):
        _task(tmp_path / "vit.pth")


def test_caption_word_loss_by_hand() -> None:
    """Uniform target over a caption's distinct non-special pieces; padding and special ids ignored."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5], [1.0, 0.0, 0.0, 0.0, 4.0]])  # (B=2, V=5)
    ids = torch.tensor([[0, 2, 3, 3, 1], [0, 4, 1, 0, 0]])  # 0 = [CLS]-like, 1 = [SEP]-like; row 1 padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    log_p = torch.log_softmax(logits, dim=1)
    expected = (-(log_p[0, 2] + log_p[0, 3]) / 2 - log_p[1, 4]) / 2
    torch.testing.assert_close(caption_word_loss(logits, ids, mask, [0, 1]), expected)


def test_word_objective_is_logged_and_weighted(corpus, tmp_path) -> None:
    torch.manual_seed(0)
    vision = TimmVisionEncoder(image_size=IMAGE, num_removed_blocks=0, frozen=False, model_kwargs=VIT)
    text = TextTower(vocab_size=30523, width=32, depth=1, num_heads=2, max_length=32)
    task = VisionPretrain(vision, text, embed_dim=16, word_loss_weight=0.5)
    dm = _datamodule(corpus)
    dm.setup("fit")
    losses = task.compute_losses(next(iter(dm.train_dataloader())))
    torch.testing.assert_close(losses["loss"], losses["itc"] + 0.5 * losses["words"])
    assert losses["words"].item() > 5.0  # about log(V) for an untrained head over 30523 pieces
    with pytest.raises(ValueError, match="word_loss_weight"):
        VisionPretrain(vision, text, word_loss_weight=-1.0)
