"""tools/checkpoint_size.py: the paper-scale figures (meta device, no download) and the estimate
checked against a real checkpoint file of the tiny demo run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scale_runs import stage1_cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import checkpoint_size  # noqa: E402


def test_paper_scale_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    stage1 = checkpoint_size.stage1_size("configs/stage1_vitg.yaml")
    stage2 = checkpoint_size.stage2_size("configs/stage2_flant5xxl.yaml")
    # EVA ViT-g/14 without its last block: 39 blocks of width 1408
    assert 980e6 < stage1.frozen_params < 990e6 and 180e6 < stage1.trainable_params < 192e6
    # the ViT-g and FlanT5-XXL (11.1B) are frozen; the Q-Former (queries only) and projection train
    assert 11.9e9 < stage2.frozen_params < 12.2e9 and 100e6 < stage2.trainable_params < 115e6
    assert stage2.ours < 2e9 < 20e9 < stage2.full
    assert stage1.ours < stage1.full
    # ours = fp32 trainable weights (+ fp32 buffers) + two fp32 AdamW moments
    assert stage2.ours == pytest.approx(12 * stage2.trainable_params, rel=0.01)


def test_estimate_matches_a_saved_file(small_corpus: Path, vit_source: Path, tmp_path: Path) -> None:
    cli = stage1_cli(small_corpus, tmp_path, vit=vit_source, max_steps=1)
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.save_checkpoint(tmp_path / "one.ckpt")
    size = checkpoint_size.measure(cli.model, "demo")
    assert size.kept_weight_bytes < size.all_weight_bytes  # the frozen ViT is left out
    on_disk = (tmp_path / "one.ckpt").stat().st_size
    assert on_disk == pytest.approx(size.ours, rel=0.02)
