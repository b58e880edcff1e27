"""BLIP-2 stage-2 model: frozen image encoder + Q-Former + projection + frozen LLM (Sec. 3.3).

Glossary: B batch, N image tokens, Dv vision width, Q queries, D Q-Former width, Dl LLM width,
V LLM vocabulary.

The Q-Former's query outputs Z (B, Q, D) are projected by one linear layer to (B, Q, Dl) and
prepended to the LLM's text embeddings as a soft visual prompt. The projection's output width
is the LLM's, known once the LLM is loaded: :meth:`Blip2LLMModel.build` loads the LLM and
creates the projection (the task calls it in ``configure_model``), so constructing the model
from YAML reads no weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qformer_lightning.encoders.llm import LanguageModel
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.nn.qformer import QFormer


class Blip2LLMModel(nn.Module):
    """Image encoder, Q-Former, projection and LLM adapter.

    Args:
        vision: image encoder returning (B, N, Dv) features (with ``ln_vision``).
        qformer: the Q-Former (stage 2 uses queries only: ``text_ffn=False``).
        llm: the language-model adapter (loaded on :meth:`build`).
        projection: the linear map D -> Dl; ``None`` creates it on :meth:`build` (PyTorch's
            default ``nn.Linear`` init, as LAVIS's ``opt_proj``/``t5_proj``).
    """

    def __init__(
        self,
        vision: TimmVisionEncoder,
        qformer: QFormer,
        llm: LanguageModel,
        projection: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if qformer.vision_width != vision.width:
            raise ValueError(
                f"Q-Former vision_width={qformer.vision_width} does not match the image encoder width {vision.width}"
            )
        if projection is not None and projection.in_features != qformer.hidden_size:
            raise ValueError(f"projection takes {projection.in_features} features, the Q-Former gives {qformer.hidden_size}")
        self.vision = vision
        self.qformer = qformer
        self.llm = llm
        self.projection = projection
        if llm.loaded:
            self.build()

    def build(self) -> None:
        """Load the LLM (once) and create the projection to its width; idempotent.

        Raises:
            ValueError: a given projection whose output width is not the LLM's.
        """
        self.llm.load()
        width = self.llm.hidden_size
        if self.projection is None:
            self.projection = nn.Linear(self.qformer.hidden_size, width)
        elif self.projection.out_features != width:
            raise ValueError(f"projection gives {self.projection.out_features} features, the LLM expects {width}")

    def _projection(self) -> nn.Linear:
        if self.projection is None:
            raise RuntimeError("the stage-2 model is not built: call build() (the task does it in configure_model)")
        return self.projection

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) image features."""
        return self.vision(images)

    def soft_prompt(self, images: Tensor) -> Tensor:
        """The soft visual prompt. (B, 3, H, W) -> (B, Q, Dl), in the projection's dtype."""
        query = self.qformer.encode_queries(self.image_embeds(images)).hidden  # (B, Q, D)
        projection = self._projection()
        return projection(query.to(projection.weight.dtype))

    def forward(
        self,
        images: Tensor,
        targets: list[str],
        prompts: list[str] | None = None,
        prefix_lm: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Logits and labels of the language-modelling objective.

        Args:
            images: (B, 3, H, W).
            targets: B texts to learn.
            prompts: B prompts, or None.
            prefix_lm: encoder-decoder prefix LM (see :class:`LanguageModel`).
            generator: randomness of the prefix split.

        Returns:
            logits (B, K, V) and labels (B, K), as :meth:`LanguageModel.forward` returns them.
        """
        inputs = self.llm.training_inputs(self.soft_prompt(images), targets, prompts, prefix_lm, generator)
        return self.llm(inputs)

    @torch.no_grad()
    def generate(self, images: Tensor, prompts: list[str] | None = None, **settings: Any) -> Tensor:
        """Generated token ids (B * num_return_sequences, S); ``settings`` go to :meth:`LanguageModel.generate`."""
        return self.llm.generate(self.soft_prompt(images), prompts, **settings)

    def caption(self, images: Tensor, prompts: list[str] | None = None, **settings: Any) -> list[str]:
        """Generated texts for a batch of images."""
        return self.llm.decode(self.generate(images, prompts, **settings))
