"""Samples, batch assembly and deterministic replacement of bad samples.

Every data path (shard streaming and the annotation datasets) builds its batches here, so they
share one batch layout:

- ``image``: (B, 3, S, S) float32, normalised with the encoder's mean/std
- ``text``: list[str] of length B (cleaned caption; the cleaned question for VQA)
- ``image_id``: (B,) int64, one id per distinct image (captions of one image share it)
- ``key``: list[str] of length B (sample keys, for error messages)
- ``question_id``: (B,) int64 and ``answers``: list[list[str]] (VQA only)
- ``index``: (B,) int64 position in an evaluation dataset (evaluation datasets only)
- ``num_replaced``: int, samples of this batch that were bad and replaced
- ``replaced``: dict[str, int], the same count per reason (reasons in ``image.REASONS``)

A bad sample is never dropped (that would change the number of batches and break exact
resume): slot k takes the data of the next good slot of the same batch (k+1, k+2, ...
cyclically); a batch with no good sample at all takes a "spare" sample supplied by the caller
(deterministic too). Replacements are counted per reason in the batch and logged (rate-limited).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qformer_lightning.data.image import BadSample, normalize

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One decoded sample.

    Args:
        image: (S, S, 3) uint8 array.
        text: cleaned caption (or question).
        image_id: integer id of the image.
        key: sample key (e.g. shard url + tar key, or the image path).
        question_id: VQA question id.
        answers: VQA human answers (possibly empty for test splits).
        index: position of the sample in an evaluation dataset (``batch["index"]``).
    """

    image: np.ndarray
    text: str
    image_id: int
    key: str
    question_id: int | None = None
    answers: list[str] | None = None
    index: int | None = None


@dataclass
class Failed:
    """A sample that could not be used, with the reason and where it came from."""

    key: str
    error: BadSample


@dataclass
class ReplacementLog:
    """Rate-limited log of replaced samples: the first ``first`` at WARNING, then every ``every``-th."""

    first: int = 20
    every: int = 1000
    counts: Counter = field(default_factory=Counter)

    def record(self, failed: Failed) -> None:
        total = sum(self.counts.values()) + 1
        self.counts[failed.error.reason] += 1
        if total <= self.first or total % self.every == 0:
            log.warning(
                "replacing bad sample %s (%s: %s); replaced so far in this process: %s",
                failed.key,
                failed.error.reason,
                failed.error.detail,
                dict(self.counts),
            )


def assemble_batch(
    items: Sequence[Sample | Failed],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    spare: Callable[[], Sample],
    replacement_log: ReplacementLog | None = None,
    normalise: bool = True,
) -> dict:
    """Replace failed items, stack and normalise; returns the batch dict (module docstring).

    Args:
        items: the batch's samples in order, bad ones as :class:`Failed`.
        mean, std: per-channel normalisation.
        normalise: ``False`` keeps ``image`` as stacked uint8 (B, S, S, 3) for :func:`normalize_batch`.
        spare: called (once) when no item of the batch is good; returns a sample to use.
        replacement_log: where replacements are recorded for logging.
    """
    n = len(items)
    good = [i for i, item in enumerate(items) if isinstance(item, Sample)]
    replaced: Counter = Counter()
    samples: list[Sample] = []
    spare_sample: Sample | None = None
    for k, item in enumerate(items):
        if isinstance(item, Sample):
            samples.append(item)
            continue
        replaced[item.error.reason] += 1
        if replacement_log is not None:
            replacement_log.record(item)
        if good:
            nxt = next((g for g in good if g > k), good[0])  # next good slot, cyclically
            samples.append(items[nxt])
        else:
            if spare_sample is None:
                spare_sample = spare()
            samples.append(spare_sample)
    images = torch.from_numpy(np.stack([s.image for s in samples]))  # (B, S, S, 3) uint8
    batch: dict = {
        # (B, 3, S, S) float32; or (B, S, S, 3) uint8, a quarter of the bytes, for a loader worker to
        # send (the loader normalises in the main process: normalize_batch)
        "image": normalize(images, mean, std) if normalise else images,
        "text": [s.text for s in samples],
        "image_id": torch.tensor([s.image_id for s in samples], dtype=torch.long),  # (B,)
        "key": [s.key for s in samples],
    }
    if all(s.question_id is not None for s in samples):
        batch["question_id"] = torch.tensor([s.question_id for s in samples], dtype=torch.long)  # (B,)
    if all(s.answers is not None for s in samples):
        batch["answers"] = [list(s.answers) for s in samples]
    if all(s.index is not None for s in samples):
        batch["index"] = torch.tensor([s.index for s in samples], dtype=torch.long)  # (B,)
    batch["num_replaced"] = n - len(good)
    batch["replaced"] = dict(replaced)
    return batch


def stable_id(text: str) -> int:
    """A stable non-negative 63-bit integer id for a string (BLAKE2b, same in every process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def accumulate_replaced(total: Counter, batch: dict) -> Counter:
    """Add a batch's per-reason replacement counts to ``total`` (in place) and return it."""
    total.update(batch.get("replaced", {}))
    return total


def normalize_batch(batch: dict, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """Normalise a batch whose ``image`` is still uint8 (B, S, S, 3) -> float32 (B, 3, S, S), in place."""
    if batch["image"].dtype == torch.uint8:
        batch["image"] = normalize(batch["image"], mean, std)
    return batch
