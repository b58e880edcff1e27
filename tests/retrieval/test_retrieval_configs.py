"""Every retrieval YAML is parsed and instantiated by the CLI (heavy parts overridden tiny; no weights read)."""

from __future__ import annotations

import json
from pathlib import Path

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.data.caption_datamodule import CaptionDataModule
from qformer_lightning.tasks.retrieval import Retrieval

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = "--model.init_args.model.init_args.vision.init_args."
QF = "--model.init_args.model.init_args.qformer.init_args."
TINY = [
    f"{V}image_size=28",
    f"{V}model_kwargs=" + json.dumps(dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14)),
    f"{QF}num_layers=1", f"{QF}hidden_size=16", f"{QF}num_heads=2", f"{QF}intermediate_size=32", f"{QF}vision_width=16",
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
]


def instantiate(name: str, extra: list[str] = ()) -> Blip2CLI:
    return Blip2CLI(args=["--config", str(CONFIGS / name), *extra], run=False)


def test_coco_retrieval_config_has_the_papers_settings() -> None:
    cli = instantiate("coco_retrieval.yaml", [*TINY, "--trainer.strategy=auto"])
    task, data = cli.model, cli.datamodule
    assert isinstance(task, Retrieval) and isinstance(data, CaptionDataModule)
    assert task.frozen == [] and task.model.vision.frozen is False  # the ViT is finetuned
    assert task.model.vision.vit.grad_checkpointing is True
    assert task.pretrained == "Salesforce/blip2-itm-vit-g" and task.k == 128
    opt = task.optim
    assert (opt.lr, opt.min_lr, opt.warmup_steps, opt.weight_decay, tuple(opt.betas), opt.layer_decay) == (
        1e-5, 0.0, 1000, 0.05, (0.9, 0.999), 0.95)
    assert opt.total_steps == 5 * (566_747 // 224)
    assert cli.trainer.max_epochs == 5 and data.batch_size * 16 == 224
    assert data.image_size == 364 and data.eval_mode == "images"
    assert data.splits["train"].splits == ["train", "restval"] and data.splits["test"].splits == ["test"]
    assert task.label_smoothing == 0.1 and task.text.max_length == 32


def test_coco_retrieval_paper_model_shapes_without_building_them() -> None:
    import yaml

    config = yaml.safe_load((CONFIGS / "coco_retrieval.yaml").read_text())
    model = config["model"]["init_args"]["model"]["init_args"]
    vision, qformer = model["vision"]["init_args"], model["qformer"]["init_args"]
    assert (vision["model_name"], vision["image_size"], vision["num_removed_blocks"]) == ("eva_giant_patch14_clip_224", 364, 1)
    assert (qformer["num_layers"], qformer["hidden_size"], qformer["num_query_tokens"], qformer["vision_width"]) == (12, 768, 32, 1408)
    assert config["trainer"]["precision"] == "bf16-mixed" and config["trainer"]["devices"] == 16


def test_flickr_zero_shot_config_is_test_only_from_the_coco_model() -> None:
    cli = instantiate("flickr_retrieval.yaml", TINY)
    task, data = cli.model, cli.datamodule
    assert isinstance(task, Retrieval) and task.pretrained == "Salesforce/blip2-itm-vit-g-coco" and task.k == 128
    assert data.splits["train"] is None and data.splits["val"] is None
    assert data.splits["test"].splits == ["test"] and "flickr30k" in data.splits["test"].annotations
    assert data.image_size == 364


def test_demo_retrieval_config_instantiates() -> None:
    cli = instantiate("demo/retrieval.yaml", ["--trainer.logger=false"])
    task, data = cli.model, cli.datamodule
    assert isinstance(task, Retrieval) and task.pretrained is None and task.frozen == []
    assert task.model.vision.width == task.model.qformer.vision_width == 64
    assert data.splits["test"].annotations == "data/synthetic/karpathy/dataset_synthetic.json"
    # the quickstart starts it from the stage-1 demo checkpoint
    cli = instantiate("demo/retrieval.yaml", ["--trainer.logger=false", "--model.init_args.pretrained=runs/demo/stage1/checkpoints/last.ckpt"])
    assert cli.model.pretrained == "runs/demo/stage1/checkpoints/last.ckpt"
