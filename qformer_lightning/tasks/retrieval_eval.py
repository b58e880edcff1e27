"""Image-text retrieval evaluation: ITC over all pairs, ITM re-ranking of the top-k, across ranks.

Glossary: I images, X texts (captions), M pairs seen by a pair-wise metric, Q queries, E ITC
width, N image tokens, Dv vision width, P candidate pairs, W world size, k candidates per query.

Protocol (ALBEF / BLIP / BLIP-2, LAVIS ``compute_sim_matrix``):

1. ITC similarity ``sim[i, x]`` = max over the Q query features of image i of the cosine with
   text x's [CLS] feature (no temperature).
2. Each image keeps its top-k texts, each text its top-k images (k = 128 in the paper).
3. Each candidate pair is re-scored: ``score = ITM matched logit + sim``. Pairs outside a query's
   top-k get ``-inf`` (LAVIS: -100; only the order matters, and -inf is below every score).

Vectorised and split across ranks: the candidates of both directions form one set of pairs (a
pair that is a candidate in both directions is scored once: in evaluation the ITM logit does
not depend on the direction). Each pair is scored by the rank that holds its image's ViT
features (:class:`EvalImageCache`), so the large (N, Dv) image features never travel between
ranks; only the small ITC features, the pair indices and the scores are gathered. Every rank
then holds the same score matrices. Each rank makes the same number of model calls (shorter
ranks repeat a pair and drop the result), as sharded strategies (FSDP) require.

:class:`ItcRetrievalMetric` is the light ITC-only version for pair-wise validation sets
(stage 1's validation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from qformer_lightning.losses.distributed import rank_and_world
from qformer_lightning.metrics.retrieval import retrieval_metrics

__all__ = [
    "EvalImageCache",
    "GatheredImages",
    "ItcRetrievalMetric",
    "RerankedScores",
    "candidate_masks",
    "gather_concat",
    "itc_similarity",
    "max_over_ranks",
    "rerank",
]

PairScorer = Callable[[Tensor, Tensor], Tensor]
"""``(image_index (b,), text_index (b,)) -> (b,)`` ITM matched logits of b pairs."""

# Elements of the (block, Q, X) temporary in :func:`itc_similarity` (256 MB in fp32).
_SIM_BLOCK_ELEMENTS = 1 << 26


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
        scores = itc_similarity(images, text_feats)  # (I, M)
        img2txt = [[] for _ in range(len(unique_ids))]
        for text_index, image_index in enumerate(txt2img.tolist()):
            img2txt[image_index].append(text_index)
        metrics = retrieval_metrics(scores, txt2img, img2txt)
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- collectives


def gather_concat(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order; first dims may differ.

    (B_r, ...) on rank r -> (sum_r B_r, ...) on every rank. Without a process group (or with
    one process) ``x`` itself is returned. Every rank must call it (a collective).
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    if x.dtype == torch.bool:  # not every backend gathers bool
        return gather_concat(x.to(torch.uint8)).bool()
    x = x.contiguous()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))  # (B_max, ...)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all ranks (``value`` itself without a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# ----------------------------------------------------------------------------- image cache


@dataclass
class GatheredImages:
    """What every rank knows about the evaluation images after :meth:`EvalImageCache.gather`.

    Attributes:
        feats: (I, Q, E) ITC features of every image (zeros where unseen), float32.
        seen: (I,) bool, the image was embedded by some rank.
        owner: (I,) long, the lowest rank holding the image's ViT features (W where unseen).
        local_row: (I,) long, row of the image in this rank's ``embeds`` (-1 where not local).
        embeds: (L, N, Dv) this rank's ViT features (after ``ln_vision``), in insertion order.
    """

    feats: Tensor
    seen: Tensor
    owner: Tensor
    local_row: Tensor
    embeds: Tensor


class EvalImageCache:
    """Per-rank store of the evaluation images: ViT features (for ITM) and ITC features.

    Args:
        on_cpu: keep the (L, N, Dv) ViT features in host memory (ViT-g at 364 px: 3.8 MB per
            image in fp32); ITM batches are copied to the device as they are scored.
    """

    def __init__(self, on_cpu: bool = False) -> None:
        self.on_cpu = on_cpu
        self.reset()

    def reset(self) -> None:
        """Forget every stored image (call at the start of an evaluation epoch)."""
        self._index: list[Tensor] = []
        self._embeds: list[Tensor] = []
        self._feats: list[Tensor] = []

    def __len__(self) -> int:
        return sum(len(i) for i in self._index)

    def add(self, index: Tensor, image_embeds: Tensor, image_feats: Tensor) -> None:
        """Store a batch: ``index`` (B,) dataset positions, ``image_embeds`` (B, N, Dv), ``image_feats`` (B, Q, E)."""
        if index.ndim != 1 or index.shape[0] != image_embeds.shape[0] or index.shape[0] != image_feats.shape[0]:
            raise ValueError(
                f"index {tuple(index.shape)}, image_embeds {tuple(image_embeds.shape)} and image_feats "
                f"{tuple(image_feats.shape)} must share their first dimension"
            )
        self._index.append(index.detach().to(image_feats.device, torch.long))
        self._embeds.append(image_embeds.detach().cpu() if self.on_cpu else image_embeds.detach())
        self._feats.append(image_feats.detach().float())

    def gather(self, num_images: int, device: torch.device | str) -> GatheredImages:
        """Share the ITC features and the ownership of every image with all ranks (a collective).

        Args:
            num_images: I, the size of the evaluation dataset.
            device: where the gathered tensors live (the model's device).

        Raises:
            ValueError: a stored index outside [0, I), or no image stored on any rank.
        """
        rank, world = rank_and_world()
        device = torch.device(device)
        if self._index:
            index = torch.cat(self._index).to(device)  # (L,)
            feats = torch.cat(self._feats).to(device)  # (L, Q, E)
            embeds = torch.cat(self._embeds)  # (L, N, Dv)
        else:
            index = torch.empty(0, dtype=torch.long, device=device)
            feats = torch.empty(0, 0, 0, device=device)
            embeds = torch.empty(0, 0, 0)
        if len(index) and (index.min() < 0 or index.max() >= num_images):
            raise ValueError(f"image indices {index.min().item()}..{index.max().item()} outside [0, {num_images})")
        # ranks with nothing stored still take part in the collectives with empty tensors of the right shape
        shape = torch.tensor(list(feats.shape[1:]) if len(index) else [0, 0], dtype=torch.long, device=device)
        width = max_over_ranks(int(shape[0]), device), max_over_ranks(int(shape[1]), device)
        if width[0] == 0:
            raise ValueError("no evaluation image was embedded on any rank")
        if not len(index):
            feats = torch.empty(0, *width, device=device)
        all_index = gather_concat(index)  # (sum L,)
        all_rank = gather_concat(torch.full_like(index, rank))  # (sum L,)
        all_feats = gather_concat(feats)  # (sum L, Q, E)
        owner = torch.full((num_images,), world, dtype=torch.long, device=device)
        owner.scatter_reduce_(0, all_index, all_rank, reduce="amin")
        from_owner = all_rank == owner[all_index]  # keep the owner's copy of a padded duplicate
        image_feats = torch.zeros(num_images, *width, device=device)
        image_feats[all_index[from_owner]] = all_feats[from_owner]
        local_row = torch.full((num_images,), -1, dtype=torch.long, device=device)
        local_row[index] = torch.arange(len(index), device=device)
        return GatheredImages(image_feats, owner < world, owner, local_row, embeds)


# ----------------------------------------------------------------------------- scoring


def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Max over queries of the cosine similarity, in image blocks (bounded memory).

    Args:
        image_feats: (I, Q, E), L2-normalised.
        text_feats: (X, E), L2-normalised.

    Returns:
        (I, X) float32.
    """
    if image_feats.ndim != 3 or text_feats.ndim != 2 or image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(f"need image_feats (I, Q, E) and text_feats (X, E), got {tuple(image_feats.shape)}, {tuple(text_feats.shape)}")
    num_images, queries, _ = image_feats.shape
    text_feats = text_feats.float()
    block = max(1, _SIM_BLOCK_ELEMENTS // max(1, queries * text_feats.shape[0]))
    out = torch.empty(num_images, text_feats.shape[0], device=image_feats.device)
    for start in range(0, num_images, block):
        chunk = image_feats[start : start + block].float()  # (b, Q, E)
        out[start : start + block] = torch.einsum("iqe,xe->iqx", chunk, text_feats).amax(dim=1)  # (b, X)
    return out


def candidate_masks(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k candidates of each query.

    Args:
        sim: (I, X) ITC similarities.
        k: candidates per query; capped at X for images and at I for texts.

    Returns:
        i2t (I, X) bool: text x is among image i's top-k texts;
        t2i (I, X) bool: image i is among text x's top-k images.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_images, num_texts = sim.shape
    i2t = torch.zeros_like(sim, dtype=torch.bool)
    i2t.scatter_(1, sim.topk(min(k, num_texts), dim=1).indices, True)
    t2i = torch.zeros_like(sim, dtype=torch.bool)
    t2i.scatter_(0, sim.topk(min(k, num_images), dim=0).indices, True)
    return i2t, t2i


@dataclass
class RerankedScores:
    """Final retrieval scores (every rank holds the same).

    Attributes:
        i2t: (I, X) image-to-text scores: ITM + ITC on each image's top-k texts, -inf elsewhere.
        t2i: (X, I) text-to-image scores: ITM + ITC on each text's top-k images, -inf elsewhere.
        itm: (I, X) ITM matched logits of the candidate pairs, NaN elsewhere.
        num_pairs: P, candidate pairs scored by ITM over all ranks.
    """

    i2t: Tensor
    t2i: Tensor
    itm: Tensor
    num_pairs: int


def rerank(
    sim: Tensor,
    k: int,
    score_pairs: PairScorer,
    owner: Tensor | None = None,
    batch_size: int = 512,
    fill: float = float("-inf"),
) -> RerankedScores:
    """Re-score the top-k candidates of both directions with ITM (collective when distributed).

    Args:
        sim: (I, X) ITC similarities, the same on every rank.
        k: candidates per query (paper: 128).
        score_pairs: ITM matched logits of a batch of pairs (global image and text indices);
            called only with images owned by this rank, plus repeats of such a pair (or of the
            first candidate pair when this rank owns none) to equalise the number of calls.
        owner: (I,) rank that scores the pairs of each image; ``None``: this rank scores all.
        batch_size: pairs per ``score_pairs`` call.
        fill: score of the pairs outside a query's top-k.

    Raises:
        RuntimeError: a candidate pair that no rank scored (``owner`` does not cover it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, _ = rank_and_world()
    i2t, t2i = candidate_masks(sim, k)
    pairs = (i2t | t2i).nonzero()  # (P, 2): image-major order, [image, text]
    mine = pairs if owner is None else pairs[owner[pairs[:, 0]] == rank]  # (P_r, 2)
    calls = max_over_ranks(math.ceil(len(mine) / batch_size), sim.device)
    filler = mine[:1] if len(mine) else pairs[:1]
    scores = []
    for call in range(calls):
        chunk = mine[call * batch_size : (call + 1) * batch_size]
        if len(chunk) == 0:  # this rank is done: keep the number of model calls equal
            score_pairs(filler[:, 0], filler[:, 1])
            continue
        scores.append(score_pairs(chunk[:, 0], chunk[:, 1]).float())
    mine_scores = torch.cat(scores) if scores else sim.new_empty(0)
    all_pairs = gather_concat(mine)  # (P, 2)
    all_scores = gather_concat(mine_scores)  # (P,)
    itm = torch.full_like(sim, float("nan"))
    itm[all_pairs[:, 0], all_pairs[:, 1]] = all_scores
    candidates = i2t | t2i
    if torch.isnan(itm[candidates]).any():
        raise RuntimeError("some ITM candidate pairs were scored by no rank: the image owner map does not cover them")
    combined = sim + itm  # (I, X), NaN outside the candidates
    return RerankedScores(
        i2t=torch.where(i2t, combined, fill),
        t2i=torch.where(t2i, combined, fill).T.contiguous(),
        itm=itm,
        num_pairs=len(all_pairs),
    )
