"""Stage-2 task: starting from a stage-1 checkpoint (report of loaded/dropped/left), checkpoint
trimming, training with Lightning (the loss falls, OPT and T5 prefix LM), seeded prefix splits."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from stage2_tiny import tiny_model, tiny_vision_qformer
from torch.utils.data import DataLoader, Dataset

from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.models.blip2_llm import Blip2LLMModel
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.convert import load_into
from qformer_lightning.tasks.stage2 import Stage2, lm_loss, split_seed

CAPTIONS = ["a dog sits on the grass", "red boat on water", "man rides bike", "two cat near tree"]


class PairSet(Dataset):
    """Four fixed (image, caption) pairs, repeated."""

    def __init__(self, size: int = 28, length: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(4, 3, size, size, generator=g)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i % 4], "text": CAPTIONS[i % 4], "image_id": i % 4}


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _stage1_checkpoint(path, seed: int = 7) -> Blip2QFormerModel:
    vision, qformer = tiny_vision_qformer(seed, text_ffn=True)
    stage1 = Blip2QFormerModel(vision, qformer, embed_dim=8, vocab_size=60)
    state = {"model." + k: v for k, v in stage1.state_dict().items()}
    torch.save({"state_dict": state, "qformer_lightning": {"task": "Stage1", "dropped_frozen_keys": []}}, path)
    return stage1


def test_load_stage1_checkpoint_reports_loaded_dropped_left(tmp_path) -> None:
    stage1 = _stage1_checkpoint(tmp_path / "s1.ckpt")
    model = tiny_model("opt", seed=1)
    report = load_into(model, str(tmp_path / "s1.ckpt"))
    for name, tensor in model.state_dict().items():
        if name.startswith(("vision.", "qformer.")):
            assert torch.equal(tensor, stage1.state_dict()[name]), name
    assert set(report.loaded) == {n for n in model.state_dict() if n.startswith(("vision.", "qformer."))}
    dropped = set(report.unexpected)
    for key in ("qformer.word_embeddings.weight", "qformer.position_embeddings.weight", "qformer.layers.0.text_ffn.fc1.weight",
                "vision_proj.weight", "text_proj.weight", "itm_head.linear.weight", "lm_head.dense.weight", "temp"):
        assert key in dropped, key
    assert not any(k.startswith("vision.") or ".query_ffn." in k for k in dropped)
    assert all(k.startswith(("projection.", "llm.")) for k in report.missing)
    assert "projection.weight" in report.missing
    assert "dropped (not used by this model)" in report.summary()


def test_task_loads_pretrained_in_configure_model(tmp_path) -> None:
    stage1 = _stage1_checkpoint(tmp_path / "s1.ckpt")
    task = Stage2(tiny_model("opt", seed=1), pretrained=str(tmp_path / "s1.ckpt"))
    task.configure_model()
    torch.testing.assert_close(task.model.qformer.query_tokens, stage1.qformer.query_tokens)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.qformer.", "model.projection.", "model.vision.ln_vision.")) for n in trainable)
    assert any(n.startswith("model.projection.") for n in trainable)


def test_load_hf_directory(tmp_path) -> None:
    from test_stage2_parity import _hf_model

    hf, tok = _hf_model("opt")
    hf.save_pretrained(tmp_path / "hf")
    from qformer_lightning.convert.hf import build_parts_from_hf_config
    from qformer_lightning.encoders.llm import LanguageModel

    parts = build_parts_from_hf_config(hf.config)
    torch.manual_seed(3)
    other = type(hf.language_model)(hf.language_model.config).eval()  # same shapes, other weights
    model = Blip2LLMModel(parts.vision, parts.qformer, LanguageModel.from_modules(other, tok))
    report = load_into(model, str(tmp_path / "hf"))
    torch.testing.assert_close(model.projection.weight, hf.language_projection.weight)
    torch.testing.assert_close(model.qformer.query_tokens, hf.query_tokens)
    w = "llm.model.model.decoder.layers.0.fc1.weight"
    torch.testing.assert_close(model.state_dict()[w], hf.state_dict()["language_model.model.decoder.layers.0.fc1.weight"])
    assert w in report.loaded and not report.missing


def test_checkpoint_drops_frozen_weights_with_a_source() -> None:
    task = Stage2(tiny_model("opt"))
    task.configure_model()
    assert task._dropped_keys() == []  # random LLM and ViT: nothing to reload them from, so they are stored
    task.model.vision.has_weight_source = True
    task.model.llm.name_or_path, task.model.llm.random_init = "facebook/opt-125m", False
    dropped = set(task._dropped_keys())
    assert any(k.startswith("model.llm.model.") for k in dropped) and any(k.startswith("model.vision.vit.") for k in dropped)
    assert not any(k.startswith(("model.qformer.", "model.projection.", "model.vision.ln_vision.")) for k in dropped)


def test_prefix_lm_needs_encoder_decoder_and_no_prompt() -> None:
    with pytest.raises(ValueError, match="prompt"):
        Stage2(tiny_model("t5"), prefix_lm=True, prompt="a photo of")
    task = Stage2(tiny_model("opt"), prefix_lm=True)
    with pytest.raises(ValueError, match="encoder-decoder"):
        task.configure_model()


def test_split_seed_differs_per_step_and_rank() -> None:
    seeds = {split_seed(0, 0, step, b, rank) for step in range(5) for b in range(3) for rank in range(2)}
    assert len(seeds) == 30 and split_seed(0, 0, 1, 2, 1) == split_seed(0, 0, 1, 2, 1)
    assert split_seed(1, 0, 1, 2, 1) != split_seed(0, 0, 1, 2, 1)


def test_lm_loss_shift_hand_example() -> None:
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0  # position 0 predicts label at position 1
    labels = torch.tensor([[-100, 2, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, :1], torch.tensor([2]))
    torch.testing.assert_close(lm_loss(logits, labels, shift=True), expected)
    with pytest.raises(ValueError, match="no target"):
        lm_loss(logits, torch.full((1, 3), -100), shift=False)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_training_loss_falls(kind: str, tmp_path) -> None:
    pl.seed_everything(0)
    task = Stage2(
        tiny_model(kind),
        prefix_lm=kind == "t5",
        optim=Optimization(lr=3e-3, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=0, total_steps=40),
    )
    log = LossLog()
    trainer = pl.Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[log], default_root_dir=tmp_path, enable_checkpointing=False,
    )
    llm_before = {k: v.clone() for k, v in task.model.llm.state_dict().items()}
    trainer.fit(task, DataLoader(PairSet(), batch_size=4, shuffle=False))
    first, last = sum(log.losses[:4]) / 4, sum(log.losses[-4:]) / 4
    assert len(log.losses) == 40
    assert last < first - 1.0, (kind, log.losses)  # nats per token
    for k, v in task.model.llm.state_dict().items():
        assert torch.equal(v, llm_before[k]), f"frozen LLM weight {k} changed"
    captions = task.model.caption(PairSet().images[:2], num_beams=2, max_new_tokens=8)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
