"""configs/demo/vit_pretrain.yaml instantiates: the whole ViT trains, the export path is the file
the other demo configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.tasks.vision_pretrain import VisionPretrain

ROOT = Path(__file__).resolve().parents[2]


def test_demo_config_instantiates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cli = Blip2CLI(args=["--config", "configs/demo/vit_pretrain.yaml"], run=False)
    assert isinstance(cli.model, VisionPretrain) and not cli.model.vision.frozen
    assert all(p.requires_grad for p in cli.model.parameters())
    assert cli.model.export_path == "runs/demo/vit_pretrain/vit.safetensors"
    for name in ("stage1", "stage2", "retrieval", "caption", "vqa"):  # every later demo step loads that file
        text = (ROOT / "configs" / "demo" / f"{name}.yaml").read_text()
        assert f"checkpoint_path: {cli.model.export_path}" in text, name
