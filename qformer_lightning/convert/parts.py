"""The pieces of a generative (stage-2) BLIP-2 checkpoint that this package builds itself.

A Hugging Face ``Blip2ForConditionalGeneration``/``Blip2Model`` or a LAVIS ``blip2_opt``/``blip2_t5``
checkpoint holds an image encoder, a Q-Former (usually without its text parts) and a language
side (the projection to the LLM width and, for Hugging Face, the LLM itself). The first two
become our modules; the language side is handed over untouched, under the checkpoint's own key
names, for the stage-2 code to load into its LLM adapter.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.nn.qformer import QFormer


class VisionQFormer(nn.Module):
    """Image encoder + Q-Former (+ the checkpoint's language side, not a module here).

    Parameter names match :class:`~qformer_lightning.models.blip2.Blip2QFormerModel`'s
    (``vision.*``, ``qformer.*``), so the same key maps load both.

    Args:
        vision: the image encoder (with ``ln_vision``).
        qformer: the Q-Former.
        language_state: the checkpoint's language tensors under their own names
            (Hugging Face ``language_projection.*``/``language_model.*``; LAVIS ``opt_proj.*``/``t5_proj.*``).
        language_config: the checkpoint's language-model config as a dict (Hugging Face
            ``text_config``), or None.
    """

    def __init__(
        self,
        vision: TimmVisionEncoder,
        qformer: QFormer,
        language_state: dict[str, Tensor] | None = None,
        language_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if qformer.vision_width != vision.width:
            raise ValueError(
                f"Q-Former vision_width={qformer.vision_width} does not match the image encoder width {vision.width}"
            )
        self.vision = vision
        self.qformer = qformer
        self.language_state: dict[str, Tensor] = dict(language_state or {})
        self.language_config = language_config

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, Q, D) query outputs."""
        return self.qformer.encode_queries(self.vision(images)).hidden
