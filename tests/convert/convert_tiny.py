"""Tiny random transformers Blip2 models and inputs for the conversion tests (CPU, fp32)."""

from __future__ import annotations

import torch
from transformers import Blip2Config

VOCAB = 50


def blip2_config(
    num_query_tokens: int = 4,
    cross_attention_frequency: int = 2,
    image_size: int = 28,
    vision_width: int = 24,
    qformer_width: int = 32,
    text_input: bool = True,
    vision_eps: float = 1e-5,
    text_config: dict | None = None,
) -> Blip2Config:
    """A tiny Blip2Config; the vision initializer_range is large so that features are far from zero."""
    return Blip2Config(
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=2 * vision_width + 8, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=14, initializer_range=0.3, layer_norm_eps=vision_eps,
        ),
        qformer_config=dict(
            vocab_size=VOCAB, hidden_size=qformer_width, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=2 * qformer_width, max_position_embeddings=16,
            cross_attention_frequency=cross_attention_frequency, use_qformer_text_input=text_input,
        ),
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=None,
    )


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add N(0, scale) noise to every parameter (zero biases, unit norms and the zero query tokens
    of a fresh HF model would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(image_size: int = 28, batch: int = 2, length: int = 6, seed: int = 1):
    """pixel_values (B, 3, S, S), input_ids (B, T) starting with a CLS-like id, attention_mask with padding."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    return pixels, ids, mask
