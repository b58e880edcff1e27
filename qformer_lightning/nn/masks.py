"""Self-attention masks of the Q-Former's three regimes (BLIP-2, Fig. 2), as pure functions.

Glossary: B batch, Q query tokens, T text tokens, L = Q + T.

Every mask is boolean, shape (B, L_q, L_k), ``True`` where attention is allowed. The sequence
is laid out as ``[queries | text]``; ``text_mask`` (B, T) marks real (1/True) versus padding
(0/False) text tokens. Queries are never padding.

- unimodal (ITC): queries see queries, text sees text.
- bidirectional (ITM, instructed queries): everything sees everything.
- multimodal causal (ITG): queries see queries only; text token i sees all queries and text
  tokens <= i.

A padded text position keeps its own row valid (it may attend to the queries or the first
token) so that no row is entirely masked; its output is never used.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _segments(num_query: int, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Key-validity and segment flags of the joint sequence.

    Args:
        num_query: Q.
        text_mask: (B, T) 1/True for real tokens.

    Returns:
        key_valid (B, L) bool, is_query (L,) bool, is_text (L,) bool.
    """
    batch = text_mask.shape[0]
    device = text_mask.device
    query_valid = torch.ones(batch, num_query, dtype=torch.bool, device=device)
    key_valid = torch.cat([query_valid, text_mask.bool()], dim=1)  # (B, L)
    length = key_valid.shape[1]
    is_query = torch.arange(length, device=device) < num_query  # (L,)
    return key_valid, is_query, ~is_query


def padding_mask(text_mask: Tensor) -> Tensor:
    """Text-only mask: every token sees every real token. (B, T) -> (B, T, T)."""
    key_valid = text_mask.bool()[:, None, :]  # (B, 1, T)
    return key_valid.expand(-1, text_mask.shape[1], -1)


def unimodal_mask(num_query: int, text_mask: Tensor) -> Tensor:
    """ITC regime: queries and text do not see each other. Returns (B, L, L)."""
    key_valid, is_query, is_text = _segments(num_query, text_mask)
    same_segment = (is_query[:, None] & is_query[None, :]) | (is_text[:, None] & is_text[None, :])
    return same_segment[None] & key_valid[:, None, :]


def bidirectional_mask(num_query: int, text_mask: Tensor) -> Tensor:
    """ITM regime: all positions see all real positions. Returns (B, L, L)."""
    key_valid, _, _ = _segments(num_query, text_mask)
    length = key_valid.shape[1]
    return key_valid[:, None, :].expand(-1, length, -1)


def multimodal_causal_mask(num_query: int, text_mask: Tensor) -> Tensor:
    """ITG regime: queries see queries; text token i sees all queries and text <= i. (B, L, L)."""
    key_valid, is_query, _ = _segments(num_query, text_mask)
    length = key_valid.shape[1]
    pos = torch.arange(length, device=text_mask.device)
    causal = pos[None, :] <= pos[:, None]  # (L, L) key j <= query i
    query_rows = is_query[:, None] & is_query[None, :]  # queries see queries only
    text_rows = (~is_query)[:, None] & (is_query[None, :] | causal)
    return (query_rows | text_rows)[None] & key_valid[:, None, :]


def causal_text_rows(num_query: int, text_mask: Tensor) -> Tensor:
    """The text rows of the ITG mask, for a text pass that reuses the queries' cached keys.

    Args:
        num_query: Q (cached query keys/values come first).
        text_mask: (B, T).

    Returns:
        (B, T, Q + T) bool.
    """
    return multimodal_causal_mask(num_query, text_mask)[:, num_query:, :]
