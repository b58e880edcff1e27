"""The Querying Transformer (Q-Former) of BLIP-2: a BERT encoder shared by learned queries and text.

Glossary: B batch, Q query tokens, T text tokens, L = Q + T sequence length, N image tokens,
D width, Dv image-feature width, V vocabulary, P cached (query) length, H heads.

A layer runs self-attention over ``[queries | text]`` (one set of weights for both), then, in
every ``cross_attention_freq``-th layer, cross-attention from the query positions to the image
features, then a feed-forward block: one for query positions (``query_ffn``) and one for text
positions (``text_ffn``). Which positions see which is decided by a boolean mask from
:mod:`qformer_lightning.nn.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qformer_lightning.nn import masks
from qformer_lightning.nn.attention import KeyValue, MultiHeadAttention, add_dropped

KVCache = list[KeyValue]
"""Self-attention keys/values of the query pass, one (B, H, Q, Dh) pair per layer."""


class FeedForward(nn.Module):
    """BERT feed-forward block: ``LayerNorm(x + Dropout(W2 gelu(W1 x)))``. (B, L, D) -> (B, L, D)."""

    def __init__(self, hidden_size: int, intermediate_size: int, layer_norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(add_dropped(x, self.fc2(nn.functional.gelu(self.fc1(x))), self.dropout))


class QFormerLayer(nn.Module):
    """One Q-Former layer: shared self-attention, optional cross-attention, two FFNs."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        vision_width: int,
        has_cross_attention: bool,
        text_ffn: bool,
        layer_norm_eps: float,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        attn = dict(layer_norm_eps=layer_norm_eps, attention_dropout=attention_dropout, hidden_dropout=dropout)
        self.self_attn = MultiHeadAttention(hidden_size, num_heads, **attn)
        self.cross_attn = (
            MultiHeadAttention(hidden_size, num_heads, kv_width=vision_width, **attn) if has_cross_attention else None
        )
        self.query_ffn = FeedForward(hidden_size, intermediate_size, layer_norm_eps, dropout)
        self.text_ffn = FeedForward(hidden_size, intermediate_size, layer_norm_eps, dropout) if text_ffn else None

    def forward(
        self,
        hidden: Tensor,
        num_query: int,
        mask: Tensor | None,
        image_embeds: Tensor | None,
        past: KeyValue | None = None,
    ) -> tuple[Tensor, KeyValue]:
        """Run the layer.

        Args:
            hidden: (B, L, D), the first ``num_query`` positions are queries.
            num_query: Q (0 for a text-only or text-with-cache pass).
            mask: bool (B, L, P + L), True = attend, or None (all see all).
            image_embeds: (B, N, Dv), required when Q > 0 and the layer has cross-attention.
            past: cached query keys/values (B, H, P, Dh) for a text pass.

        Returns:
            (B, L, D) and this layer's self-attention keys/values (B, H, P + L, Dh).
        """
        attended, kv = self.self_attn(hidden, mask=mask, past=past)
        query_part, text_part = attended[:, :num_query], attended[:, num_query:]  # (B, Q, D), (B, T, D)
        outputs = []
        if num_query > 0:
            if self.cross_attn is not None:
                if image_embeds is None:
                    raise ValueError("this Q-Former layer has cross-attention: image_embeds are required")
                query_part = self.cross_attn.cross_attend(query_part, image_embeds)
            outputs.append(self.query_ffn(query_part))
        if text_part.shape[1] > 0:
            if self.text_ffn is None:
                raise ValueError("this Q-Former was built without text FFNs (text_ffn=False): it takes no text")
            outputs.append(self.text_ffn(text_part))
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), kv


@dataclass
class QFormerOutput:
    """Q-Former outputs.

    Attributes:
        hidden: (B, L, D) last-layer states of ``[queries | text]``.
        cache: per-layer self-attention keys/values (B, H, L, Dh) when asked for, else None.
    """

    hidden: Tensor
    cache: KVCache | None = None


class QFormer(nn.Module):
    """BERT-shaped Q-Former with learned query embeddings (BLIP-2 Sec. 3.1).

    Defaults are BLIP-2's: BERT-base (12 layers, 768 wide, 12 heads, FFN 3072), 32 queries,
    cross-attention every 2nd layer to 1408-wide (EVA ViT-g) features, the bert-base-uncased
    vocabulary plus ``[DEC]`` (30523).

    Args:
        num_layers: number of layers.
        hidden_size: D.
        num_heads: H.
        intermediate_size: FFN width.
        num_query_tokens: Q.
        cross_attention_freq: layers ``0, f, 2f, ...`` have cross-attention.
        vision_width: Dv, the width of the image features.
        vocab_size: V (text embeddings).
        max_position_embeddings: maximum text length.
        layer_norm_eps: eps of every LayerNorm.
        dropout: hidden dropout.
        attention_dropout: dropout on attention probabilities.
        text_ffn: build the text FFNs and text embeddings (False for stage 2, which uses queries only).
        initializer_range: std of the normal init (BERT: 0.02).
        pad_token_id: padding id of the text embeddings.
    """

    def __init__(
        self,
        num_layers: int = 12,
        hidden_size: int = 768,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        num_query_tokens: int = 32,
        cross_attention_freq: int = 2,
        vision_width: int = 1408,
        vocab_size: int = 30523,
        max_position_embeddings: int = 512,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        text_ffn: bool = True,
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {cross_attention_freq}")
        if num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {num_query_tokens}")
        self.hidden_size = hidden_size
        self.num_query_tokens = num_query_tokens
        self.cross_attention_freq = cross_attention_freq
        self.vision_width = vision_width
        self.initializer_range = initializer_range
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, hidden_size))
        if text_ffn:
            self.word_embeddings: nn.Embedding | None = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
            self.position_embeddings: nn.Embedding | None = nn.Embedding(max_position_embeddings, hidden_size)
        else:
            self.word_embeddings = self.position_embeddings = None
        self.embed_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(
                hidden_size,
                num_heads,
                intermediate_size,
                vision_width,
                has_cross_attention=i % cross_attention_freq == 0,
                text_ffn=text_ffn,
                layer_norm_eps=layer_norm_eps,
                dropout=dropout,
                attention_dropout=attention_dropout,
            )
            for i in range(num_layers)
        )
        self.reset_parameters()

    @property
    def has_text(self) -> bool:
        """Whether text embeddings and text FFNs exist."""
        return self.word_embeddings is not None

    def reset_parameters(self) -> None:
        """BERT init: N(0, initializer_range) weights and queries, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.initializer_range)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=self.initializer_range)

    def embed(self, input_ids: Tensor | None = None, with_queries: bool = True, batch_size: int | None = None) -> Tensor:
        """Embed ``[queries | text]``: text gets word + position embeddings (positions from 0), then
        LayerNorm and dropout over the whole sequence.

        Args:
            input_ids: (B, T) or None.
            with_queries: prepend the Q learned queries.
            batch_size: B when there is no text.

        Returns:
            (B, Q + T, D) (Q = 0 without queries).
        """
        parts = []
        if with_queries:
            batch = input_ids.shape[0] if input_ids is not None else batch_size
            if batch is None:
                raise ValueError("embed() needs input_ids or batch_size")
            parts.append(self.query_tokens.expand(batch, -1, -1))  # (B, Q, D)
        if input_ids is not None:
            if self.word_embeddings is None or self.position_embeddings is None:
                raise ValueError("this Q-Former has no text embeddings (text_ffn=False)")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # (B, T, D)
        if not parts:
            raise ValueError("embed() got neither queries nor text")
        hidden = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.embed_dropout(self.embed_norm(hidden))

    def forward(
        self,
        hidden: Tensor,
        num_query: int,
        mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        past: KVCache | None = None,
        use_cache: bool = False,
    ) -> QFormerOutput:
        """Run all layers over embedded states.

        Args:
            hidden: (B, L, D) from :meth:`embed`.
            num_query: Q, the number of leading query positions in ``hidden``.
            mask: bool (B, L, P + L), True = attend; None = all positions see all.
            image_embeds: (B, N, Dv) image features for the cross-attention.
            past: per-layer query keys/values from an earlier query pass (text pass of ITG).
            use_cache: return the per-layer self-attention keys/values.

        Returns:
            :class:`QFormerOutput`.
        """
        if image_embeds is not None and image_embeds.shape[-1] != self.vision_width:
            raise ValueError(
                f"image features have width {image_embeds.shape[-1]}, the Q-Former expects vision_width="
                f"{self.vision_width}"
            )
        if past is not None and len(past) != len(self.layers):
            raise ValueError(f"cache has {len(past)} layers, the Q-Former has {len(self.layers)}")
        cache: KVCache = []
        for i, layer in enumerate(self.layers):
            hidden, kv = layer(hidden, num_query, mask, image_embeds, past[i] if past is not None else None)
            if use_cache:
                cache.append(kv)
        return QFormerOutput(hidden=hidden, cache=cache if use_cache else None)

    # The passes BLIP-2 uses, each a thin composition of embed() + a mask + forward().

    def encode_queries(self, image_embeds: Tensor, use_cache: bool = False) -> QFormerOutput:
        """Query pass (ITC image side, stage 2): queries see queries and the image.

        Args:
            image_embeds: (B, N, Dv).
            use_cache: keep keys/values for a later :meth:`decode_text`.

        Returns:
            hidden (B, Q, D) and optionally the cache.
        """
        hidden = self.embed(batch_size=image_embeds.shape[0])
        return self(hidden, self.num_query_tokens, image_embeds=image_embeds, use_cache=use_cache)

    def encode_text(self, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Text-only pass (ITC text side). (B, T), (B, T) -> (B, T, D)."""
        hidden = self.embed(input_ids, with_queries=False)
        return self(hidden, 0, mask=masks.padding_mask(text_mask)).hidden

    def encode_joint(self, image_embeds: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Bidirectional pass over queries and text (ITM; queries instructed by a question).

        Args:
            image_embeds: (B, N, Dv).
            input_ids: (B, T).
            text_mask: (B, T).

        Returns:
            (B, Q + T, D).
        """
        hidden = self.embed(input_ids)
        mask = masks.bidirectional_mask(self.num_query_tokens, text_mask)
        return self(hidden, self.num_query_tokens, mask=mask, image_embeds=image_embeds).hidden

    def decode_text(self, input_ids: Tensor, text_mask: Tensor, query_cache: KVCache) -> Tensor:
        """Causal text pass of ITG reusing the query pass's keys/values (multimodal causal mask).

        Args:
            input_ids: (B, T), first token ``[DEC]``.
            text_mask: (B, T).
            query_cache: from ``encode_queries(..., use_cache=True)``, each (B, H, Q, Dh).

        Returns:
            (B, T, D).
        """
        hidden = self.embed(input_ids, with_queries=False)
        mask = masks.causal_text_rows(self.num_query_tokens, text_mask)  # (B, T, Q + T)
        return self(hidden, 0, mask=mask, past=query_cache).hidden
