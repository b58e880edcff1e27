"""``precision: bf16-mixed`` with ``frozen_dtype: bf16`` (the paper configs' setting) on CPU.

The frozen ViT and LLM hold bf16 weights, everything trainable stays fp32 (weights, gradients,
AdamW moments, the checkpoint), the losses equal the fp32 ones to bf16 accuracy, and stage 2
learns under Lightning's bf16-mixed plugin (CPU autocast) as it does in fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_stage1 import IMAGE, one_batch, tiny_stage1
from torch.utils.data import DataLoader

from qformer_lightning.data.synthetic import make_synthetic_corpus
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.stage2 import Stage2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stage2"))
from stage2_tiny import tiny_model  # noqa: E402
from test_stage2_task import LossLog, PairSet  # noqa: E402


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    corpus = make_synthetic_corpus(
        tmp_path_factory.mktemp("bf16") / "synthetic", num_train=16, num_val=8, num_test=8, image_size=IMAGE, shard_size=16
    )
    return one_batch(corpus, batch_size=8)


def _dtypes(task: pl.LightningModule) -> tuple[set[torch.dtype], set[torch.dtype]]:
    frozen = {p.dtype for p in task.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in task.parameters() if p.requires_grad}
    return frozen, trainable


def test_stage1_bf16_losses_match_fp32(batch: dict) -> None:
    reference = tiny_stage1()
    reference.configure_model()
    reference.train()
    torch.manual_seed(0)  # ITM negatives are sampled
    expected = reference.compute_losses(batch)

    task = tiny_stage1()
    task.frozen_dtype = "bf16"
    task.configure_model()
    task.train()
    assert _dtypes(task) == ({torch.bfloat16}, {torch.float32})
    assert task.model.vision.ln_vision.weight.dtype == torch.float32  # trainable, after the bf16 ViT
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task.compute_losses(batch)
    for name, value in losses.items():
        assert value.dtype == torch.float32, name  # losses reduced in fp32
        assert value.item() == pytest.approx(expected[name].item(), rel=2e-2), name
    losses["loss"].backward()
    grads = [p.grad for p in task.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in task.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_learns_under_bf16_mixed(kind: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    task = Stage2(
        tiny_model(kind),
        prefix_lm=kind == "t5",
        frozen_dtype="bf16",
        optim=Optimization(lr=3e-3, min_lr=1e-3, warmup_lr=1e-3, warmup_steps=0, total_steps=40),
    )
    log = LossLog()
    trainer = pl.Trainer(
        max_steps=40, accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[log], default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(task, DataLoader(PairSet(), batch_size=4, shuffle=False))
    assert len(log.losses) == 40 and all(torch.isfinite(torch.tensor(log.losses)))
    first, last = sum(log.losses[:4]) / 4, sum(log.losses[-4:]) / 4
    assert last < first - 1.0, (kind, log.losses)  # the fp32 test's bar (tests/stage2/test_stage2_task.py)

    assert _dtypes(task) == ({torch.bfloat16}, {torch.float32})
    assert {p.dtype for p in task.model.llm.parameters()} == {torch.bfloat16}
    optimizer = trainer.optimizers[0]
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    assert trainable <= set(state)
    assert all(state[name].dtype == torch.float32 for name in trainable)
