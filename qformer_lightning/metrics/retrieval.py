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

Computation is dense on tensors: ranks are comparison counts over row blocks of the score
matrix (no per-query Python loop), on the scores' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["RECALL_CUTOFFS", "retrieval_metrics", "retrieval_ranks"]

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


@torch.no_grad()
def retrieval_ranks(
    score_i2t: Tensor,
    txt2img: Tensor | Sequence[int],
    img2txt: Sequence[Sequence[int]],
    score_t2i: Tensor | None = None,
    ties: TiePolicy = "pessimistic",
) -> tuple[Tensor, Tensor]:
    """0-based ranks of the ground truth in both directions.

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
    pessimistic = ties == "pessimistic"

    # Image -> text: compare every text with the best true caption of its row.
    gt_mask = _text_gt_mask(img2txt, num_texts, device)  # (I, X)
    text_ranks = torch.empty(num_images, dtype=torch.long, device=device)
    for start in range(0, num_images, _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        scores, is_true = score_i2t[rows], gt_mask[rows]  # (b, X)
        best_true = scores.masked_fill(~is_true, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
        above = scores >= best_true if pessimistic else scores > best_true  # (b, X)
        text_ranks[rows] = (above & ~is_true).sum(dim=1)

    # Text -> image: one true image per text.
    image_ranks = torch.empty(num_texts, dtype=torch.long, device=score_t2i.device)
    for start in range(0, num_texts, _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        scores = score_t2i[rows]  # (b, I)
        true_score = scores.gather(1, txt2img[rows, None])  # (b, 1)
        if pessimistic:
            image_ranks[rows] = (scores >= true_score).sum(dim=1) - 1  # minus the true image itself
        else:
            image_ranks[rows] = (scores > true_score).sum(dim=1)
    return text_ranks, image_ranks


def _recall(ranks: Tensor, cutoff: int) -> float:
    """Percent of ranks below ``cutoff``."""
    return 100.0 * (ranks < cutoff).double().mean().item()


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
    text_ranks, image_ranks = retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i, ties)
    result: dict[str, float] = {}
    for prefix, ranks in (("txt", text_ranks), ("img", image_ranks)):
        recalls = [_recall(ranks, k) for k in RECALL_CUTOFFS]
        result.update({f"{prefix}_r{k}": r for k, r in zip(RECALL_CUTOFFS, recalls)})
        result[f"{prefix}_r_mean"] = sum(recalls) / len(recalls)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result
