"""Output heads on Q-Former states.

Glossary: B batch, Q queries, T text tokens, D width, E embedding width of ITC, V vocabulary.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class LMHead(nn.Module):
    """BERT's masked/causal LM head: ``W_dec LayerNorm(gelu(W x)) + b``. (B, T, D) -> (B, T, V).

    Args:
        hidden_size: D.
        vocab_size: V.
        layer_norm_eps: eps of the transform LayerNorm.
    """

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class ItmHead(nn.Module):
    """Image-text matching: a 2-way linear head averaged over the query outputs. (B, Q, D) -> (B, 2)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2)

    def forward(self, query_hidden: Tensor) -> Tensor:
        return self.linear(query_hidden).mean(dim=1)  # (B, Q, 2) -> (B, 2)
