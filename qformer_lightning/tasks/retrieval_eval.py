"""Image-text retrieval evaluation: ITC over all pairs, ITM re-ranking of the top-k, across ranks.

Glossary: I images, X texts (captions), M pairs seen by a pair-wise metric, Q queries, E ITC
width, N image tokens, Dv vision width, P candidate pairs, W world size, k candidates per query.

Protocol (ALBEF / BLIP / BLIP-2, LAVIS ``compute_sim_matrix``):

1. ITC similarity ``sim[i, x]`` = max over the Q query features of image i of the cosine with
   text x's [CLS] feature (no temperature).
2. Each image keeps its top-k texts, each text its top-k images (k = 128 in the paper); equal
   similarities at the k-th place go to the lower index (:func:`stable_topk`).
3. Each candidate pair is re-scored: ``score = ITM matched logit + sim``. Pairs outside a query's
   top-k get ``-inf`` (LAVIS: -100; only the order matters, and -inf is below every score).

Memory: the (I, X) matrices are never built (5k x 25k COCO: 0.5 GB each in fp32, and the dense
protocol needs several). :func:`itc_topk` reads the similarity in image blocks
(:func:`itc_blocks`) and keeps each query's top-k and the ITC ranks of the ground truth;
:func:`rerank` keeps the candidates' scores; the recalls come from those lists
(:func:`~qformer_lightning.metrics.retrieval.candidate_ranks`) and equal the dense ones exactly.

Vectorised and split across ranks: the candidates of both directions form one set of pairs (a
pair that is a candidate in both directions is scored once: in evaluation the ITM logit does
not depend on the direction). Each pair is scored by the rank that holds its image's ViT
features (:class:`EvalImageCache`), so the large (N, Dv) image features never travel between
ranks; only the small ITC features, the pair indices and the scores are gathered. Every rank
then holds the same candidate scores. Each rank makes the same number of model calls (shorter
ranks repeat a pair and drop the result), as sharded strategies (FSDP) require.

:class:`ItcRetrievalMetric` is the light ITC-only version for pair-wise validation sets
(stage 1's validation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from qformer_lightning.distributed import gather_concat, max_over_ranks, rank_and_world
from qformer_lightning.metrics.retrieval import (
    RECALL_CUTOFFS,
    TiePolicy,
    candidate_ranks,
    captions_per_image,
    count_above,
    recall_metrics,
)

__all__ = [
    "EvalImageCache",
    "GatheredImages",
    "ItcRetrievalMetric",
    "ItcTopK",
    "RerankedScores",
    "candidate_masks",
    "dense_blocks",
    "itc_blocks",
    "itc_topk",
    "rerank",
    "stable_topk",
]

PairScorer = Callable[[Tensor, Tensor], Tensor]
"""``(image_index (b,), text_index (b,)) -> (b,)`` ITM matched logits of b pairs."""

# Elements of one (b, X) similarity block of :func:`itc_blocks` (32 MB in fp32).
_SIM_BLOCK_ELEMENTS = 1 << 23


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
        itc = itc_topk(itc_blocks(images, text_feats), len(unique_ids), len(image_ids), 1, txt2img)
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in itc.metrics().items()}


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


# ----------------------------------------------------------------------------- ITC in blocks


def itc_blocks(image_feats: Tensor, text_feats: Tensor) -> Iterator[tuple[int, Tensor]]:
    """:func:`~qformer_lightning.losses.itc.itc_similarity`, one block of images at a time (bounded memory).

    Args:
        image_feats: (I, Q, E), L2-normalised.
        text_feats: (X, E), L2-normalised.

    Returns:
        an iterator of ``(start, sim)``: sim (b, X) float32 is rows ``start .. start + b - 1`` of
        the (I, X) similarity; the blocks come in order and cover every image once. The block
        size depends only on Q and X, so every call (and every rank) computes a value alike.
    """
    if (
        image_feats.ndim != 3 or text_feats.ndim != 2 or image_feats.shape[-1] != text_feats.shape[-1]
        or image_feats.shape[1] == 0
    ):
        raise ValueError(f"need image_feats (I, Q, E) with Q >= 1 and text_feats (X, E), got {tuple(image_feats.shape)}, {tuple(text_feats.shape)}")
    return _itc_blocks(image_feats, text_feats.float())


def _itc_blocks(image_feats: Tensor, text_feats: Tensor) -> Iterator[tuple[int, Tensor]]:
    num_images, queries, _ = image_feats.shape
    block = max(1, _SIM_BLOCK_ELEMENTS // max(1, text_feats.shape[0]))
    text_t = text_feats.T  # (E, X)
    for start in range(0, num_images, block):
        chunk = image_feats[start : start + block].float()  # (b, Q, E)
        sim = chunk[:, 0] @ text_t  # (b, X)
        cosine = torch.empty_like(sim)  # (b, X): one query's cosines, reused
        for query in range(1, queries):  # max over queries without a (b, Q, X) temporary
            torch.maximum(sim, torch.matmul(chunk[:, query], text_t, out=cosine), out=sim)
        yield start, sim


def dense_blocks(sim: Tensor, rows: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """A dense (I, X) similarity as the ``(start, (b, X))`` blocks :func:`itc_topk` reads."""
    for start in range(0, sim.shape[0], rows):
        yield start, sim[start : start + rows].float()


def stable_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row; among equal values the lower column wins.

    The result is the first k' entries of a stable descending sort, computed without sorting
    whole rows: ties at the k-th value (common with duplicated images or captions) are broken
    the same way on every device, by every block layout and on every rank.

    Args:
        x: (R, C) without NaN.
        k: entries per row (capped at C).

    Returns:
        values (R, k') and their column indices (R, k') int64, k' = min(k, C), each row by value
        (descending), then by column (ascending).
    """
    k = min(k, x.shape[1])
    values, index = x.topk(k, dim=1)  # (R, k): the right values; among ties at the k-th, any columns
    kth = values[:, -1:]  # (R, 1)
    left_out = (x == kth).sum(dim=1) > (values == kth).sum(dim=1)  # (R,): an entry equal to the k-th was not taken
    rows = left_out.nonzero().squeeze(1)
    if len(rows):
        index[rows] = _lowest_columns(x[rows], kth[rows], k)
        values[rows] = x[rows].gather(1, index[rows])
    by_column = index.sort(dim=1).indices  # (R, k)
    index, values = index.gather(1, by_column), values.gather(1, by_column)
    by_value = values.sort(dim=1, descending=True, stable=True).indices  # (R, k): equal values keep column order
    return values.gather(1, by_value), index.gather(1, by_value)


def _lowest_columns(x: Tensor, kth: Tensor, k: int) -> Tensor:
    """(R, k) ascending columns of each row's entries above ``kth`` (R, 1), then of the lowest equal ones."""
    above = x > kth  # (R, C)
    equal = x == kth  # (R, C)
    need = k - above.sum(dim=1, keepdim=True)  # (R, 1): entries equal to kth still to take
    keep = above | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))  # (R, C): exactly k per row
    return keep.nonzero()[:, 1].view(x.shape[0], k)


@dataclass
class ItcTopK:
    """What retrieval needs from the (I, X) ITC similarity, kept without the matrix.

    Lists are in :func:`stable_topk` order (similarity descending, then index ascending), so the
    first k entries of a longer list are the top-k.

    Attributes:
        i2t_values: (I, min(k, X)) each image's highest similarities over texts.
        i2t_index: (I, min(k, X)) their text indices.
        t2i_values: (X, m) each text's highest similarities over images; m = min(I, max(k, 11))
            when ranks are kept (the ITC image ranks need the top 11), else min(I, k).
        t2i_index: (X, m) their image indices.
        k: candidates per query asked for.
        text_ranks: (I,) ITC rank of each image's best true caption (exact); None without
            ground truth.
        image_ranks: (X,) ITC rank of each text's true image, capped at m - 1 (>= the largest
            recall cut-off, so every recall is exact); None without ground truth.
    """

    i2t_values: Tensor
    i2t_index: Tensor
    t2i_values: Tensor
    t2i_index: Tensor
    k: int
    text_ranks: Tensor | None = None
    image_ranks: Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.i2t_index.shape[0]

    @property
    def num_texts(self) -> int:
        return self.t2i_index.shape[0]

    def metrics(self) -> dict[str, float]:
        """ITC-only TR/IR@1/5/10 and means (percent), as ``retrieval_metrics`` on the dense matrix."""
        if self.text_ranks is None or self.image_ranks is None:
            raise ValueError("these ITC top-k lists were built without txt2img: pass it to itc_topk for metrics")
        return recall_metrics(self.text_ranks, self.image_ranks)


def itc_topk(
    blocks: Iterable[tuple[int, Tensor]],
    num_images: int,
    num_texts: int,
    k: int,
    txt2img: Tensor | Sequence[int] | None = None,
    ties: TiePolicy = "pessimistic",
) -> ItcTopK:
    """One pass over the ITC similarity in image blocks: per-query top-k and the ITC ranks.

    Each image's row is complete in its block (its top-k texts and the rank of its best true
    caption come from it directly); each text's top images are merged block by block into a
    running list. Memory: one block and the (I + X) x k lists, never the (I, X) matrix.

    Args:
        blocks: ``(start, sim (b, X))`` in image order covering [0, I) (:func:`itc_blocks`).
        num_images: I.
        num_texts: X.
        k: candidates per query (capped at X for images and at I for texts).
        txt2img: (X,) the true image of each text; with it the ITC ranks are kept too.
        ties: how equal scores rank (see :mod:`qformer_lightning.metrics.retrieval`).

    Raises:
        ValueError: blocks out of order, of the wrong width or not covering every image; NaN
            similarities; ``txt2img`` out of range or leaving an image without a caption.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    if num_images < 1 or num_texts < 1:
        raise ValueError(f"retrieval needs at least one image and one text, got {num_images} and {num_texts}")
    depth = min(num_images, k if txt2img is None else max(k, max(RECALL_CUTOFFS) + 1))
    i2t_values, i2t_index, text_ranks = [], [], []
    run_values = run_index = true_score = truth = None
    covered = 0
    for start, sim in blocks:
        if start != covered or sim.ndim != 2 or sim.shape[1] != num_texts or start + len(sim) > num_images:
            raise ValueError(f"ITC block at image {start} has shape {tuple(sim.shape)}: expected rows from {covered} of (b, {num_texts})")
        if torch.isnan(sim).any():
            raise ValueError(f"the ITC similarity of images {start}..{start + len(sim) - 1} holds NaN: check their features")
        if run_values is None:  # first block: everything lives on its device
            device = sim.device
            run_values = sim.new_empty(num_texts, 0)  # (X, 0)
            run_index = torch.empty(num_texts, 0, dtype=torch.long, device=device)
            if txt2img is not None:
                truth = torch.as_tensor(txt2img, dtype=torch.long).to(device)
                if truth.shape != (num_texts,):
                    raise ValueError(f"txt2img must have shape ({num_texts},), got {tuple(truth.shape)}")
                captions_per_image(truth, num_images)
                true_score = torch.full((num_texts,), float("nan"), device=device)
        rows = torch.arange(start, start + len(sim), device=sim.device)  # (b,)
        values, index = stable_topk(sim, k)  # (b, k_i)
        i2t_values.append(values), i2t_index.append(index)
        if truth is not None:
            text_ranks.append(_full_row_text_ranks(sim, rows, truth, ties))
            here = ((truth >= start) & (truth < start + len(sim))).nonzero().squeeze(1)  # texts of these images
            true_score[here] = sim[truth[here] - start, here]
        kept = run_index.shape[1]
        merged = torch.cat([run_values, sim.T], dim=1)  # (X, m + b): the kept images (earlier) first
        run_values, position = stable_topk(merged, depth)  # (X, m'): equal values: the earlier image wins
        from_run = run_index.gather(1, position.clamp(max=max(kept - 1, 0))) if kept else position
        run_index = torch.where(position < kept, from_run, start + position - kept)  # (X, m') image indices
        del merged
        covered += len(sim)
    if covered != num_images:
        raise ValueError(f"the ITC blocks covered {covered} of {num_images} images")
    image_ranks = None
    if truth is not None:
        image_ranks = count_above(run_values, run_index == truth[:, None], true_score, ties)  # (X,)
        if depth < num_images:  # only the top `depth` images are known: larger ranks are all `depth - 1`
            image_ranks = image_ranks.clamp(max=depth - 1)
    return ItcTopK(
        torch.cat(i2t_values), torch.cat(i2t_index), run_values, run_index, k,
        torch.cat(text_ranks) if truth is not None else None, image_ranks,
    )  # fmt: skip


def _full_row_text_ranks(sim: Tensor, rows: Tensor, txt2img: Tensor, ties: TiePolicy) -> Tensor:
    """(b,) rank of each image's best true caption from its complete row ``sim`` (b, X)."""
    is_true = txt2img[None, :] == rows[:, None]  # (b, X)
    no_outside = torch.zeros(len(rows), dtype=torch.long, device=sim.device)
    return candidate_ranks(sim, is_true, no_outside, sim.shape[1], float("-inf"), ties)


def candidate_masks(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Dense masks of the top-k candidates of each query (small matrices and tests).

    Args:
        sim: (I, X) ITC similarities.
        k: candidates per query; capped at X for images and at I for texts.

    Returns:
        i2t (I, X) bool: text x is among image i's top-k texts;
        t2i (I, X) bool: image i is among text x's top-k images (ties: :func:`stable_topk`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    i2t = torch.zeros_like(sim, dtype=torch.bool)
    i2t.scatter_(1, stable_topk(sim, k)[1], True)
    t2i = torch.zeros_like(sim.T, dtype=torch.bool)  # (X, I)
    t2i.scatter_(1, stable_topk(sim.T, k)[1], True)
    return i2t, t2i.T


# ----------------------------------------------------------------------------- re-ranking


@dataclass
class RerankedScores:
    """Final retrieval scores of the candidates (every rank holds the same).

    Every pair outside a query's candidates scores ``fill``. ``i2t``, ``t2i`` and ``itm`` build
    the dense matrices from these lists: for small splits and tests only.

    Attributes:
        i2t_index: (I, ki) each image's candidate texts (its ITC top-k, ki = min(k, X)).
        i2t_scores: (I, ki) their ITM matched logit + ITC similarity.
        t2i_index: (X, kt) each text's candidate images (kt = min(k, I)).
        t2i_scores: (X, kt) their ITM + ITC scores.
        pairs: (P, 2) the candidate pairs of both directions, once each, image-major: [image, text].
        pair_itm: (P,) their ITM matched logits.
        fill: score of the pairs outside a query's candidates.
    """

    i2t_index: Tensor
    i2t_scores: Tensor
    t2i_index: Tensor
    t2i_scores: Tensor
    pairs: Tensor
    pair_itm: Tensor
    fill: float = float("-inf")

    @property
    def num_images(self) -> int:
        return self.i2t_index.shape[0]

    @property
    def num_texts(self) -> int:
        return self.t2i_index.shape[0]

    @property
    def num_pairs(self) -> int:
        """P, candidate pairs scored by ITM over all ranks."""
        return len(self.pairs)

    def ranks(self, txt2img: Tensor | Sequence[int], ties: TiePolicy = "pessimistic") -> tuple[Tensor, Tensor]:
        """Ranks of the ground truth: text_ranks (I,) and image_ranks (X,), as on the dense matrices.

        Args:
            txt2img: (X,) the true image of each text (an image's captions are its true texts).
            ties: see :mod:`qformer_lightning.metrics.retrieval`.
        """
        device = self.i2t_index.device
        txt2img = torch.as_tensor(txt2img, dtype=torch.long).to(device)
        if txt2img.shape != (self.num_texts,):
            raise ValueError(f"txt2img must have shape ({self.num_texts},), got {tuple(txt2img.shape)}")
        captions = captions_per_image(txt2img, self.num_images)  # (I,)
        images = torch.arange(self.num_images, device=device)
        is_true = txt2img[self.i2t_index] == images[:, None]  # (I, ki)
        text_ranks = candidate_ranks(
            self.i2t_scores, is_true, captions - is_true.sum(dim=1), self.num_texts, self.fill, ties
        )
        is_true = self.t2i_index == txt2img[:, None]  # (X, kt)
        image_ranks = candidate_ranks(self.t2i_scores, is_true, 1 - is_true.sum(dim=1), self.num_images, self.fill, ties)
        return text_ranks, image_ranks

    def metrics(self, txt2img: Tensor | Sequence[int], ties: TiePolicy = "pessimistic") -> dict[str, float]:
        """Re-ranked TR/IR@1/5/10 and means (percent), equal to ``retrieval_metrics(i2t, ..., t2i)``."""
        return recall_metrics(*self.ranks(txt2img, ties))

    @property
    def i2t(self) -> Tensor:
        """Dense (I, X) image-to-text scores, ``fill`` outside the candidates (small splits only)."""
        dense = self.i2t_scores.new_full((self.num_images, self.num_texts), self.fill)
        return dense.scatter_(1, self.i2t_index, self.i2t_scores)

    @property
    def t2i(self) -> Tensor:
        """Dense (X, I) text-to-image scores, ``fill`` outside the candidates (small splits only)."""
        dense = self.t2i_scores.new_full((self.num_texts, self.num_images), self.fill)
        return dense.scatter_(1, self.t2i_index, self.t2i_scores)

    @property
    def itm(self) -> Tensor:
        """Dense (I, X) ITM matched logits of the candidate pairs, NaN elsewhere (small splits only)."""
        dense = self.pair_itm.new_full((self.num_images, self.num_texts), float("nan"))
        dense[self.pairs[:, 0], self.pairs[:, 1]] = self.pair_itm
        return dense


def rerank(
    itc: ItcTopK | Tensor,
    k: int,
    score_pairs: PairScorer,
    owner: Tensor | None = None,
    batch_size: int = 512,
    fill: float = float("-inf"),
) -> RerankedScores:
    """Re-score the top-k candidates of both directions with ITM (collective when distributed).

    Args:
        itc: the ITC top-k lists (:func:`itc_topk`), the same on every rank; or a dense (I, X)
            similarity (small splits and tests).
        k: candidates per query (paper: 128); at most ``itc.k``.
        score_pairs: ITM matched logits of a batch of pairs (global image and text indices);
            called only with images owned by this rank, plus repeats of such a pair (or of the
            first candidate pair when this rank owns none) to equalise the number of calls.
        owner: (I,) rank that scores the pairs of each image; ``None``: this rank scores all.
        batch_size: pairs per ``score_pairs`` call.
        fill: score of the pairs outside a query's top-k.

    Raises:
        RuntimeError: a candidate pair that no rank (or more than one) scored: ``owner`` does
            not cover each image once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(itc, Tensor):
        if itc.ndim != 2:
            raise ValueError(f"a dense ITC similarity must be (I, X), got {tuple(itc.shape)}")
        itc = itc_topk(dense_blocks(itc), itc.shape[0], itc.shape[1], k)
    elif k > itc.k:
        raise ValueError(f"k={k} but the ITC top-k lists hold only {itc.k} candidates per query")
    rank, _ = rank_and_world()
    num_images, num_texts = itc.num_images, itc.num_texts
    device = itc.i2t_index.device
    ki, kt = min(k, num_texts), min(k, num_images)
    i2t_code = torch.arange(num_images, device=device)[:, None] * num_texts + itc.i2t_index[:, :ki]  # (I, ki)
    t2i_code = itc.t2i_index[:, :kt] * num_texts + torch.arange(num_texts, device=device)[:, None]  # (X, kt)
    codes = torch.unique(torch.cat([i2t_code.flatten(), t2i_code.flatten()]))  # (P,) sorted = image-major
    pairs = torch.stack([codes // num_texts, codes % num_texts], dim=1)  # (P, 2): [image, text]
    mine = pairs if owner is None else pairs[owner[pairs[:, 0]] == rank]  # (P_r, 2)
    mine_scores = _score_in_batches(mine, pairs[:1], score_pairs, batch_size, device)  # (P_r,)
    if owner is not None:
        mine, mine_scores = gather_concat(mine), gather_concat(mine_scores)  # (P, 2), (P,) in rank order
    got = mine[:, 0] * num_texts + mine[:, 1]  # (P,)
    order = got.argsort()
    if len(got) != len(codes) or not torch.equal(got[order], codes):
        raise RuntimeError(
            "some ITM candidate pairs were scored by no rank or by several: the image owner map does not cover "
            "each image once"
        )
    pair_itm = mine_scores[order]  # (P,) in the order of `pairs`
    i2t_scores = itc.i2t_values[:, :ki] + pair_itm[torch.searchsorted(codes, i2t_code)]  # (I, ki)
    t2i_scores = itc.t2i_values[:, :kt] + pair_itm[torch.searchsorted(codes, t2i_code)]  # (X, kt)
    return RerankedScores(itc.i2t_index[:, :ki], i2t_scores, itc.t2i_index[:, :kt], t2i_scores, pairs, pair_itm, fill)


def _score_in_batches(mine: Tensor, first: Tensor, score_pairs: PairScorer, batch_size: int, device: torch.device) -> Tensor:
    """ITM logits (P_r,) of this rank's pairs ``mine`` (P_r, 2), with as many calls as the busiest rank.

    A rank with fewer batches repeats one of its pairs (or ``first`` (1, 2) when it has none) and
    drops the result, as sharded strategies (FSDP) require.
    """
    calls = max_over_ranks(math.ceil(len(mine) / batch_size), device)
    filler = mine[:1] if len(mine) else first
    scores = []
    for call in range(calls):
        chunk = mine[call * batch_size : (call + 1) * batch_size]  # (b, 2)
        if len(chunk) == 0:  # this rank is done: keep the number of model calls equal
            score_pairs(filler[:, 0], filler[:, 1])
            continue
        scores.append(score_pairs(chunk[:, 0], chunk[:, 1]).float())
    return torch.cat(scores) if scores else torch.empty(0, device=device)
