"""load_into: fill a built stage-1 model from this project's Lightning checkpoints."""

from __future__ import annotations

import pytest
import torch

from qformer_lightning.convert.into import load_into
from qformer_lightning.convert.report import CheckpointError
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer


def _model(image_size: int, seed: int) -> Blip2QFormerModel:
    torch.manual_seed(seed)
    vision = TimmVisionEncoder("eva_giant_patch14_clip_224", image_size=image_size, pretrained=False,
                               model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))
    qformer = QFormer(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, num_query_tokens=4,
                      vision_width=32, max_position_embeddings=32)
    return Blip2QFormerModel(vision, qformer, embed_dim=16)


def _save(model: Blip2QFormerModel, path, extra: dict | None = None) -> None:
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state.update(extra or {})
    torch.save({"state_dict": state, "qformer_lightning": {"task": "Stage1", "dropped_frozen_keys": []}}, path)


def test_checkpoint_round_trip_reports_dropped_keys(tmp_path) -> None:
    source = _model(32, 0)
    _save(source, tmp_path / "s1.ckpt", {"model.projection.weight": torch.zeros(3, 3)})
    target = _model(32, 1)
    report = load_into(target, tmp_path / "s1.ckpt")
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    assert report.unexpected == ["projection.weight"] and not report.missing
    assert "dropped (not used by this model): projection.* (1)" in report.summary()


def test_checkpoint_at_another_resolution_resamples_position_embeddings(tmp_path) -> None:
    source = _model(32, 0)  # 4x4 patches
    _save(source, tmp_path / "s1.ckpt")
    target = _model(48, 1)  # 6x6 patches
    report = load_into(target, tmp_path / "s1.ckpt")
    assert report.resampled == ["vision.vit.pos_embed"]
    pos = target.vision.vit.pos_embed
    assert pos.shape == (1, 37, 32)
    assert torch.equal(pos[:, 0], source.vision.vit.pos_embed[:, 0])  # the class token is kept
    assert torch.equal(target.qformer.query_tokens, source.qformer.query_tokens)


def test_foreign_ckpt_is_a_clear_error(tmp_path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a qformer_lightning checkpoint"):
        load_into(_model(32, 0), tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_into(_model(32, 0), tmp_path / "missing.ckpt")
