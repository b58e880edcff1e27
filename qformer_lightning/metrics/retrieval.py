"""Image-text retrieval recall (TR@K / IR@K) as defined by ALBEF / BLIP / BLIP-2.

Glossary: I images, X texts (captions), K recall cut-off.

- Text retrieval (image -> text): an image has several true captions; its rank is the rank of
  its best-ranked true caption among all X texts. TR@K = % of images whose rank is < K.
- Image retrieval (text -> image): a text has one true image. IR@K = % of texts whose image
  has rank < K.
- ``txt_r_mean``/``img_r_mean`` average R@1/5/10 of a direction; ``r_mean`` averages the two.

Ties. The reference code ranks with ``np.argsort(scores)[::-1]``, whose order among equal
scores is an implementation detail of numpy's sort. Here ties are resolved explicitly:

- ``ties="pessimistic"`` (default): every *wrong* candidate scoring exactly as high as the
  best true one is ranked above it: rank = #{wrong j : s_j >= s_true}.
- ``ties="optimistic"``: only strictly higher wrong candidates count: rank = #{j : s_j > s_true}.

True captions of the same image never push each other down (only the best one matters). In
practice ties come from the fill value of the candidates left out of ITM re-ranking (BLIP fills
them with -100); they cannot change R@1/5/10 as long as at least 10 candidates were re-ranked.

Computation is on tensors: ranks are comparison counts (no per-query Python loop), on the
scores' device. :func:`retrieval_ranks` takes dense score matrices (in row blocks);
:func:`candidate_ranks` takes only each query's scored candidates, the other items of its row
holding one fill value (the ITM re-ranked scores of
:mod:`qformer_lightning.tasks.retrieval_eval`, which never builds the (I, X) matrices). Both
count with :func:`count_above`, so they agree exactly on the same scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "RECALL_CUTOFFS",
    "candidate_ranks",
    "captions_per_image",
    "count_above",
    "recall_metrics",
    "retrieval_metrics",
    "retrieval_ranks",
]

RECALL_CUTOFFS = (1, 5, 10)
TiePolicy = Literal["pessimistic", "optimistic"]

# Rows per block when counting: bounds the temporary (rows, X) boolean tensors.
_ROW_BLOCK = 1024


def _check_scores(name: str, scores: Tensor, shape: tuple[int, int]) -> None:
    if scores.ndim != 2 or tuple(scores.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating point tensor, got {scores.dtype}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN scores; ranks would be undefined")


def _text_gt_mask(img2txt: Sequence[Sequence[int]], num_texts: int, device: torch.device) -> Tensor:
    """(I, X) bool, True where text x is a true caption of image i."""
    counts = [len(texts) for texts in img2txt]
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"img2txt lists no caption for image(s) {empty[:10]} (of {len(empty)})")
    cols = torch.tensor([t for texts in img2txt for t in texts], dtype=torch.long)
    if cols.min() < 0 or cols.max() >= num_texts:
        raise ValueError(f"img2txt holds text indices outside [0, {num_texts}): {cols.min()}..{cols.max()}")
    rows = torch.repeat_interleave(torch.arange(len(img2txt)), torch.tensor(counts))
    mask = torch.zeros(len(img2txt), num_texts, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.to(device)


def count_above(scores: Tensor, exclude: Tensor, best: Tensor, ties: TiePolicy) -> Tensor:
    """Per row, how many non-excluded items outrank the row's best true score.

    Args:
        scores: (R, C) scores.
        exclude: (R, C) bool, items not counted (the true items of the row).
        best: (R,) the score of the row's best true item.
        ties: ``"pessimistic"`` counts items with ``score >= best``; ``"optimistic"`` only ``score > best``.

    Returns:
        (R,) int64 counts.
    """
    above = scores >= best[:, None] if ties == "pessimistic" else scores > best[:, None]  # (R, C)
    return (above & ~exclude).sum(dim=1)


def candidate_ranks(
    scores: Tensor, is_true: Tensor, true_outside: Tensor, num_items: int, fill: float, ties: TiePolicy = "pessimistic"
) -> Tensor:
    """0-based rank of each query's best true item when only its candidates were scored.

    Every item of a row that is not among its C candidates scores ``fill``. The result equals
    :func:`retrieval_ranks` on the dense (R, num_items) row holding the candidates' scores and
    ``fill`` elsewhere.

    Args:
        scores: (R, C) scores of each query's candidates.
        is_true: (R, C) bool, the candidate is a true item of the query.
        true_outside: (R,) int64, true items of the query that are not among its candidates.
        num_items: items per row (X for image queries, I for text queries); at least C.
        fill: score of the items outside the candidates.
        ties: see the module docstring.

    Returns:
        (R,) int64 ranks.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    if scores.shape != is_true.shape or true_outside.shape != scores.shape[:1] or num_items < scores.shape[1]:
        raise ValueError(
            f"need scores and is_true (R, C) with C <= num_items and true_outside (R,), got {tuple(scores.shape)}, "
            f"{tuple(is_true.shape)}, {tuple(true_outside.shape)}, num_items {num_items}"
        )
    if torch.isnan(scores).any():
        raise ValueError("candidate scores contain NaN; ranks would be undefined")
    fill_t = scores.new_tensor(fill)
    best = scores.masked_fill(~is_true, float("-inf")).amax(dim=1)  # (R,)
    best = torch.where(true_outside > 0, torch.maximum(best, fill_t), best)  # a true item left outside scores fill
    wrong_outside = num_items - scores.shape[1] - true_outside  # (R,)
    fill_counts = fill_t >= best if ties == "pessimistic" else fill_t > best  # (R,)
    return count_above(scores, is_true, best, ties) + wrong_outside * fill_counts


def captions_per_image(txt2img: Tensor, num_images: int) -> Tensor:
    """(I,) number of texts of each image, from ``txt2img`` (X,).

    Raises:
        ValueError: an index outside [0, I), or an image without a caption (its rank is undefined).
    """
    if txt2img.ndim != 1 or (len(txt2img) and (txt2img.min() < 0 or txt2img.max() >= num_images)):
        raise ValueError(f"txt2img must be a (X,) tensor of image indices in [0, {num_images})")
    counts = torch.bincount(txt2img, minlength=num_images)  # (I,)
    empty = (counts == 0).nonzero().squeeze(1)
    if len(empty):
        raise ValueError(f"img2txt lists no caption for image(s) {empty[:10].tolist()} (of {len(empty)})")
    return counts


@torch.no_grad()
def retrieval_ranks(
    score_i2t: Tensor,
    txt2img: Tensor | Sequence[int],
    img2txt: Sequence[Sequence[int]],
    score_t2i: Tensor | None = None,
    ties: TiePolicy = "pessimistic",
) -> tuple[Tensor, Tensor]:
    """0-based ranks of the ground truth in both directions, from dense score matrices.

    Args:
        score_i2t: (I, X) image-to-text scores (higher = more similar).
        txt2img: (X,) index of the true image of each text.
        img2txt: I lists of the true text indices of each image (at least one each).
        score_t2i: (X, I) text-to-image scores; defaults to ``score_i2t.T``. Pass it when the
            two directions were re-ranked separately (ITM over each query's own top-k).
        ties: ``"pessimistic"`` or ``"optimistic"`` (module docstring).

    Returns:
        text_ranks (I,) int64: rank of each image's best true caption;
        image_ranks (X,) int64: rank of each text's true image.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    if score_i2t.ndim != 2:
        raise ValueError(f"score_i2t must be 2-D (images, texts), got shape {tuple(score_i2t.shape)}")
    num_images, num_texts = score_i2t.shape
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got score_i2t {tuple(score_i2t.shape)}")
    _check_scores("score_i2t", score_i2t, (num_images, num_texts))
    score_t2i = score_i2t.T if score_t2i is None else score_t2i
    _check_scores("score_t2i", score_t2i, (num_texts, num_images))
    if len(img2txt) != num_images:
        raise ValueError(f"img2txt has {len(img2txt)} entries but score_i2t has {num_images} images")
    device = score_i2t.device
    txt2img = torch.as_tensor(txt2img, dtype=torch.long).to(score_t2i.device)
    if txt2img.shape != (num_texts,):
        raise ValueError(f"txt2img must have shape ({num_texts},), got {tuple(txt2img.shape)}")
    if (txt2img.min() < 0 or txt2img.max() >= num_images):
        raise ValueError(f"txt2img holds image indices outside [0, {num_images})")

    # Image -> text: compare every text with the best true caption of its row.
    gt_mask = _text_gt_mask(img2txt, num_texts, device)  # (I, X)
    text_ranks = torch.empty(num_images, dtype=torch.long, device=device)
    for start in range(0, num_images, _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        scores, is_true = score_i2t[rows], gt_mask[rows]  # (b, X)
        no_outside = torch.zeros(len(scores), dtype=torch.long, device=device)
        text_ranks[rows] = candidate_ranks(scores, is_true, no_outside, num_texts, float("-inf"), ties)

    # Text -> image: one true image per text.
    image_ranks = torch.empty(num_texts, dtype=torch.long, device=score_t2i.device)
    images = torch.arange(num_images, device=score_t2i.device)
    for start in range(0, num_texts, _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        scores = score_t2i[rows]  # (b, I)
        is_true = images[None, :] == txt2img[rows, None]  # (b, I)
        no_outside = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
        image_ranks[rows] = candidate_ranks(scores, is_true, no_outside, num_images, float("-inf"), ties)
    return text_ranks, image_ranks


def _recall(ranks: Tensor, cutoff: int) -> float:
    """Percent of ranks below ``cutoff``."""
    return 100.0 * (ranks < cutoff).double().mean().item()


def recall_metrics(text_ranks: Tensor, image_ranks: Tensor) -> dict[str, float]:
    """TR@1/5/10 and IR@1/5/10 in percent from 0-based ranks, with their means.

    Args:
        text_ranks: (I,) rank of each image's best true caption (ranks at or above the largest
            cut-off may be capped there: the figures only ask ``rank < K``).
        image_ranks: (X,) rank of each text's true image.

    Returns:
        ``txt_r1 txt_r5 txt_r10 txt_r_mean img_r1 img_r5 img_r10 img_r_mean r_mean`` as floats.
    """
    result: dict[str, float] = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        recalls = [_recall(ranks, k) for k in RECALL_CUTOFFS]
        result.update({f"{prefix}_r{k}": r for k, r in zip(RECALL_CUTOFFS, recalls)})
        result[f"{prefix}_r_mean"] = sum(recalls) / len(recalls)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def retrieval_metrics(
    score_i2t: Tensor,
    txt2img: Tensor | Sequence[int],
    img2txt: Sequence[Sequence[int]],
    score_t2i: Tensor | None = None,
    ties: TiePolicy = "pessimistic",
) -> dict[str, float]:
    """TR@1/5/10 and IR@1/5/10 in percent (ALBEF/BLIP definition), with their means.

    Args: as :func:`retrieval_ranks` (``score_i2t`` (I, X), ``txt2img`` (X,), ``img2txt`` I lists,
        optional ``score_t2i`` (X, I), ``ties``).

    Returns:
        ``txt_r1 txt_r5 txt_r10 txt_r_mean img_r1 img_r5 img_r10 img_r_mean r_mean`` as floats.
    """
    return recall_metrics(*retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i, ties))
