"""Reading input shards into CapFilt batches (decoding and image preprocessing in loader workers).

:class:`ShardBatches` is an ``IterableDataset`` over a list of :class:`ShardJob`: data-loader
worker ``w`` of ``W`` reads jobs ``w, w + W, ...`` whole and in sample order, and yields batches
that never cross a shard; the last batch of a shard has ``last=True`` (a shard without samples
yields one empty batch). An image that does not decode is kept in the batch with
``readable=False`` and its reason; its members pass through untouched.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from qformer_lightning.data.image import to_rgb
from qformer_lightning.data.shards import TruncatedAt, _is_remote, iter_tar_samples, open_url
from qformer_lightning.data.stream import IMAGE_EXTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """One input shard to re-caption: its URL, output name and sample count from its stats file."""

    url: str
    name: str
    num_samples: int


def web_caption(members: dict[str, bytes]) -> str:
    """The sample's original caption: its ``.txt``, else the ``caption`` field of its ``.json``; ``""`` if none."""
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            return ""
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            return meta["caption"].strip()
    return ""


def decode_image(members: dict[str, bytes], max_image_pixels: int) -> Image.Image:
    """The sample's image as RGB; raises ``ValueError`` naming why it cannot be read."""
    data = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
    if data is None:
        raise ValueError(f"no image member among {sorted(members)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.size[0] * img.size[1] > max_image_pixels:
                raise ValueError(f"{img.size[0]}x{img.size[1]} exceeds max_image_pixels={max_image_pixels}")
            img.load()
            return to_rgb(img)
    except ValueError:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ...) on bad bytes
        raise ValueError(f"{type(err).__name__}: {err}") from err


@dataclass
class ImagePreprocessor:
    """RGB images -> the captioner's and CLIP's pixel tensors (two transformers image processors)."""

    caption_processor: object
    clip_processor: object

    def __call__(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """Returns (R, 3, S_cap, S_cap) and (R, 3, S_clip, S_clip) float tensors."""
        cap = self.caption_processor(images=images, return_tensors="pt")["pixel_values"]
        clip = self.clip_processor(images=images, return_tensors="pt")["pixel_values"]
        return cap, clip


class ShardBatches(IterableDataset):
    """Batches of the samples of ``jobs``; see the module docstring.

    Each batch is a dict: ``shard`` (job index), ``batch`` (index within the shard), ``last``,
    ``keys``, ``members`` (list of ``{ext: bytes}``), ``web`` (web captions), ``readable``
    (list of bool), ``errors`` (reason or ``None`` per sample), ``caption_pixels`` and
    ``clip_pixels`` ((R, 3, S, S) for the R readable samples, in order), ``truncated`` (a
    message if the tar ended before its stats count or broke, else ``None``).

    Args:
        jobs: the shards to read.
        preprocess: turns decoded images into model inputs.
        batch_size: samples per batch.
        num_workers: data-loader workers the dataset will run in (0: the main process).
        max_image_pixels: larger images count as unreadable.
    """

    def __init__(
        self,
        jobs: Sequence[ShardJob],
        preprocess: ImagePreprocessor,
        batch_size: int,
        num_workers: int = 0,
        max_image_pixels: int = 64_000_000,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.jobs = list(jobs)
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_image_pixels = max_image_pixels

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(worker, len(self.jobs), workers):
            yield from self._shard(index)

    def _shard(self, index: int) -> Iterator[dict]:
        job = self.jobs[index]
        seekable = not job.url.startswith("pipe:") and not _is_remote(job.url)
        pending: list[tuple[str, dict[str, bytes]]] = []
        batch, truncated, seen = 0, None, 0
        with open_url(job.url) as f:
            for item in iter_tar_samples(f, 0, seekable=seekable):
                if isinstance(item, TruncatedAt):
                    truncated = f"the tar broke at sample {item.ordinal}: {item.detail}"
                    break
                _, key, members = item
                seen += 1
                pending.append((key, members))
                if len(pending) == self.batch_size:
                    yield self._batch(index, batch, pending, last=False, truncated=None)
                    pending, batch = [], batch + 1
        if truncated is None and seen < job.num_samples:
            truncated = f"the tar ended after {seen} samples; its stats file says {job.num_samples}"
        if truncated is not None:
            log.warning("input shard %s: %s", job.url, truncated)
        yield self._batch(index, batch, pending, last=True, truncated=truncated)

    def _batch(
        self, index: int, batch: int, samples: list[tuple[str, dict[str, bytes]]], last: bool, truncated: str | None
    ) -> dict:
        images, readable, errors = [], [], []
        for _, members in samples:
            try:
                images.append(decode_image(members, self.max_image_pixels))
                readable.append(True)
                errors.append(None)
            except ValueError as err:
                readable.append(False)
                errors.append(str(err))
        if images:
            caption_pixels, clip_pixels = self.preprocess(images)
        else:
            caption_pixels = clip_pixels = torch.empty(0)
        return {
            "shard": index,
            "batch": batch,
            "last": last,
            "keys": [k for k, _ in samples],
            "members": [m for _, m in samples],
            "web": [web_caption(m) for _, m in samples],
            "readable": readable,
            "errors": errors,
            "caption_pixels": caption_pixels,
            "clip_pixels": clip_pixels,
            "truncated": truncated,
        }
