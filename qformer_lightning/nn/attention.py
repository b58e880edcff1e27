"""Multi-head attention of the Q-Former (BERT post-LN block) on top of PyTorch SDPA.

Cross-attention from few queries to many image tokens is computed in the "absorbed" order
(queries moved into the image-feature space, :meth:`MultiHeadAttention.cross_attend`) when that
needs fewer operations than projecting every image token to keys and values; the results are
the same up to float rounding.

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


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """Inverted-dropout multiplier shaped like ``like``: ``1 / (1 - p)`` with probability ``1 - p``,
    else 0 (the distribution of ``nn.Dropout``). Drawn by thresholding uniform float32 numbers, which
    PyTorch's CPU generator produces about twice as fast as Bernoulli samples.

    Args:
        like: any tensor; the mask gets its shape, device and dtype.
        p: drop probability in [0, 1).
    """
    keep = torch.rand(like.shape, device=like.device).ge_(p)  # 1.0 kept, 0.0 dropped
    return keep.mul_(1.0 / (1.0 - p)).to(like.dtype)


def dropped(x: Tensor, p: float) -> Tensor:
    """Training-mode dropout of ``x`` (any shape) with drop probability ``p``."""
    return x * 0.0 if p >= 1.0 else x * dropout_mask(x, p)


def add_dropped(residual: Tensor, update: Tensor, dropout: nn.Dropout) -> Tensor:
    """``residual + dropout(update)`` in one fused pass; any shape (broadcastable)."""
    if not dropout.training or dropout.p == 0.0:
        return residual + update
    if dropout.p >= 1.0:
        return residual + dropped(update, dropout.p)
    return torch.addcmul(residual, update, dropout_mask(update, dropout.p))


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
        """(B, L, parts * D) -> parts x (B, H, L, Dh); fused rows are ordered [q; k; v].

        Views only: a split on the last dim, whose backward is one concatenation (an unbind of a
        permuted view would stack and then copy again).
        """
        width = self.num_heads * self.head_dim
        return tuple(
            chunk.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, L, Dh)
            for chunk in x.split(width, dim=-1)
        )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) v with dropout on the probabilities. (B, H, L, Dh), (B, H, S, Dh) x 2,
        bool (B, L, S) or None -> (B, L, D).

        Without a mask and with dropout active on CPU, PyTorch's SDPA falls back to its math path,
        which adds a NaN-safe softmax and scales q and k separately; the plain composition below
        does the same arithmetic in fewer passes. Otherwise SDPA (fused kernels where it has them)
        runs, so masked rows keep SDPA's semantics.
        """
        dropout_p = self.attention_dropout if self.training else 0.0
        if mask is None and dropout_p > 0.0 and q.device.type == "cpu":
            scores = torch.matmul(q * self.head_dim**-0.5, k.transpose(-1, -2))  # (B, H, L, S)
            probs = scores.softmax(dim=-1)
            context = torch.matmul(dropped(probs, dropout_p), v)  # (B, H, L, Dh)
        else:
            attn_mask = None if mask is None else mask.unsqueeze(1)  # (B, 1, L, S)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return context.transpose(1, 2).flatten(2)  # (B, L, D)

    def _absorbed_is_cheaper(self, length: int, source_length: int, source_width: int) -> bool:
        """Whether :meth:`_cross_context_absorbed` needs fewer multiply-adds per sample than
        projecting the keys/values: ``L Dk D + H L S Dk`` against ``S Dk 2D + 2 L S D``."""
        width = self.num_heads * self.head_dim
        absorbed = 2 * length * width * source_width + 2 * self.num_heads * length * source_length * source_width
        projected = 2 * source_length * source_width * width + 2 * length * source_length * width
        return absorbed < projected

    def _cross_context_absorbed(self, q: Tensor, source: Tensor) -> Tensor:
        """Cross-attention context without projecting the S source tokens to keys and values.

        Per head h, with ``W_k``, ``W_v`` (Dh, Dk) and ``b_v`` (Dh) the head's rows of ``kv_proj``:
        ``q K^T = (q W_k) X^T + q b_k`` and ``P V = (P X) W_v^T + rowsum(P) b_v``. The ``q b_k``
        term is the same for every key of a row, so the softmax drops it exactly; ``rowsum(P)``
        is 1 unless dropout removed probabilities. When H L < D (BLIP-2: 12 x 32 < 768) this needs
        far fewer operations than the S x Dk x 2D key/value projection, and the source gets no
        (B, S, 2D) copy.

        Args:
            q: (B, L, D) projected queries.
            source: (B, S, Dk) key/value source.

        Returns:
            (B, L, D) attention context (before the output projection).
        """
        batch, length, _ = q.shape
        heads, head_dim, width = self.num_heads, self.head_dim, source.shape[-1]
        w_k, w_v = self.kv_proj.weight.view(2, heads, head_dim, width).unbind(0)  # 2 x (H, Dh, Dk)
        b_v = self.kv_proj.bias[heads * head_dim :].view(heads, 1, head_dim)  # (H, 1, Dh)
        q = (q * head_dim**-0.5).view(batch, length, heads, head_dim)  # (B, L, H, Dh)
        q = q.permute(2, 0, 1, 3).reshape(heads, batch * length, head_dim)  # (H, B L, Dh)
        q_k = torch.bmm(q, w_k)  # (H, B L, Dk): each query row moved into the source space
        q_k = q_k.view(heads, batch, length, width).transpose(0, 1)  # (B, H, L, Dk), a view
        q_k = q_k.reshape(batch, heads * length, width)  # (B, H L, Dk): one copy
        probs = torch.bmm(q_k, source.transpose(1, 2)).softmax(dim=-1)  # (B, H L, S)
        dropout_p = self.attention_dropout if self.training else 0.0
        if dropout_p > 0.0:
            probs = dropped(probs, dropout_p)
        mixed = torch.bmm(probs, source)  # (B, H L, Dk): attention-weighted source
        mixed = mixed.view(batch, heads, length, width).transpose(0, 1)  # (H, B, L, Dk), a view
        mixed = mixed.reshape(heads, batch * length, width)  # (H, B L, Dk): one copy
        if dropout_p > 0.0:
            mass = probs.sum(dim=-1).view(batch, heads, length).permute(1, 0, 2).reshape(heads, batch * length, 1)
            bias = mass * b_v  # (H, B L, Dh)
        else:
            bias = b_v
        context = torch.baddbmm(bias, mixed, w_v.transpose(1, 2))  # (H, B L, Dh)
        return context.view(heads, batch, length, head_dim).permute(1, 2, 0, 3).flatten(2)  # (B, L, D)

    def cross_attend(self, hidden: Tensor, kv_source: Tensor) -> Tensor:
        """Cross-attention and the output block, without returning keys/values (the Q-Former's
        layers never reuse them). Same result as ``forward(hidden, kv_source)[0]`` up to float
        rounding; takes the cheaper of the two equivalent orders of computation.

        Args:
            hidden: (B, L, D).
            kv_source: (B, S, Dk).

        Returns:
            (B, L, D).
        """
        if not self.is_cross:
            raise ValueError("cross_attend() needs a cross-attention module (built with kv_width)")
        if self._absorbed_is_cheaper(hidden.shape[1], kv_source.shape[1], kv_source.shape[2]):
            context = self._cross_context_absorbed(self.q_proj(hidden), kv_source)
            return self.norm(add_dropped(hidden, self.out_proj(context), self.dropout))
        return self(hidden, kv_source=kv_source)[0]

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
        context = self._attend(q, k, v, mask)  # (B, L, D)
        out = self.norm(add_dropped(hidden, self.out_proj(context), self.dropout))
        return out, (k, v)
