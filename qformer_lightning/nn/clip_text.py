"""A small CLIP-style text tower: the partner of an image encoder in contrastive pretraining.

Glossary: B batch, T text tokens, W width, E embedding width.

EVA-CLIP / OpenAI CLIP pretrain the image encoder against a text transformer; BLIP-2 then keeps
only the image side, frozen. This tower serves the same role for the demo's tiny ViT
(:class:`~qformer_lightning.tasks.vision_pretrain.VisionPretrain`): token + position embeddings,
pre-norm transformer blocks over the padded tokens, a final LayerNorm and the mean over the real
(unpadded) tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TextTower(nn.Module):
    """Token ids -> one feature per text.

    Args:
        vocab_size: token vocabulary (the tokenizer's length).
        width: W, model width.
        depth: transformer blocks.
        num_heads: attention heads (divides ``width``).
        max_length: T at most (position embeddings).
        mlp_ratio: MLP width / ``width``.
    """

    def __init__(
        self,
        vocab_size: int = 30523,
        width: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        max_length: int = 32,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(max_length, width))
        layer = nn.TransformerEncoderLayer(
            width, num_heads, int(width * mlp_ratio), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.width = width
        self.max_length = max_length
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids (B, T) int64 and mask (B, T) (1 = token, 0 = padding) -> (B, W) mean of the real tokens."""
        if ids.shape[1] > self.max_length:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_length={self.max_length}")
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, T, W)
        x = self.norm(self.blocks(x, src_key_padding_mask=mask == 0))  # (B, T, W)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, W)
