"""ITC-only retrieval recall over a validation set, synchronised across ranks.

Glossary: M samples seen (image-caption pairs), I distinct images, Q queries, E ITC width.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from qformer_lightning.metrics.retrieval import retrieval_metrics


class ItcRetrievalMetric(Metric):
    """Accumulates ITC features of (image, caption) pairs; computes TR/IR@K from the max-over-queries
    cosine similarity. Pairs sharing an ``image_id`` are captions of one image.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("image_feats", default=[], dist_reduce_fx="cat")
        self.add_state("text_feats", default=[], dist_reduce_fx="cat")
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")

    def update(self, image_feats: Tensor, text_feats: Tensor, image_ids: Tensor) -> None:
        """image_feats (B, Q, E), text_feats (B, E) (both L2-normalised), image_ids (B,)."""
        self.image_feats.append(image_feats.detach().float())
        self.text_feats.append(text_feats.detach().float())
        self.image_ids.append(image_ids.detach().long())

    def compute(self) -> dict[str, Tensor]:
        image_feats = dim_zero_cat(self.image_feats)  # (M, Q, E)
        text_feats = dim_zero_cat(self.text_feats)  # (M, E)
        image_ids = dim_zero_cat(self.image_ids)  # (M,)
        unique_ids, txt2img = torch.unique(image_ids, return_inverse=True)  # (I,), (M,)
        first = torch.full((len(unique_ids),), len(image_ids), dtype=torch.long, device=image_ids.device)
        first.scatter_reduce_(0, txt2img, torch.arange(len(image_ids), device=image_ids.device), reduce="amin")
        images = image_feats[first]  # (I, Q, E): one feature set per distinct image
        scores = torch.einsum("iqe,te->itq", images, text_feats).amax(dim=-1)  # (I, M)
        img2txt = [[] for _ in range(len(unique_ids))]
        for text_index, image_index in enumerate(txt2img.tolist()):
            img2txt[image_index].append(text_index)
        metrics = retrieval_metrics(scores, txt2img, img2txt)
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}
