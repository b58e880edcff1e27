"""Ranking caption candidates by image-text similarity and keeping the best (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

WEB = "web"
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class ScoredCaption:
    """One caption candidate of an image, its similarity score and where it came from.

    Args:
        caption: the text.
        score: image-text cosine similarity (``None`` when the image could not be scored).
        source: ``"web"`` (the sample's original caption) or ``"synthetic"`` (the captioner's).
    """

    caption: str
    score: float | None
    source: str

    def to_json(self) -> dict:
        """``{"caption", "score", "source"}`` with the score rounded to 6 decimals."""
        out = asdict(self)
        if self.score is not None:
            out["score"] = round(self.score, 6)
        return out


def rank_captions(captions: Sequence[str], scores: Sequence[float], sources: Sequence[str]) -> list[ScoredCaption]:
    """Candidates sorted by descending score; exact duplicates (after stripping) kept once.

    A duplicate keeps its first occurrence (put the web caption first to keep its ``source``).
    Equal scores keep the input order. Empty captions are dropped.

    Raises:
        ValueError: the three sequences differ in length.
    """
    if not len(captions) == len(scores) == len(sources):
        raise ValueError(
            f"rank_captions: {len(captions)} captions, {len(scores)} scores and {len(sources)} sources differ in length"
        )
    seen: set[str] = set()
    unique: list[ScoredCaption] = []
    for caption, score, source in zip(captions, scores, sources):
        text = caption.strip()
        if text and text not in seen:
            seen.add(text)
            unique.append(ScoredCaption(text, float(score), source))
    return sorted(unique, key=lambda c: -c.score)  # sorted() is stable: ties keep input order


def top_captions(ranked: Sequence[ScoredCaption], k: int = 2) -> list[str]:
    """The texts of the first ``k`` ranked candidates (fewer if there are fewer)."""
    if k < 1:
        raise ValueError(f"top_captions: k must be >= 1, got {k}")
    return [c.caption for c in ranked[:k]]
