import math

import pytest
import torch
from torch import nn

from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.tasks.optim import param_groups, uses_weight_decay, vit_layer_id, warmup_cosine


def test_weight_decay_exclusions() -> None:
    assert uses_weight_decay("model.qformer.layers.0.query_ffn.fc1.weight", nn.Parameter(torch.zeros(2, 2)))
    assert not uses_weight_decay("model.qformer.layers.0.query_ffn.fc1.bias", nn.Parameter(torch.zeros(2)))
    assert not uses_weight_decay("model.qformer.embed_norm.weight", nn.Parameter(torch.zeros(2)))
    assert not uses_weight_decay("model.qformer.query_tokens", nn.Parameter(torch.zeros(1, 4, 2)))
    assert not uses_weight_decay("model.temp", nn.Parameter(torch.tensor(0.07)))
    assert not uses_weight_decay("model.vision.vit.pos_embed", nn.Parameter(torch.zeros(1, 5, 2)))


def test_schedule_warmup_then_cosine_to_min() -> None:
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=14, peak_lr=1.0, min_lr=0.1) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    with pytest.raises(ValueError):
        warmup_cosine(0, 1, 0, 1.0, 0.0)


def test_layerwise_lr_decay_on_unfrozen_vit() -> None:
    enc = TimmVisionEncoder(image_size=28, frozen=False, model_kwargs=dict(embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0))
    blocks = len(enc.vit.blocks)  # 3 after removing the last
    assert blocks == 3
    groups = param_groups(enc.named_parameters(prefix="vision"), lr=1.0, weight_decay=0.05, vit_prefix="vision.vit.", vit_num_blocks=blocks, layer_decay=0.5)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(enc.named_parameters(prefix="vision"))
    # block i gets decay^(K - i) with K = 3 blocks: block 2 -> 0.5, block 0 -> 0.125; embeddings -> 0.0625
    assert lr_of[id(named["vision.vit.blocks.2.mlp.fc1.weight"])] == (0.5, 0.05)
    assert lr_of[id(named["vision.vit.blocks.1.attn.qkv.weight"])] == (0.25, 0.05)
    assert lr_of[id(named["vision.vit.blocks.0.norm1.weight"])] == (0.125, 0.0)
    assert lr_of[id(named["vision.vit.patch_embed.proj.weight"])] == (0.0625, 0.05)
    assert lr_of[id(named["vision.vit.pos_embed"])] == (0.0625, 0.0)
    assert lr_of[id(named["vision.ln_vision.weight"])] == (1.0, 0.0)
    assert vit_layer_id("blocks.10.attn.proj.weight", 39) == 11


def test_frozen_parameters_are_not_optimised() -> None:
    enc = TimmVisionEncoder(image_size=28, model_kwargs=dict(embed_dim=16, depth=2, num_heads=2))
    groups = param_groups(enc.named_parameters(), lr=1.0, weight_decay=0.05)
    params = [p for g in groups for p in g["params"]]
    assert {id(p) for p in params} == {id(enc.ln_vision.weight), id(enc.ln_vision.bias)}
    enc.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(enc.named_parameters(), lr=1.0, weight_decay=0.05)
