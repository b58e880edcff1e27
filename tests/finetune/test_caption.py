"""Captioning task: evaluation writes a COCO results JSON scored as pycocoevalcap scores it,
deterministic generation with the paper's settings, the ViT trains only when unfrozen (with
gradient checkpointing and layer-wise lr decay), resolution change when loading a checkpoint."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from finetune_tiny import IMAGE_SIZE, tiny_model

from qformer_lightning.convert.report import resample_grid_pos_embed
from qformer_lightning.data import CaptionDataModule
from qformer_lightning.data.caption_datamodule import CaptionSplit
from qformer_lightning.metrics.caption import score_captions
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.caption import Caption, references_from_dataset
from qformer_lightning.tasks.stage2 import Stage2

FAST_METRICS = ["bleu", "rouge", "cider"]  # METEOR (~12 s of Java) is the same pycocoevalcap path


def _datamodule(corpus, **kwargs) -> CaptionDataModule:
    split = lambda name: CaptionSplit(str(corpus.karpathy_json), str(corpus.image_root), [name])  # noqa: E731
    return CaptionDataModule(
        train=split("train"), test=split("test"), batch_size=4, eval_batch_size=4, num_workers=0,
        image_size=IMAGE_SIZE, **kwargs,
    )


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )


def test_paper_defaults() -> None:
    task = Caption(tiny_model("opt"))
    assert task.prompt == "a photo of"
    assert task.generation == dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0, repetition_penalty=1.0)
    assert task.frozen == ["model.llm"] and not task.model.vision.frozen
    assert (task.optim.lr, task.optim.layer_decay, task.optim.min_lr) == (1e-5, 0.95, 0.0)


def test_fit_then_test_writes_and_scores_coco_results(corpus, tmp_path, caplog) -> None:
    task = Caption(
        tiny_model("opt"), num_beams=2, max_new_tokens=6, min_new_tokens=2, metrics=FAST_METRICS,
        results_dir=str(tmp_path / "results"), optim=Optimization(lr=1e-4, warmup_steps=0, total_steps=2),
    )
    data = _datamodule(corpus)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(task, datamodule=data)
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.metrics.caption"):
        logged = trainer.test(task, datamodule=data, verbose=False)[0]
    assert "Skipping SPICE" in caplog.text  # no CoreNLP jars offline: skipped with a message

    path = tmp_path / "results" / "captions_test_step2.json"
    results = json.loads(path.read_text())
    dataset = data.eval_dataset("test")
    assert sorted(r["image_id"] for r in results) == sorted(dataset.image_ids)  # one caption per test image
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) and r["caption"] for r in results)

    # the same file scored by pycocoevalcap directly against the annotation's references
    annotation = references_from_dataset(dataset, "test")
    assert len(annotation["annotations"]) == 5 * len(dataset)
    direct = score_captions(path, annotation, use_spice=False)
    assert set(logged) == {f"test/{name}" for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")}
    for name, value in logged.items():
        assert value == pytest.approx(direct[name.split("/")[1]], abs=1e-6), name
    assert task.last_scores["test"] == pytest.approx({k.split("/")[1]: v for k, v in logged.items()})


def test_generation_is_deterministic_and_uses_the_prompt(monkeypatch) -> None:
    task = Caption(tiny_model("t5"), num_beams=3, max_new_tokens=5, min_new_tokens=2).eval()
    task.configure_model()
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    first = task.generate_captions(images)
    assert task.generate_captions(images) == first and len(first) == 3
    seen = {}
    original = task.model.llm.generation_inputs

    def spy(soft, prompts=None):
        seen["prompts"] = prompts
        return original(soft, prompts)

    monkeypatch.setattr(task.model.llm, "generation_inputs", spy)
    ids = task.model.generate(images, ["a photo of"] * 3, num_beams=3, max_new_tokens=5, min_new_tokens=2)
    assert seen["prompts"] == ["a photo of"] * 3
    assert all((row != task.model.llm.pad_token_id).sum() >= 2 for row in ids)  # min_new_tokens honoured


def test_repetition_penalty_reaches_generation() -> None:
    """Greedy captions of a random tiny OPT repeat tokens; a large repetition penalty rules that out."""
    images = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    captions = {}
    for penalty in (1.0, 1000.0):
        task = Caption(tiny_model("opt"), num_beams=1, max_new_tokens=12, min_new_tokens=12, repetition_penalty=penalty).eval()
        task.configure_model()
        ids = task.model.generate(images, ["a photo of"] * 4, **task.generation)
        captions[penalty] = [row[row != task.model.llm.pad_token_id].tolist() for row in ids]
    assert any(len(set(row)) < len(row) for row in captions[1.0])  # repeats without the penalty
    assert all(len(set(row)) == len(row) for row in captions[1000.0])
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        Caption(tiny_model("opt"), repetition_penalty=0.0)


def _one_step(task: Caption) -> dict[str, torch.Tensor]:
    task.configure_model()
    task.train()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    optimizer = task.configure_optimizers()["optimizer"]
    batch = {"image": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), "text": ["a dog on grass", "red boat on water"]}
    task.compute_loss(batch).backward()
    optimizer.step()
    return {n: (p.detach() - before[n]).abs().max() for n, p in task.named_parameters()}


def test_finetune_step_updates_vit_only_when_unfrozen() -> None:
    optim = Optimization(lr=1e-3, warmup_steps=0, total_steps=10, layer_decay=0.95)
    unfrozen = Caption(tiny_model("opt", grad_checkpointing=True), optim=optim)
    assert unfrozen.model.vision.vit.grad_checkpointing
    change = _one_step(unfrozen)
    vit = [n for n in change if n.startswith("model.vision.vit.")]
    assert vit and all(change[n] > 0 for n in vit if "blocks" in n and n.endswith("weight"))
    assert all(change[n] == 0 for n in change if n.startswith("model.llm."))
    # layer-wise decay: 2 kept blocks, block i gets lr * 0.95^(2 - i), embeddings 0.95^3
    groups = unfrozen.configure_optimizers()["optimizer"].param_groups
    scales = {round(g["lr_scale"], 6) for g in groups}
    assert scales == {round(0.95**3, 6), round(0.95**2, 6), round(0.95, 6), 1.0}

    frozen = Caption(tiny_model("opt"), optim=optim, frozen=["model.vision.vit", "model.llm"])
    change = _one_step(frozen)
    assert all(change[n] == 0 for n in change if n.startswith(("model.vision.vit.", "model.llm.")))
    assert change["model.qformer.query_tokens"] > 0 and change["model.projection.weight"] > 0


def test_pretrained_checkpoint_at_another_resolution_is_resampled(tmp_path) -> None:
    source = Stage2(tiny_model("opt", seed=3))
    source.configure_model()
    state = {"model." + k: v for k, v in source.model.state_dict().items()}
    torch.save({"state_dict": state, "qformer_lightning": {"task": "Stage2", "dropped_frozen_keys": []}}, tmp_path / "s2.ckpt")

    from qformer_lightning.encoders.vision import TimmVisionEncoder

    model = tiny_model("opt", seed=4)
    model.vision = TimmVisionEncoder(image_size=48, model_kwargs=dict(patch_size=16, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0))
    task = Caption(model, pretrained=str(tmp_path / "s2.ckpt"))
    task.configure_model()
    expected = resample_grid_pos_embed(source.model.vision.vit.pos_embed.detach(), 1 + 9)  # 2x2 grid -> 3x3
    torch.testing.assert_close(task.model.vision.vit.pos_embed.detach(), expected)
    torch.testing.assert_close(task.model.qformer.query_tokens, source.model.qformer.query_tokens)
    torch.testing.assert_close(task.model.projection.weight, source.model.projection.weight)


def test_missing_references_are_reported() -> None:
    class NoCaptions:
        image_ids = [1, 2]
        references = [["a cat"], []]

    with pytest.raises(ValueError, match="have no reference captions"):
        references_from_dataset(NoCaptions(), "test")
    with pytest.raises(ValueError, match="per split"):
        Caption(tiny_model("opt"), references={"train": "x.json"})


def test_predict_on_user_images_captions_each_request() -> None:
    """`predict` with PredictDataModule batches (no image ids): the task's caption settings and prompt."""
    task = Caption(tiny_model("t5"), num_beams=2, max_new_tokens=5, min_new_tokens=2).eval()
    task.configure_model()
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    batch = {"image": images, "request": [{"image": "a.jpg", "task": "caption"}, {"image": "b.jpg", "task": "caption", "id": 7}]}
    records = task.predict_step(batch, 0)
    assert [(r["image"], r["llm_prompt"]) for r in records] == [("a.jpg", "a photo of"), ("b.jpg", "a photo of")]
    assert records[1]["id"] == 7
    assert [r["output"] for r in records] == task.generate_captions(images)
