"""Multi-head attention of the Q-Former (BERT post-LN block) on top of PyTorch SDPA.

Glossary: B batch, L query length (the attending sequence), S key length, P cached length,
D width, H heads, Dh = D / H head width, Dk width of the key/value source (vision width for
cross-attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KeyValue = tuple[Tensor, Tensor]
"""Cached keys and values of one self-attention layer, each (B, H, P, Dh)."""


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention followed by BERT's output block: ``LayerNorm(x + Dropout(W_o a))``.

    Keys and values are projected by one fused linear layer (one GEMM instead of two). In
    self-attention the queries are fused in too.

    Args:
        hidden_size: D.
        num_heads: H; must divide D.
        kv_width: Dk, the width of the key/value source; ``None`` means self-attention.
        layer_norm_eps: eps of the output LayerNorm (BERT: 1e-12).
        attention_dropout: dropout on the attention probabilities.
        hidden_dropout: dropout on the output projection.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_width: int | None = None,
        layer_norm_eps: float = 1e-12,
        attention_dropout: float = 0.1,
        hidden_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.is_cross = kv_width is not None
        if self.is_cross:
            self.q_proj = nn.Linear(hidden_size, hidden_size)
            self.kv_proj = nn.Linear(kv_width, 2 * hidden_size)
        else:
            self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attention_dropout = attention_dropout
        self.dropout = nn.Dropout(hidden_dropout)

    def _heads(self, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        """(B, L, parts * D) -> parts x (B, H, L, Dh); fused rows are ordered [q; k; v]."""
        x = x.unflatten(-1, (parts, self.num_heads, self.head_dim))  # (B, L, parts, H, Dh)
        return x.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self,
        hidden: Tensor,
        kv_source: Tensor | None = None,
        mask: Tensor | None = None,
        past: KeyValue | None = None,
    ) -> tuple[Tensor, KeyValue]:
        """Attend and apply the residual output block.

        Args:
            hidden: (B, L, D).
            kv_source: (B, S, Dk) for cross-attention; must be None for self-attention.
            mask: bool (B, L, P + S) or broadcastable, True = attend; None = attend to all.
            past: cached self-attention keys/values (B, H, P, Dh) placed before this step's.

        Returns:
            (B, L, D) output and this layer's keys/values (B, H, P + L, Dh) (the cross keys for
            cross-attention).
        """
        if self.is_cross:
            if kv_source is None:
                raise ValueError("cross-attention needs image features (kv_source)")
            (q,) = self._heads(self.q_proj(hidden), 1)  # (B, H, L, Dh)
            k, v = self._heads(self.kv_proj(kv_source), 2)  # 2 x (B, H, S, Dh)
        else:
            q, k, v = self._heads(self.qkv_proj(hidden), 3)  # 3 x (B, H, L, Dh)
            if past is not None:
                k = torch.cat([past[0], k], dim=2)  # (B, H, P + L, Dh)
                v = torch.cat([past[1], v], dim=2)
        attn_mask = None if mask is None else mask.unsqueeze(1)  # (B, 1, L, S)
        dropout_p = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        context = context.transpose(1, 2).flatten(2)  # (B, L, D)
        out = self.norm(hidden + self.dropout(self.out_proj(context)))
        return out, (k, v)
