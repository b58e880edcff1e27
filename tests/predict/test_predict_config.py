"""configs/predict/jsonl.yaml composes after the demo model configs (stage 1 and stage 2): the data
module and the JSONL writer replace the training data; the image size comes from the encoder."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
from predict_tiny import read_jsonl, write_images

from qformer_lightning.callbacks import JsonlPredictionWriter
from qformer_lightning.cli import Blip2CLI
from qformer_lightning.data.predict import PredictDataModule

ROOT = Path(__file__).resolve().parents[2]
FRAGMENT = "configs/predict/jsonl.yaml"


def _cli(args: list[str], run: bool) -> Blip2CLI:
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return Blip2CLI(args=args, run=run)


@pytest.mark.parametrize("model_config", ["configs/demo/stage1.yaml", "configs/demo/stage2.yaml"])
def test_fragment_composes_with_the_demo_configs(model_config: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    write_images(tmp_path / "photos", 1)
    cli = _cli(["--config", model_config, "--config", FRAGMENT, "--data.images", str(tmp_path / "photos"),
                "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.datamodule, PredictDataModule)
    assert cli.datamodule.image_size is None and cli.datamodule.batch_size == 8
    writers = [c for c in cli.trainer.callbacks if isinstance(c, JsonlPredictionWriter)]
    assert len(writers) == 1 and writers[0].output == Path("predictions.jsonl")
    size, _, _ = cli.datamodule.resolve_image_settings(cli.model.vision_encoder())
    assert size == 64  # the demo encoder's


def test_stage1_demo_scores_user_images(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    write_images(tmp_path / "photos", 2)
    out = tmp_path / "scores.jsonl"
    _cli(["predict", "--config", "configs/demo/stage1.yaml", "--config", FRAGMENT, "--data.images", str(tmp_path / "photos"),
          "--data.texts", '["a red circle", "a blue square"]', "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path),
          "--model.init_args.model.init_args.vision.init_args.checkpoint_path=null",  # a random ViT (no demo run here)
          "--trainer.callbacks.init_args.output", str(out)], run=True)
    lines = read_jsonl(out)
    assert [(Path(line["image"]).name, line["text"]) for line in lines] == [
        ("img0.png", "a red circle"), ("img0.png", "a blue square"), ("img1.png", "a red circle"), ("img1.png", "a blue square"),
    ]
    assert all(set(line) == {"index", "image", "task", "text", "itc", "itm"} for line in lines)
