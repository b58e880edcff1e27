"""Stage 2: vision-to-language generative learning with a frozen LLM (BLIP-2 Sec. 3.3).

Glossary: B batch, Q queries, K logit positions, V LLM vocabulary.

One step: frozen image encoder -> Q-Former queries -> projection -> soft prompt in front of
the text; loss = language modelling on the target text only (:func:`lm_loss`). Decoder-only
LLMs learn the caption after an optional prompt; encoder-decoder LLMs either learn a prefix LM
(``prefix_lm=True``, pretraining: the split point is drawn per sample from a generator seeded
with ``(seed, global step, batch index, rank)``) or the target after a prompt (finetuning).

Batches are dicts: ``image`` (B, 3, H, W), ``text`` (B targets), optionally ``prompt`` (B
prompts, e.g. questions; otherwise the task's ``prompt`` is used for every sample).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from qformer_lightning.convert.into import load_into
from qformer_lightning.models.blip2_llm import Blip2LLMModel
from qformer_lightning.seeding import sequence_seed
from qformer_lightning.encoders.llm import T5_FAMILY
from qformer_lightning.tasks.base import Blip2Task, FrozenDtype, NonFinitePolicy, Optimization


def lm_loss(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    """Mean token cross-entropy (float32), -100 labels ignored.

    Args:
        logits: (B, K, V).
        labels: (B, K).
        shift: decoder-only layout: position i predicts label i + 1.

    Returns:
        Scalar loss.

    Raises:
        ValueError: no position has a label.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if not (labels != -100).any():
        raise ValueError("no target token in the batch: every label is -100")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def split_seed(seed: int, stream: int, step: int, batch_idx: int, rank: int) -> int:
    """A 63-bit seed mixed from the run seed and the position of a batch (numpy's SeedSequence over
    the parts as they are, not :func:`~qformer_lightning.seeding.mix_seed`'s words: these seeds stay as they were)."""
    return sequence_seed([seed, stream, step, batch_idx, rank])


class Stage2(Blip2Task):
    """Generative pretraining/finetuning of the Q-Former and projection in front of a frozen LLM.

    Args:
        model: the stage-2 model (image encoder, Q-Former, LLM adapter).
        prompt: prompt for every sample when the batch has no ``prompt`` (captioning: ``"a photo of"``).
        prefix_lm: encoder-decoder pretraining with a prefix LM (needs an encoder-decoder LLM
            and no prompt).
        learn_bos: decoder-only pretraining without a prompt: also learn the BOS token after the
            soft prompt, as LAVIS's ``blip2_opt`` does (it labels the whole tokenized caption when
            its prompt is empty). Default False: the BOS is an input only, as it is after a prompt;
            early loss curves then differ from LAVIS's by about 0.05 (see docs/finetune.md).
        seed: seed of the prefix-LM split points.
        pretrained: start from these weights: this project's Lightning ``.ckpt`` (stage 1 or 2),
            a Hugging Face Blip2 directory or hub id, or a LAVIS ``.pth``; or a list of them,
            loaded in order (a later source overrides what an earlier one loaded, e.g.
            ``[stage1.ckpt, stage2.ckpt]`` when the stage-2 checkpoint did not store the frozen
            ViT, or to take a finetune's Q-Former text parts from stage 1). Parts this model
            does not have (e.g. the text embeddings and FFNs of a ``text_ffn=False`` Q-Former,
            the LM head, ITC/ITM heads, temperature) are dropped; what is loaded, dropped and
            left is printed.
        num_beams: generation beams (predict/validation captions).
        max_new_tokens: generation length limit.
        min_new_tokens: minimum generated tokens.
        length_penalty: beam-search length penalty (exponent of the length normaliser).
        repetition_penalty: divides the scores of tokens already generated (1.0: off, as in the
            paper; LAVIS exposes the same knob).
        frozen: module prefixes to freeze (default: the ViT and the LLM).
        optim: optimiser/schedule (default: the paper's stage-2 settings: peak 1e-4, cosine to
            5e-5, 2k warmup steps; steps come from the config).
        nonfinite, store_frozen, frozen_dtype: see :class:`~qformer_lightning.tasks.base.Blip2Task`
            (the LLM's own dtype is set on :class:`~qformer_lightning.encoders.llm.LanguageModel`).
    """

    def __init__(
        self,
        model: Blip2LLMModel,
        prompt: str = "",
        prefix_lm: bool = False,
        learn_bos: bool = False,
        seed: int = 0,
        pretrained: str | list[str] | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 1,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        frozen: list[str] | None = None,
        optim: Optimization | None = None,
        nonfinite: NonFinitePolicy = "stop",
        store_frozen: bool | None = None,
        frozen_dtype: FrozenDtype | None = None,
    ) -> None:
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
        super().__init__(
            frozen=["model.vision.vit", "model.llm"] if frozen is None else frozen,
            optim=optim if optim is not None else Optimization(lr=1e-4, min_lr=5e-5, warmup_steps=2000),
            nonfinite=nonfinite,
            store_frozen=store_frozen,
            frozen_dtype=frozen_dtype,
        )
        if prefix_lm and prompt:
            raise ValueError(f"prefix_lm splits the caption itself; a prompt ({prompt!r}) cannot be combined with it")
        if learn_bos and (prompt or prefix_lm):
            raise ValueError("learn_bos labels the BOS in front of a prompt-less caption: give no prompt and no prefix_lm")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.prompt = prompt
        self.prefix_lm = prefix_lm
        self.learn_bos = learn_bos
        self.seed = seed
        self.pretrained = pretrained
        self.generation = dict(
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
        )
        self.apply_freezing()

    # ------------------------------------------------------------------ weights
    def load_initial_weights(self) -> None:
        """Load the LLM, create the projection and load ``pretrained`` (once, in ``configure_model``;
        a checkpoint restore afterwards overrides the trainable weights)."""
        self.model.build()
        llm = self.model.llm
        if self.prefix_lm and not llm.is_encoder_decoder:
            raise ValueError("prefix_lm=True needs an encoder-decoder LLM (FlanT5); this one is decoder-only")
        if self.learn_bos and llm.is_encoder_decoder:
            raise ValueError("learn_bos=True needs a decoder-only LLM (OPT); an encoder-decoder LLM has no BOS to learn")
        model_type = llm.model.config.model_type
        if self.frozen_dtype == "fp16" and "model.llm" in self.frozen and model_type in T5_FAMILY:
            raise ValueError(f"frozen_dtype fp16 would cast the {model_type} LLM to float16, which overflows: use bf16")
        for source in self.pretrained_sources:
            report = load_into(self.model, source)
            rank_zero_info(report.summary())

    @property
    def pretrained_sources(self) -> list[str]:
        """``pretrained`` as a list, in loading order."""
        if self.pretrained is None:
            return []
        return [self.pretrained] if isinstance(self.pretrained, str) else list(self.pretrained)

    def results_dir(self, configured: str | None = None) -> Path:
        """Where evaluation results (JSON) go: ``configured``, else the logger's directory, else
        the trainer's ``default_root_dir``, else ``results`` in the working directory."""
        if configured is not None:
            return Path(configured)
        if self._trainer is None:
            return Path("results")
        log_dir = self.trainer.log_dir
        return Path(log_dir if log_dir is not None else self.trainer.default_root_dir) / "results"

    def frozen_weights_have_source(self) -> bool:
        vision = self.model.vision.has_weight_source or bool(self.pretrained_sources)
        return vision and self.model.llm.has_weight_source

    # ------------------------------------------------------------------ objective
    def _generator(self, stream: int, batch_idx: int) -> torch.Generator | None:
        if not self.prefix_lm:
            return None
        rank = self.global_rank if self._trainer is not None else 0
        step = self.global_step if self._trainer is not None else 0
        return torch.Generator().manual_seed(split_seed(self.seed, stream, step, batch_idx, rank))

    def prompts_for(self, batch: dict[str, Any]) -> list[str] | None:
        """The batch's prompts, else the task prompt for every sample, else None."""
        if batch.get("prompt") is not None:
            return list(batch["prompt"])
        if self.prefix_lm or not self.prompt:
            return None
        return [self.prompt] * len(batch["text"])

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Language-modelling loss on one batch (image (B,3,H,W), text list[str], optional prompt)."""
        prompts = self.prompts_for(batch)
        logits, labels = self.model(
            batch["image"], list(batch["text"]), prompts, self.prefix_lm, generator, learn_bos=self.learn_bos
        )  # (B, K, V), (B, K)
        return lm_loss(logits, labels, shift=not self.model.llm.is_encoder_decoder)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self.compute_loss(batch, self._generator(0, batch_idx))
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_throughput(batch_size)
        self.log_data_skips(batch)
        return self.guard_loss(loss, batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.compute_loss(batch, self._generator(1, batch_idx))
        self.log("val/loss", loss, sync_dist=True, batch_size=batch["image"].shape[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Captions, answers and free-prompt generations with the task's generation settings.

        Returns:
            one record per request (its fields plus ``output`` and ``llm_prompt``), see
            :mod:`qformer_lightning.tasks.predict`.
        """
        from qformer_lightning.tasks.predict import batch_requests, generate_predictions

        requests = batch_requests(batch, score_texts=False)
        return generate_predictions(self.model, batch["image"], requests, self.prompt, self.generation)

