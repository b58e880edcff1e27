"""BLIP-2 stage-2 model: frozen image encoder + Q-Former + projection + frozen LLM (Sec. 3.3).

Glossary: B batch, N image tokens, Dv vision width, Q queries, D Q-Former width, Dl LLM width,
V LLM vocabulary, T Q-Former text tokens.

The Q-Former's query outputs Z (B, Q, D) are projected by one linear layer to (B, Q, Dl) and
prepended to the LLM's text embeddings as a soft visual prompt. The projection's output width
is the LLM's, known once the LLM is loaded: :meth:`Blip2LLMModel.build` loads the LLM and
creates the projection (the task calls it in ``configure_model``), so constructing the model
from YAML reads no weights.

Instructed queries (VQA finetuning, BLIP-2 Sec. 4.2): given Q-Former token ids of the question,
the queries and the question tokens go through the Q-Former together, attending to each other
in its self-attention (bidirectional mask, :meth:`QFormer.encode_joint`); only the Q query
outputs are projected for the LLM. The Q-Former then needs its text parts (``text_ffn=True``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from qformer_lightning.encoders.llm import LanguageModel
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.nn.qformer import QFormer

QFormerText = tuple[Tensor, Tensor]
"""Q-Former token ids (B, T) and attention mask (B, T) of a text fed beside the queries."""


class Blip2LLMModel(nn.Module):
    """Image encoder, Q-Former, projection and LLM adapter.

    Args:
        vision: image encoder returning (B, N, Dv) features (with ``ln_vision``).
        qformer: the Q-Former (stage 2 uses queries only: ``text_ffn=False``).
        llm: the language-model adapter (loaded on :meth:`build`).
        projection: the linear map D -> Dl; ``None`` creates it on :meth:`build` (PyTorch's
            default ``nn.Linear`` init, as LAVIS's ``opt_proj``/``t5_proj``).
        projection_init: how :meth:`build` initialises a new projection: ``"default"`` (as LAVIS)
            or ``"embedding_scale"``: normal weights, zero bias, sized so that unit-variance query
            outputs give soft prompts with the standard deviation of the LLM's input embeddings
            (PyTorch's default gives prompts several times larger than the token embeddings of a
            small LLM, which the first hundreds of steps spend shrinking; used by the CPU demos).
    """

    def __init__(
        self,
        vision: TimmVisionEncoder,
        qformer: QFormer,
        llm: LanguageModel,
        projection: nn.Linear | None = None,
        projection_init: Literal["default", "embedding_scale"] = "default",
    ) -> None:
        super().__init__()
        if projection_init not in ("default", "embedding_scale"):
            raise ValueError(f"projection_init must be 'default' or 'embedding_scale', got {projection_init!r}")
        self.projection_init = projection_init
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
            if self.projection_init == "embedding_scale":
                target = self.llm.model.get_input_embeddings().weight.float().std().item()
                with torch.no_grad():
                    self.projection.weight.normal_(0.0, target / self.qformer.hidden_size**0.5)
                    self.projection.bias.zero_()
        elif self.projection.out_features != width:
            raise ValueError(f"projection gives {self.projection.out_features} features, the LLM expects {width}")

    def _projection(self) -> nn.Linear:
        if self.projection is None:
            raise RuntimeError("the stage-2 model is not built: call build() (the task does it in configure_model)")
        return self.projection

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, Dv) image features."""
        return self.vision(images)

    def query_outputs(self, images: Tensor, question: QFormerText | None = None) -> Tensor:
        """Q-Former query outputs Z.

        Args:
            images: (B, 3, H, W).
            question: Q-Former ids (B, T) and mask (B, T) of a text the queries attend to
                (VQA: the question), or None (queries and image only).

        Returns:
            (B, Q, D); with a question, the query positions of the joint pass.
        """
        image_embeds = self.image_embeds(images)  # (B, N, Dv)
        if question is None:
            return self.qformer.encode_queries(image_embeds).hidden
        if not self.qformer.has_text:
            raise ValueError("a question for the Q-Former needs its text parts: build the QFormer with text_ffn=True")
        ids, mask = question
        if ids.shape[0] != images.shape[0] or ids.shape != mask.shape:
            raise ValueError(f"{images.shape[0]} images but question ids {tuple(ids.shape)} and mask {tuple(mask.shape)}")
        joint = self.qformer.encode_joint(image_embeds, ids, mask)  # (B, Q + T, D)
        return joint[:, : self.qformer.num_query_tokens]

    def soft_prompt(self, images: Tensor, question: QFormerText | None = None) -> Tensor:
        """The soft visual prompt. (B, 3, H, W) -> (B, Q, Dl), in the projection's dtype.

        ``question``: optional Q-Former ids and mask (B, T) fed beside the queries (see
        :meth:`query_outputs`).
        """
        query = self.query_outputs(images, question)  # (B, Q, D)
        projection = self._projection()
        return projection(query.to(projection.weight.dtype))

    def forward(
        self,
        images: Tensor,
        targets: list[str],
        prompts: list[str] | None = None,
        prefix_lm: bool = False,
        generator: torch.Generator | None = None,
        question: QFormerText | None = None,
        learn_bos: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Logits and labels of the language-modelling objective.

        Args:
            images: (B, 3, H, W).
            targets: B texts to learn.
            prompts: B prompts, or None.
            prefix_lm: encoder-decoder prefix LM (see :class:`LanguageModel`).
            generator: randomness of the prefix split.
            question: Q-Former ids and mask (B, T) fed beside the queries, or None.
            learn_bos: decoder-only LLM without prompts: the special tokens the tokenizer puts in
                front of a text (OPT's BOS) are targets too, predicted from the last soft-prompt
                position, as LAVIS's ``blip2_opt`` labels them in pretraining; otherwise they are
                inputs only.

        Returns:
            logits (B, K, V) and labels (B, K), as :meth:`LanguageModel.forward` returns them.
        """
        soft_prompt = self.soft_prompt(images, question)  # (B, Q, Dl)
        inputs = self.llm.training_inputs(soft_prompt, targets, prompts, prefix_lm, generator)
        if learn_bos and prompts is None:
            self._label_text_start(inputs.labels, inputs.input_ids, soft_prompt.shape[1])
        return self.llm(inputs)

    def _label_text_start(self, labels: Tensor, input_ids: Tensor, num_query: int) -> None:
        """Make the special tokens in front of a prompt-less text targets (in place).

        Args:
            labels: (B, Q + P + T) labels of the decoder-only layout ``[soft prompt | specials | target | pad]``.
            input_ids: (B, P + T) token ids after the soft prompt; the first P are the specials.
            num_query: Q.

        Raises:
            ValueError: an encoder-decoder LLM (its special tokens are not in front of the target).
        """
        if self.llm.is_encoder_decoder:
            raise ValueError("learn_bos applies to decoder-only LLMs; an encoder-decoder LLM has no BOS before the target")
        count = len(self.llm.prompt_ids([""])[0])  # P: e.g. OPT's BOS; 0 for a tokenizer that adds none
        labels[:, num_query : num_query + count] = input_ids[:, :count]

    @torch.no_grad()
    def generate(
        self, images: Tensor, prompts: list[str] | None = None, question: QFormerText | None = None, **settings: Any
    ) -> Tensor:
        """Generated token ids (B * num_return_sequences, S); ``settings`` go to :meth:`LanguageModel.generate`,
        ``question`` (Q-Former ids and mask) to :meth:`query_outputs`."""
        return self.llm.generate(self.soft_prompt(images, question), prompts, **settings)

    def caption(
        self, images: Tensor, prompts: list[str] | None = None, question: QFormerText | None = None, **settings: Any
    ) -> list[str]:
        """Generated texts for a batch of images (captions, or answers to ``prompts``)."""
        return self.llm.decode(self.generate(images, prompts, question, **settings))
