"""Image-text retrieval: finetune the stage-1 model and evaluate with ITC top-k + ITM re-ranking.

Glossary: B batch, I images, X texts, Q queries, E ITC width, N image tokens, Dv vision width,
T text tokens, k candidates per query.

Finetune (BLIP-2 Sec. 4.4): the stage-1 objectives (ITC + ITM + ITG, :class:`Stage1`) on COCO
pairs; captions of one image share its ``image_id`` and are all ITC positives (and never ITM
negatives). Unlike stage 1 the image encoder trains too (``frozen: []``), with layer-wise lr
decay (``optim.layer_decay``) and, for ViT-g, activation checkpointing (the encoder's
``grad_checkpointing``).

Evaluation (``validate``/``test``): each step stores its images' ViT features and ITC features
(:class:`~qformer_lightning.tasks.retrieval_eval.EvalImageCache`); at the end of the epoch the
split's texts are embedded (split across ranks), the ITC similarity is read in image blocks
keeping each image's and text's top-k (:func:`~qformer_lightning.tasks.retrieval_eval.itc_topk`,
never the (I, X) matrix), and those candidates are re-scored with ITM
(:func:`~qformer_lightning.tasks.retrieval_eval.rerank`): score = ITM matched logit + ITC.
Logged: ``{split}/txt_r1 .. txt_r10, txt_r_mean, img_r1 .. img_r10, img_r_mean, r_mean`` and
the ITC-only figures under ``{split}/itc_*``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from qformer_lightning.convert.report import ConversionReport
from qformer_lightning.distributed import gather_concat, rank_and_world
from qformer_lightning.losses.itc import itc_similarity
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.tasks.base import FrozenDtype, NonFinitePolicy, Optimization
from qformer_lightning.tasks.retrieval_eval import (
    EvalImageCache,
    ItcTopK,
    RerankedScores,
    itc_blocks,
    itc_topk,
    rerank,
)
from qformer_lightning.tasks.stage1 import Stage1


@dataclass
class RetrievalResult:
    """One retrieval evaluation.

    Attributes:
        metrics: ITM re-ranked TR/IR@1/5/10 and means (percent), then ``itc_*`` (ITC only).
        itc: each image's and text's ITC top-k and the ITC ranks.
        scores: the re-ranked candidates' scores.
        image_index: (I,) dataset positions of the evaluated images (all, unless a run saw
            only part of the split, e.g. ``limit_val_batches``).
        text_index: (X,) dataset positions of their texts.
        image_feats: (I, Q, E) ITC features of the evaluated images.
        text_feats: (X, E) ITC features of their texts.
    """

    metrics: dict[str, float]
    itc: ItcTopK
    scores: RerankedScores
    image_index: Tensor
    text_index: Tensor
    image_feats: Tensor
    text_feats: Tensor

    @property
    def sim(self) -> Tensor:
        """(I, X) ITC similarities, recomputed from the features: small splits and tests only."""
        return itc_similarity(self.image_feats.float(), self.text_feats.float())  # (I, X)


class Retrieval(Stage1):
    """Retrieval finetune (ITC + ITM + ITG, image encoder trainable) and ITC/ITM retrieval evaluation.

    Args:
        model: the stage-1 model (image encoder, Q-Former, ITC/ITM/ITG heads).
        tokenizer: BERT tokenizer hub id or directory (``[DEC]`` is added).
        max_text_length: text tokens per caption (BLIP-2: 32).
        label_smoothing: for ITC and ITG (BLIP-2: 0.1).
        pretrained: start from these weights: this project's ``.ckpt`` (stage 1, or a retrieval
            run), a LAVIS ``.pth``, or a Hugging Face ``Blip2ForImageTextRetrieval`` directory or
            hub id (``Salesforce/blip2-itm-vit-g`` for the stage-1 model,
            ``Salesforce/blip2-itm-vit-g-coco`` for the COCO-finetuned one).
        frozen: module prefixes to freeze (default none: the ViT is finetuned, SPEC).
        optim: optimiser/schedule (default: the paper's ViT-g COCO finetune, lr 1e-5, layer decay 0.95).
        k: ITC candidates per image and per text re-ranked by ITM (paper: 128).
        itm_batch_size: pairs per ITM forward in evaluation.
        text_batch_size: texts per forward when embedding the evaluation texts.
        cache_on_cpu: keep the evaluation images' ViT features in host memory (large splits).
        nonfinite, store_frozen, frozen_dtype: see :class:`~qformer_lightning.tasks.base.Blip2Task`.
    """

    def __init__(
        self,
        model: Blip2QFormerModel,
        tokenizer: str = "bert-base-uncased",
        max_text_length: int = 32,
        label_smoothing: float = 0.1,
        pretrained: str | None = None,
        frozen: list[str] | None = None,
        optim: Optimization | None = None,
        k: int = 128,
        itm_batch_size: int = 512,
        text_batch_size: int = 512,
        cache_on_cpu: bool = False,
        nonfinite: NonFinitePolicy = "stop",
        store_frozen: bool | None = None,
        frozen_dtype: FrozenDtype | None = None,
    ) -> None:
        if k < 1 or itm_batch_size < 1 or text_batch_size < 1:
            raise ValueError(f"k, itm_batch_size and text_batch_size must be >= 1, got {k}, {itm_batch_size}, {text_batch_size}")
        super().__init__(
            model,
            tokenizer=tokenizer,
            max_text_length=max_text_length,
            label_smoothing=label_smoothing,
            pretrained=pretrained,
            frozen=[] if frozen is None else frozen,
            optim=optim if optim is not None else Optimization(
                lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000, betas=(0.9, 0.999), layer_decay=0.95
            ),
            nonfinite=nonfinite,
            store_frozen=store_frozen,
            frozen_dtype=frozen_dtype,
        )
        self.k = k
        self.itm_batch_size = itm_batch_size
        self.text_batch_size = text_batch_size
        self.eval_cache = EvalImageCache(on_cpu=cache_on_cpu)
        self.last_result: RetrievalResult | None = None

    # ------------------------------------------------------------------ weights
    def load_initial_weights(self) -> None:
        """Load ``pretrained`` (see :class:`Stage1`) and refuse to finetune or evaluate a random ViT.

        Raises:
            ValueError: the ViT was neither in the checkpoint nor given its own weights
                (``vision.pretrained``/``checkpoint_path``): the message says which to set.
        """
        if self.pretrained is None:
            super().load_initial_weights()
            return
        from qformer_lightning.convert.into import load_into

        report: ConversionReport = load_into(self.model, self.pretrained)
        rank_zero_info(f"pretrained weights: {report.summary()}")
        left = [name for name in report.missing if name.startswith("vision.vit.")]
        if left and not self.model.vision.has_weight_source:
            raise ValueError(
                f"{self.pretrained} holds no weights for {len(left)} ViT tensors (e.g. {left[0]}) and the image "
                "encoder has no other source: set model.vision.init_args.pretrained: true (timm weights) or "
                "checkpoint_path, or start from a checkpoint that includes the ViT (e.g. Salesforce/blip2-itm-vit-g)"
            )

    # ------------------------------------------------------------------ evaluation steps
    def _embed_images(self, batch: dict[str, Any]) -> None:
        if "index" not in batch:
            raise ValueError(
                "retrieval evaluation needs batches with 'index' (one item per image): use CaptionDataModule "
                "with eval_mode: images (an ImageTextEvalDataset)"
            )
        image_embeds = self.model.image_embeds(batch["image"])  # (B, N, Dv)
        _, image_feats, _ = self.model.query_features(image_embeds)  # (B, Q, E)
        self.eval_cache.add(batch["index"], image_embeds, image_feats)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._embed_images(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._embed_images(batch)

    def on_validation_epoch_start(self) -> None:
        self.eval_cache.reset()

    def on_test_epoch_start(self) -> None:
        self.eval_cache.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val", self.trainer.val_dataloaders)

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test", self.trainer.test_dataloaders)

    def _log_retrieval(self, split: str, loaders: Any) -> None:
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dataset = getattr(loader, "dataset", None)
        for attribute in ("texts", "txt2img", "img2txt"):
            if not hasattr(dataset, attribute):
                raise ValueError(
                    f"the {split} dataset {type(dataset).__name__} has no {attribute!r}: retrieval evaluation needs "
                    "an ImageTextEvalDataset (CaptionDataModule with eval_mode: images)"
                )
        result = self.evaluate(dataset.texts, dataset.txt2img, dataset.img2txt)
        self.eval_cache.reset()
        self.last_result = result
        for name, value in result.metrics.items():
            self.log(f"{split}/{name}", value, sync_dist=False, rank_zero_only=False)

    # ------------------------------------------------------------------ the protocol
    def _forward_context(self) -> contextlib.AbstractContextManager:
        """The trainer's precision context (autocast under mixed precision) outside the step hooks."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Tokenise all texts; embed them, each rank a contiguous slice (gathered).

        Args:
            texts: X captions.

        Returns:
            text_feats (X, E) float32 L2-normalised, ids (X, T), mask (X, T) on the model's device.
        """
        if not texts:
            raise ValueError("no texts to embed: the evaluation split has no captions")
        rank, world = rank_and_world()
        ids, mask = self.text(list(texts), self.device)  # (X, T)
        per_rank = math.ceil(len(texts) / world)
        mine = torch.arange(rank * per_rank, (rank + 1) * per_rank, device=self.device).clamp(max=len(texts) - 1)
        feats = []
        for start in range(0, per_rank, self.text_batch_size):  # the same number of calls on every rank
            rows = mine[start : start + self.text_batch_size]
            with self._forward_context():
                _, feat = self.model.text_features(ids[rows], mask[rows])  # (b, E)
            feats.append(feat.float())
        text_feats = gather_concat(torch.cat(feats))[: len(texts)]  # (X, E): slices in rank order
        return text_feats, ids, mask

    @torch.no_grad()
    def evaluate(self, texts: list[str], txt2img: list[int], img2txt: list[list[int]]) -> RetrievalResult:
        """ITC + ITM retrieval over the images stored by the evaluation steps (a collective).

        Images no rank embedded (a run limited to some batches) are left out with their texts.

        Args:
            texts: X captions of the split.
            txt2img: (X,) image index of each text.
            img2txt: I lists of text indices (the dataset's inverse of ``txt2img``; only its length
                is read: an image's true texts are those whose ``txt2img`` names it).
        """
        images = self.eval_cache.gather(len(img2txt), self.device)
        seen = images.seen.cpu()
        image_index = seen.nonzero().squeeze(1)  # (I',)
        text_keep = seen[torch.as_tensor(txt2img, dtype=torch.long)]
        text_index = text_keep.nonzero().squeeze(1)  # (X',)
        if len(image_index) < len(img2txt):
            rank_zero_warn(f"retrieval evaluation over the {len(image_index)} of {len(img2txt)} images that were embedded")
        new_image = torch.full((len(img2txt),), -1, dtype=torch.long)
        new_image[image_index] = torch.arange(len(image_index))
        sub_txt2img = new_image[torch.as_tensor(txt2img, dtype=torch.long)[text_index]]  # (X',)

        text_feats, ids, mask = self.embed_texts([texts[j] for j in text_index.tolist()])
        image_rows = image_index.to(self.device)
        image_feats = images.feats if len(image_index) == len(img2txt) else images.feats[image_rows]  # (I', Q, E)
        itc = itc_topk(itc_blocks(image_feats, text_feats), len(image_index), len(text_index), self.k, sub_txt2img)
        local_row = images.local_row[image_rows]  # (I',)

        def score_pairs(image: Tensor, text: Tensor) -> Tensor:
            """ITM matched logits of (image, text) pairs given as (b,) indices into the evaluated subset."""
            rows = local_row[image].clamp(min=0)  # filler calls of rerank may name another rank's image
            embeds = images.embeds[rows.to(images.embeds.device)].to(self.device, non_blocking=True)  # (b, N, Dv)
            with self._forward_context():
                logits = self.model.itm_logits(embeds, ids[text], mask[text])  # (b, 2)
            return logits[:, 1].float()

        scores = rerank(itc, self.k, score_pairs, images.owner[image_rows], self.itm_batch_size)
        metrics = scores.metrics(sub_txt2img)
        metrics.update({f"itc_{name}": value for name, value in itc.metrics().items()})
        return RetrievalResult(metrics, itc, scores, image_index, text_index, image_feats, text_feats)
