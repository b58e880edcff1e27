"""Stage 1: vision-language representation learning with a frozen image encoder (BLIP-2 Sec. 3.2).

Glossary: B batch (this rank), G global batch (all ranks), Q queries, T text tokens (<= 32),
N image tokens, Dv vision width, E ITC width, V vocabulary.

One step: the frozen encoder gives (B, N, Dv) features; the query pass gives the ITC image
features and the key/value cache reused by ITG; the text pass gives the [CLS] feature.
Loss = ITC + ITM (hard negatives mined from the ITC similarities, 3B pairs) + ITG.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from qformer_lightning.data.batch import stable_id
from qformer_lightning.distributed import all_gather_no_grad, all_gather_with_grad, pad_to_global_length
from qformer_lightning.losses.itc import itc_loss
from qformer_lightning.losses.itg import itg_loss
from qformer_lightning.losses.itc import clamp_temperature_
from qformer_lightning.losses.itm import has_negative, itm_loss, itm_targets, sample_hard_negatives
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.tasks.base import Blip2Task, FrozenDtype, NonFinitePolicy, Optimization
from qformer_lightning.tasks.text import QFormerTokenizer
from qformer_lightning.tasks.retrieval_eval import ItcRetrievalMetric


class Stage1(Blip2Task):
    """ITC + ITM + ITG pretraining of the Q-Former on a frozen image encoder.

    Args:
        model: the stage-1 model (image encoder, Q-Former, heads).
        tokenizer: BERT tokenizer hub id or local directory (``[DEC]`` is added).
        max_text_length: text tokens per caption (BLIP-2: 32).
        label_smoothing: for ITC and ITG (BLIP-2: 0.1).
        bert_init: initialise the Q-Former from this BERT (hub id or directory) at the start
            of training; ``None`` keeps the current weights.
        pretrained: start from these weights (this project's checkpoint, a Hugging Face
            Blip2 directory/hub id or a LAVIS ``.pth``); what is loaded and left is reported.
        frozen: module prefixes to freeze (default: the ViT).
        optim: optimiser/schedule (default: the paper's stage-1 settings; steps come from the config).
        nonfinite, store_frozen, frozen_dtype: see :class:`~qformer_lightning.tasks.base.Blip2Task`.
    """

    def __init__(
        self,
        model: Blip2QFormerModel,
        tokenizer: str = "bert-base-uncased",
        max_text_length: int = 32,
        label_smoothing: float = 0.1,
        bert_init: str | None = None,
        pretrained: str | None = None,
        frozen: list[str] | None = None,
        optim: Optimization | None = None,
        nonfinite: NonFinitePolicy = "stop",
        store_frozen: bool | None = None,
        frozen_dtype: FrozenDtype | None = None,
    ) -> None:
        super().__init__(
            frozen=["model.vision.vit"] if frozen is None else frozen,
            optim=optim if optim is not None else Optimization(lr=1e-4, min_lr=1e-5, warmup_steps=2000),
            nonfinite=nonfinite,
            store_frozen=store_frozen,
            frozen_dtype=frozen_dtype,
        )
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.text = QFormerTokenizer(tokenizer, max_text_length)
        self.label_smoothing = label_smoothing
        self.bert_init = bert_init
        self.pretrained = pretrained
        self.apply_freezing()
        self.val_retrieval = ItcRetrievalMetric()

    # ------------------------------------------------------------------ weights
    def load_initial_weights(self) -> None:
        """BERT init and/or pretrained weights; a checkpoint restore afterwards overrides them."""
        if self.bert_init is not None:
            from qformer_lightning.convert.bert import init_model_from_bert

            report = init_model_from_bert(self.model, self.bert_init)
            rank_zero_info(f"Q-Former initialised from BERT: {report.summary()}")
        if self.pretrained is not None:
            from qformer_lightning.convert.into import load_into

            report = load_into(self.model, self.pretrained)
            rank_zero_info(f"pretrained weights: {report.summary()}")

    def frozen_weights_have_source(self) -> bool:
        return self.pretrained is not None or super().frozen_weights_have_source()

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The three stage-1 losses on one batch (image (B,3,H,W), text list[str], image_id (B,))."""
        model = self.model
        ids, mask = self.text(batch["text"], self.device)  # (B, T), (B, T)
        ids, mask = pad_to_global_length(ids, mask, self.text.pad_token_id)  # ranks gather equal T
        image_ids = batch["image_id"].to(self.device)
        image_embeds = model.image_embeds(batch["image"])  # (B, N, Dv)
        _, image_feats, cache = model.query_features(image_embeds, use_cache=True)  # (B, Q, E)
        _, text_feat = model.text_features(ids, mask)  # (B, E)

        itc = itc_loss(image_feats, text_feat, model.temperature, image_ids, label_smoothing=self.label_smoothing)

        # ITM: hard negatives from the (global) similarities; positives never picked.
        image_ids_all = itc.image_ids_all  # (G,)
        # a caption equal to the row's (another image of the same scene) is a positive, never a negative
        text_ids = torch.tensor([stable_id(t) for t in batch["text"]], dtype=torch.long, device=self.device)  # (B,)
        text_ids_all = all_gather_no_grad(text_ids)  # (G,)
        neg_image, neg_text = sample_hard_negatives(
            itc.sim_i2t, itc.sim_t2i, image_ids, image_ids_all, text_ids_local=text_ids, text_ids_global=text_ids_all
        )
        embeds_all = all_gather_with_grad(image_embeds)  # (G, N, Dv)
        ids_all, mask_all = all_gather_no_grad(ids), all_gather_no_grad(mask)  # (G, T)
        itm_images = torch.cat([image_embeds, embeds_all[neg_image], image_embeds])  # (3B, N, Dv)
        itm_ids = torch.cat([ids, ids, ids_all[neg_text]])  # (3B, T)
        itm_mask = torch.cat([mask, mask, mask_all[neg_text]])
        logits = model.itm_logits(itm_images, itm_ids, itm_mask)  # (3B, 2)
        # rows whose image or caption appears everywhere in the global batch have no true negative: left out
        valid = has_negative(image_ids, image_ids_all, image_ids_all.shape[0], text_ids, text_ids_all)
        itm = itm_loss(logits, itm_targets(ids.shape[0], device=logits.device), negative_valid=valid)

        # ITG: [DEC] replaces [CLS]; the text pass reuses the query pass's keys/values.
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.text.dec_token_id
        lm_logits = model.itg_logits(dec_ids, mask, cache)  # (B, T, V)
        itg = itg_loss(lm_logits, dec_ids, mask, label_smoothing=self.label_smoothing)
        return {"itc": itc.loss, "itm": itm, "itg": itg, "loss": itc.loss + itm + itg}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        # clamp the parameter itself, as BLIP does (BLIP-2's LAVIS code never clamps temp): a clamp in
        # the forward alone would leave it stuck at a bound with zero gradient
        clamp_temperature_(self.model.temp, self.model.min_temperature, self.model.max_temperature)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = self.compute_losses(batch)
        batch_size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        self.log("train/temperature", self.model.temperature.detach(), batch_size=batch_size)
        self.log_throughput(batch_size)
        self.log_data_skips(batch)
        return self.guard_loss(losses["loss"], batch)

    # ------------------------------------------------------------------ validation: ITC retrieval
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_feats, text_feat = self.itc_features(batch["image"], batch["text"])
        self.val_retrieval.update(image_feats, text_feat, batch["image_id"].to(self.device))
        losses = self.compute_losses(batch)
        for name, value in losses.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=batch["image"].shape[0])

    def itc_features(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """The ITC embeddings: (I, Q, E) normalised query features of (I, 3, S, S) ``images`` and
        (X, E) normalised text features of X ``texts``.

        A step-like method: sharded strategies gather the task's parameters around it
        (``qformer_lightning.scale.fsdp.ROOT_FORWARD_METHODS``), so callbacks may call it through
        the strategy (``callbacks.tensorboard.call_as_step``).
        """
        ids, mask = self.text(texts, images.device)
        _, image_feats, _ = self.model.query_features(self.model.image_embeds(images))
        _, text_feat = self.model.text_features(ids, mask)
        return image_feats, text_feat

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_retrieval.compute()
        self.val_retrieval.reset()
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=False, rank_zero_only=False)

    # ------------------------------------------------------------------ predict: image-text scores
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """ITC similarity and ITM match probability of each image-text request.

        Returns:
            one record per request (its fields plus ``itc`` and ``itm``), see
            :mod:`qformer_lightning.tasks.predict`.
        """
        from qformer_lightning.tasks.predict import batch_requests, score_predictions

        requests = batch_requests(batch, score_texts=True)
        return score_predictions(self.model, self.text, batch["image"], requests)
