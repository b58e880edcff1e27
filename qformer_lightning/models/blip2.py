"""BLIP-2 stage-1 model: frozen image encoder + Q-Former + ITC/ITM/ITG heads, assembled from modules.

Glossary: B batch, Q queries, T text tokens, N image tokens, D Q-Former width, Dv vision
width, E ITC embedding width (256), V vocabulary.

The model computes representations and logits; objectives, logging and optimisation belong
to the tasks (:mod:`qformer_lightning.tasks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.losses.itc import MAX_TEMPERATURE, MIN_TEMPERATURE, clamp_temperature
from qformer_lightning.nn.heads import ItmHead, LMHead
from qformer_lightning.nn.qformer import KVCache, QFormer


class Blip2QFormerModel(nn.Module):
    """Image encoder, Q-Former and the stage-1 heads (the model behind stage 1 and retrieval).

    Args:
        vision: image encoder returning (B, N, Dv) features (with ``ln_vision``).
        qformer: the Q-Former; its ``vision_width`` must equal the encoder's width.
        embed_dim: E, width of the ITC projections.
        vocab_size: V of the LM head (bert-base-uncased + [DEC]: 30523).
        tie_lm_head: share the LM head's decoder weight with the word embeddings (BERT does).
        temperature: initial ITC temperature.
        min_temperature: lower clamp of the learnable temperature.
        max_temperature: upper clamp.
    """

    def __init__(
        self,
        vision: TimmVisionEncoder,
        qformer: QFormer,
        embed_dim: int = 256,
        vocab_size: int = 30523,
        tie_lm_head: bool = True,
        temperature: float = 0.07,
        min_temperature: float = MIN_TEMPERATURE,
        max_temperature: float = MAX_TEMPERATURE,
    ) -> None:
        super().__init__()
        if qformer.vision_width != vision.width:
            raise ValueError(
                f"Q-Former vision_width={qformer.vision_width} does not match the image encoder width {vision.width}"
            )
        if not qformer.has_text:
            raise ValueError("the stage-1 model needs a Q-Former with text FFNs and embeddings (text_ffn=True)")
        width = qformer.hidden_size
        self.vision = vision
        self.qformer = qformer
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = ItmHead(width)
        self.lm_head = LMHead(width, vocab_size, layer_norm_eps=qformer.embed_norm.eps)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature
        for module in (self.vision_proj, self.text_proj, self.itm_head.linear, self.lm_head.dense, self.lm_head.decoder):
            nn.init.normal_(module.weight, std=qformer.initializer_range)
            nn.init.zeros_(module.bias)
        if tie_lm_head:
            self.tie_lm_head()

    def tie_lm_head(self) -> None:
        """Share the LM decoder weight with the Q-Former word embeddings."""
        assert self.qformer.word_embeddings is not None
        self.lm_head.decoder.weight = self.qformer.word_embeddings.weight

    @property
    def lm_head_tied(self) -> bool:
        """Whether the LM decoder weight is the word-embedding matrix."""
        return self.qformer.word_embeddings is not None and self.lm_head.decoder.weight is self.qformer.word_embeddings.weight

    @property
    def temperature(self) -> Tensor:
        """The ITC temperature clamped to [min_temperature, max_temperature] (scalar)."""
        return clamp_temperature(self.temp, self.min_temperature, self.max_temperature)

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) features (frozen encoder under no_grad, then ln_vision)."""
        return self.vision(images)

    def query_features(self, image_embeds: Tensor, use_cache: bool = False) -> tuple[Tensor, Tensor, KVCache | None]:
        """Query pass and its ITC features.

        Args:
            image_embeds: (B, N, Dv).
            use_cache: keep the query keys/values for ITG.

        Returns:
            query hidden (B, Q, D), L2-normalised projected features (B, Q, E), cache or None.
        """
        out = self.qformer.encode_queries(image_embeds, use_cache=use_cache)
        feats = F.normalize(self.vision_proj(out.hidden), dim=-1)
        return out.hidden, feats, out.cache

    def text_features(self, input_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text pass and its ITC feature.

        Args:
            input_ids: (B, T) starting with [CLS].
            text_mask: (B, T).

        Returns:
            text hidden (B, T, D), L2-normalised projected [CLS] feature (B, E).
        """
        hidden = self.qformer.encode_text(input_ids, text_mask)
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Matched/unmatched logits from the bidirectional pass. -> (B, 2), column 1 = matched."""
        hidden = self.qformer.encode_joint(image_embeds, input_ids, text_mask)
        return self.itm_head(hidden[:, : self.qformer.num_query_tokens])

    def itg_logits(self, input_ids: Tensor, text_mask: Tensor, query_cache: KVCache) -> Tensor:
        """Next-token logits of the causal text pass. (B, T) ids starting with [DEC] -> (B, T, V)."""
        return self.lm_head(self.qformer.decode_text(input_ids, text_mask, query_cache))

