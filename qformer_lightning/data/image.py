"""Robust image decoding and the BLIP-2 train/eval image transforms.

A transform turns the encoded bytes of one image into a ``(S, S, 3)`` uint8 array (S = image
size); :func:`normalize` turns a stacked ``(B, S, S, 3)`` uint8 batch into the encoder's input
``(B, 3, S, S)`` float. Keeping samples uint8 until the batch is built makes the per-sample work
decode + one resize, and the normalisation one vectorised operation per batch.

Randomness comes from a ``random.Random`` passed per sample (seeded from the run seed, the epoch
and the sample's position), never from a global generator: a resumed run crops and flips every
sample exactly as the uninterrupted run did.

Bad input raises :class:`BadSample` with a reason from :data:`REASONS`; the caller replaces the
sample (see ``qformer_lightning.data.batch``).
"""

from __future__ import annotations

import io
import math
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

REASONS: tuple[str, ...] = (
    "bad_image",  # undecodable: corrupt or truncated bytes, unknown format
    "image_too_large",  # more pixels than max_image_pixels even after JPEG draft reduction
    "missing_image",  # a shard sample without an image member
    "missing_caption",  # no caption in the sample
    "empty_caption",  # a caption that is empty after cleanup
    "non_utf8_caption",  # caption bytes that are not UTF-8
    "bad_json",  # a sample's .json member that does not parse
    "truncated_shard",  # the tar ended (or broke) before the sample count in its _stats.json
)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Crop box ``(left, top, width, height)`` drawn like torchvision's ``RandomResizedCrop``.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; falls back to the largest centred crop whose aspect ratio lies in ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto white.

    L, CMYK, YCbCr, 1 convert directly; P converts through RGBA when it has transparency; RGBA,
    LA, PA, RGBa composite onto a white background; 16-bit (I;16*) images are scaled by 1/257,
    32-bit I and F are clipped to 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image bytes -> ``(S, S, 3)`` uint8 array, S = ``image_size``.

    Train (``train=True``): RandomResizedCrop(``scale``, ratio 3/4..4/3, bicubic) + horizontal
    flip with probability 0.5 if ``hflip`` (BLIP-2 pretraining/finetuning). Eval: resize to
    S x S (bicubic).

    Large JPEGs are decoded at a reduced scale (PIL ``draft``: 1/2, 1/4 or 1/8 in the DCT) when
    the region that is resized to S x S still has at least S pixels per side after the
    reduction, so the output resolution is never starved and very large photos decode fast.
    Images with more than ``max_image_pixels`` pixels after that are rejected (``image_too_large``).

    Args:
        image_size: output side S in pixels.
        train: random crop + flip (needs an ``rng``) or deterministic resize.
        scale: RandomResizedCrop area fraction range (BLIP-2: 0.5..1.0).
        max_image_pixels: largest decoded pixel count accepted.
        hflip: random horizontal flip in training (off where answers say "left"/"right", unless
            ``hflip_swaps_text``).
        hflip_swaps_text: a flipped image's caption gets the words "left" and "right" swapped
            (:func:`swap_left_right`, applied by :meth:`with_caption`): flipping stays an augmentation
            for spatial captions instead of making them false.
    """

    image_size: int
    train: bool
    scale: tuple[float, float] = (0.5, 1.0)
    max_image_pixels: int = 64_000_000
    hflip: bool = True
    hflip_swaps_text: bool = False

    def __call__(self, data: bytes, rng: random.Random | None = None) -> np.ndarray:
        """Decode and transform ``data``; raises :class:`BadSample` on bad input.

        Returns:
            (S, S, 3) uint8 array.
        """
        return self.transform(data, rng)[0]

    def with_caption(self, data: bytes, caption: str, rng: random.Random | None = None) -> tuple[np.ndarray, str]:
        """Transform ``data`` as :meth:`__call__` (same random draws) and return the caption that
        describes the result: left/right swapped when the image was flipped and ``hflip_swaps_text``.
        """
        image, flipped = self.transform(data, rng)
        return image, swap_left_right(caption) if flipped and self.hflip_swaps_text else caption

    def transform(self, data: bytes, rng: random.Random | None = None) -> tuple[np.ndarray, bool]:
        """Decode and transform ``data``; raises :class:`BadSample` on bad input.

        Returns:
            the (S, S, 3) uint8 array and whether it was flipped horizontally.
        """
        if self.train and rng is None:
            raise ValueError("the train transform needs an rng (random.Random) per sample")
        size = self.image_size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise BadSample("bad_image", f"image has size {width}x{height}")
                if self.train:
                    left, top, w, h = random_resized_crop_box(width, height, rng, self.scale)
                    need = max(size / w, size / h)  # reduction still keeping >= S px per side
                else:
                    left, top, w, h = 0, 0, width, height
                    need = max(size / width, size / height)
                if img.format == "JPEG" and need < 0.5:
                    img.draft(None, (math.ceil(width * need), math.ceil(height * need)))
                sx, sy = img.size[0] / width, img.size[1] / height
                if img.size[0] * img.size[1] > self.max_image_pixels:
                    raise BadSample(
                        "image_too_large",
                        f"{width}x{height} ({img.size[0]}x{img.size[1]} after draft) exceeds "
                        f"max_image_pixels={self.max_image_pixels}",
                    )
                img.load()
                img = to_rgb(img)
                box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                img = img.resize((size, size), Image.BICUBIC, box=box)
        except BadSample:
            raise
        except Image.DecompressionBombError as err:
            raise BadSample("image_too_large", str(err)) from err
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on bad bytes
            raise BadSample("bad_image", f"{type(err).__name__}: {err}") from err
        arr = np.asarray(img)  # (S, S, 3)
        if self.train and self.hflip and rng.random() < 0.5:
            return arr[:, ::-1], True
        return arr, False


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """The caption of a horizontally flipped image: the words "left" and "right" swapped, case kept.

    Only whole words change ("bright" stays); ``"a cat on the Left"`` -> ``"a cat on the Right"``.
    """

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _LEFT_RIGHT.sub(swap, text)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, ``(x / 255 - mean) / std`` per channel."""
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, S, S)
    scale = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return x.sub_(shift).div_(scale).contiguous()
