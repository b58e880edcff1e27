"""Prediction inputs: user image files, a folder, or a JSONL file of requests.

Glossary: B batch, S image side.

A *request* is one image and what to do with it:

- ``caption``: no text given; a stage-2 model captions the image (with the task's prompt).
- ``question``: a question; a stage-2 model answers it. The question is put into a template
  (the request's ``prompt`` when it holds ``{}``, else the task's; see
  :mod:`qformer_lightning.tasks.predict`).
- ``prompt``: a free prompt; a stage-2 model continues it (instructed zero-shot generation).
- ``score``: a text; a stage-1 model scores the image-text pair (ITC similarity, ITM probability).

:class:`PredictDataModule` builds requests from ``images`` (files and/or folders) with one
``question``/``prompt`` for all, or with ``texts`` (every image against every text), or reads
them from ``requests``, a JSONL file whose lines are ``{"image": PATH, "question" | "prompt" |
"text": ...}`` (``text`` may be a list: one score request per text; an optional ``id`` is copied
to the output). Relative image paths in the JSONL are resolved against ``image_root`` (default:
the JSONL's folder).

Batches: ``image`` (B, 3, S, S) normalised with the model's encoder settings, ``key`` (B image
paths), ``index`` (B,) request positions, ``request`` (B JSON-ready dicts) and ``skipped``
(requests whose image could not be read, each with its ``error``; ``on_bad_image: skip``).

Skips are reported once per file: an unreadable image is warned about once, however many requests
name it (``texts``, JSONL lines) and whichever loader worker reads it; the files of an image folder
that are not images (and its sub-folders unless ``recursive``) are warned about at setup and kept in
:attr:`PredictDataModule.skipped_files`, which the JSONL writer's final report lists beside the
unreadable images.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from qformer_lightning.data.image import CLIP_MEAN, CLIP_STD, BadSample, ImageTransform, normalize
from qformer_lightning.encoders.vision import TimmVisionEncoder

log = logging.getLogger(__name__)

RequestKind = Literal["caption", "question", "prompt", "score"]
BadImagePolicy = Literal["skip", "error"]
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings taken from a folder (case-insensitive)."""
REQUEST_KEYS: tuple[str, ...] = ("image", "question", "prompt", "text", "id")
"""The keys a JSONL request line may hold."""


@dataclass(frozen=True)
class PredictRequest:
    """One image and what to predict for it.

    Args:
        image: the image file path.
        kind: ``caption``, ``question``, ``prompt`` or ``score`` (module docstring).
        question: the question (``question`` requests).
        prompt: the free prompt (``prompt``), or the question template holding ``{}`` (``question``).
        text: the text to score against the image (``score``).
        id: a user id copied to the output line.
    """

    image: str
    kind: RequestKind
    question: str | None = None
    prompt: str | None = None
    text: str | None = None
    id: Any = None

    def as_json(self) -> dict[str, Any]:
        """The request as the output line shows it: ``image``, ``task`` and the fields that are set."""
        out: dict[str, Any] = {"image": self.image, "task": self.kind}
        for name in ("id", "question", "prompt", "text"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def make_request(image: str, question: str | None = None, prompt: str | None = None, text: str | None = None, id: Any = None) -> PredictRequest:
    """The request for an image and the given fields; the kind follows from which fields are set.

    Raises:
        ValueError: ``text`` with a question or a prompt, or a non-string field.
    """
    for name, value in (("question", question), ("prompt", prompt), ("text", text)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"request for {image}: {name} must be a string, got {type(value).__name__} {value!r}")
    if text is not None and (question is not None or prompt is not None):
        raise ValueError(f"request for {image}: 'text' (image-text scoring) cannot be combined with a question or a prompt")
    if text is not None:
        kind: RequestKind = "score"
    elif question is not None:
        kind = "question"
    elif prompt is not None:
        kind = "prompt"
    else:
        kind = "caption"
    return PredictRequest(image, kind, question, prompt, text, id)


NOT_AN_IMAGE = "not_an_image"
"""Skip reason of a file in an image folder whose name does not end in :data:`IMAGE_SUFFIXES`."""
SUB_FOLDER = "sub_folder"
"""Skip reason of a sub-folder of an image folder when ``recursive`` is off."""


@dataclass(frozen=True)
class ImageListing:
    """The files a folder listing takes and the entries it leaves out.

    Args:
        images: image files, in order (files as given, then each folder's images sorted).
        skipped: per reason (:data:`NOT_AN_IMAGE`, :data:`SUB_FOLDER`), the entries not taken, sorted.
    """

    images: list[str]
    skipped: dict[str, list[str]]


def scan_images(paths: str | Sequence[str], recursive: bool = False) -> ImageListing:
    """Image files named by ``paths`` (files as given, folders expanded to their image files, sorted)
    and the folder entries left out (other files; sub-folders unless ``recursive``).

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without image files.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("no image paths given")
    files: list[str] = []
    skipped: dict[str, list[str]] = {}
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            images = _scan_folder(path, recursive, skipped)
            if not images:
                where = "under" if recursive else "in"
                raise FileNotFoundError(
                    f"no image files ({', '.join(IMAGE_SUFFIXES)}) {where} folder {str(path)!r}"
                    + ("" if recursive else " (recursive: true also searches its sub-folders)")
                )
            files.extend(images)
        else:
            raise FileNotFoundError(f"image path {str(path)!r} does not exist")
    return ImageListing(files, {reason: sorted(names) for reason, names in skipped.items()})


def _scan_folder(folder: Path, recursive: bool, skipped: dict[str, list[str]]) -> list[str]:
    """The sorted image files of ``folder``; the entries left out are added to ``skipped`` by reason."""
    images = []
    for entry in folder.rglob("*") if recursive else folder.iterdir():
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            images.append(str(entry))
        elif entry.is_file():
            skipped.setdefault(NOT_AN_IMAGE, []).append(str(entry))
        elif entry.is_dir() and not recursive:
            skipped.setdefault(SUB_FOLDER, []).append(str(entry))
    return sorted(images)


def list_images(paths: str | Sequence[str], recursive: bool = False) -> list[str]:
    """The image files of :func:`scan_images` (the entries it leaves out are dropped)."""
    return scan_images(paths, recursive).images


SKIP_LABELS: dict[str, str] = {
    "bad_image": "unreadable image",
    "missing_image": "missing image",
    "image_too_large": "image too large",
    NOT_AN_IMAGE: "not an image",
    SUB_FOLDER: "sub-folder (recursive: false)",
}
"""How a skip reason reads in reports (other reasons read as their name)."""


def summarize_skips(skipped: Mapping[str, Sequence[str]], examples: int = 3) -> str:
    """``"unreadable image: 1 (a.jpg); not an image: 2 (notes.txt, x.csv)"``: per reason, the count
    and the first ``examples`` names (``...`` when there are more); empty reasons are left out."""
    parts = []
    for reason, names in skipped.items():
        if names:
            shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
            parts.append(f"{SKIP_LABELS.get(reason, reason)}: {len(names)} ({shown})")
    return "; ".join(parts)


def read_requests(path: str | Path, image_root: str | Path | None = None) -> list[PredictRequest]:
    """Requests from a JSONL file (module docstring); blank lines are skipped.

    Raises:
        FileNotFoundError: the file, or an image it names, does not exist.
        ValueError: a line that is not a JSON object, lacks ``image`` or has an unknown key
            (the line number and the key are named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"request file {str(path)!r} does not exist")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    requests: list[PredictRequest] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(entry, dict) or "image" not in entry:
                raise ValueError(f"{where}: each line must be a JSON object with an 'image' path, got {line.strip()[:200]}")
            unknown = sorted(set(entry) - set(REQUEST_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; a request holds {list(REQUEST_KEYS)}")
            image = Path(str(entry["image"])).expanduser()
            image = image if image.is_absolute() else root / image
            if not image.is_file():
                raise FileNotFoundError(f"{where}: image {str(image)!r} does not exist")
            texts = entry.get("text")
            texts = texts if isinstance(texts, list) else [texts]
            for text in texts:
                try:
                    requests.append(make_request(str(image), entry.get("question"), entry.get("prompt"), text, entry.get("id")))
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
    if not requests:
        raise ValueError(f"request file {str(path)!r} holds no request")
    return requests


class PredictDataset(Dataset):
    """Decodes the image of each request; a bad image gives a :class:`BadSample` item (or raises).

    Args:
        requests: the requests, in output order.
        transform: the eval image transform (bytes -> (S, S, 3) uint8).
        on_bad_image: ``skip`` (the item carries the error) or ``error`` (raise naming the file).
    """

    def __init__(self, requests: Sequence[PredictRequest], transform: ImageTransform, on_bad_image: BadImagePolicy) -> None:
        self.requests = list(requests)
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | BadSample]:
        """``(index, (S, S, 3) uint8 image)``, or ``(index, BadSample)`` for a bad image under ``skip``."""
        path = self.requests[index].image
        try:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:
                raise BadSample("missing_image", f"{type(err).__name__}: {err}") from err
            return index, self.transform(data)
        except BadSample as bad:
            if self.on_bad_image == "error":
                raise ValueError(
                    f"cannot read image {path!r} ({bad.reason}: {_clean(bad.detail)}); set the data module's "
                    "on_bad_image: skip to skip such files"
                ) from bad
            return index, bad


def _clean(detail: str) -> str:
    """PIL's messages name an in-memory buffer (``<_io.BytesIO object at 0x...>``): drop it."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", detail)


class PredictCollate:
    """Items of :class:`PredictDataset` -> the batch dict (module docstring); bad images go to ``skipped``."""

    def __init__(self, dataset: PredictDataset, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.dataset = dataset
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, items: list[tuple[int, np.ndarray | BadSample]]) -> dict[str, Any]:
        good = [(i, image) for i, image in items if not isinstance(image, BadSample)]
        size = self.dataset.transform.image_size
        pixels = torch.from_numpy(np.stack([image for _, image in good])) if good else torch.zeros(0, size, size, 3, dtype=torch.uint8)
        requests = self.dataset.requests
        skipped = [
            {"index": i, **requests[i].as_json(), "error": f"{bad.reason}: {_clean(bad.detail)}"}
            for i, bad in items
            if isinstance(bad, BadSample)
        ]
        return {
            "image": normalize(pixels, self.mean, self.std),  # (B, 3, S, S)
            "key": [requests[i].image for i, _ in good],
            "index": torch.tensor([i for i, _ in good], dtype=torch.long),  # (B,)
            "request": [requests[i].as_json() for i, _ in good],
            "skipped": skipped,
        }


def find_vision_encoder(module: nn.Module | None) -> TimmVisionEncoder | None:
    """The first :class:`TimmVisionEncoder` inside ``module`` (None if there is none)."""
    if module is None:
        return None
    return next((m for m in module.modules() if isinstance(m, TimmVisionEncoder)), None)


class PredictDataModule(pl.LightningDataModule):
    """``predict`` inputs: image files/folders with one request for all, or a JSONL of requests.

    Give either ``images`` or ``requests``.

    Args:
        images: image files and/or folders (a folder's image files are taken in sorted order).
        requests: a JSONL file of requests (module docstring).
        question: ask this question about every image (stage-2 models).
        prompt: a free prompt for every image; with ``question``, a template holding ``{}``
            that the question fills (e.g. ``"Question: {} Short answer:"``).
        texts: score every image against each of these texts (stage-1 models: ITC and ITM).
        image_root: folder that relative image paths of ``requests`` are resolved against
            (default: the JSONL's folder).
        recursive: also take the images in sub-folders of the ``images`` folders.
        batch_size: requests per batch.
        num_workers: data-loader workers.
        image_size: image side S; ``None`` takes the model's image encoder's (and its mean/std).
        mean, std: normalisation; ``None`` takes the encoder's (CLIP's without an encoder).
        on_bad_image: ``skip`` an unreadable image (one warning names it; each of its requests'
            output lines holds ``error``) or stop with an ``error`` naming the file.
        max_image_pixels: largest decoded image accepted.
    """

    def __init__(
        self,
        images: str | list[str] | None = None,
        requests: str | None = None,
        question: str | None = None,
        prompt: str | None = None,
        texts: list[str] | None = None,
        image_root: str | None = None,
        recursive: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        on_bad_image: BadImagePolicy = "skip",
        max_image_pixels: int = 64_000_000,
    ) -> None:
        super().__init__()
        if (images is None) == (requests is None):
            raise ValueError("PredictDataModule needs either `images` (files or folders) or `requests` (a JSONL file), not both")
        if requests is not None and (question is not None or prompt is not None or texts is not None):
            raise ValueError("question/prompt/texts apply to `images`; with `requests` put them on each JSONL line")
        if texts is not None and (question is not None or prompt is not None):
            raise ValueError("`texts` (image-text scoring) cannot be combined with a question or a prompt")
        if texts is not None and not texts:
            raise ValueError("`texts` is empty: give at least one text to score")
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.requests_file = requests
        self.question = question
        self.prompt = prompt
        self.texts = list(texts) if texts is not None else None
        self.image_root = image_root
        self.recursive = recursive
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.on_bad_image = on_bad_image
        self.max_image_pixels = max_image_pixels
        self.dataset: PredictDataset | None = None
        self.skipped_files: dict[str, list[str]] = {}
        """Per reason, the folder entries not predicted for (filled by :meth:`build_requests`)."""
        self._warned_images: set[str] = set()
        self._mean_std: tuple[tuple[float, ...], tuple[float, ...]] = (CLIP_MEAN, CLIP_STD)

    def build_requests(self) -> list[PredictRequest]:
        """The requests in output order (files are checked here: missing paths raise); the folder
        entries left out go to :attr:`skipped_files`."""
        if self.requests_file is not None:
            self.skipped_files = {}
            return read_requests(self.requests_file, self.image_root)
        listing = scan_images(self.images, self.recursive)
        self.skipped_files = listing.skipped
        files = listing.images
        if self.texts is not None:
            return [make_request(f, text=t) for f in files for t in self.texts]
        return [make_request(f, self.question, self.prompt) for f in files]

    def _encoder(self) -> TimmVisionEncoder | None:
        trainer = self.trainer
        return find_vision_encoder(trainer.lightning_module if trainer is not None else None)

    def resolve_image_settings(self, encoder: TimmVisionEncoder | None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        """Image size and normalisation: given values, else the encoder's.

        Raises:
            ValueError: no size given and no encoder to take it from, or a size the encoder
                is not built for (both named).
        """
        size = self.image_size
        if encoder is not None:
            if size is not None and size != encoder.image_size:
                raise ValueError(
                    f"PredictDataModule image_size={size}, but the model's image encoder takes "
                    f"{encoder.image_size}x{encoder.image_size} images: drop image_size (it defaults to the encoder's)"
                )
            size = encoder.image_size
        if size is None:
            raise ValueError("PredictDataModule: set image_size (no image encoder found in the model to take it from)")
        mean = self.mean or (tuple(encoder.mean) if encoder is not None else CLIP_MEAN)
        std = self.std or (tuple(encoder.std) if encoder is not None else CLIP_STD)
        return size, mean, std

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        size, mean, std = self.resolve_image_settings(self._encoder())
        self._mean_std = (mean, std)
        requests = self.build_requests()
        transform = ImageTransform(size, train=False, max_image_pixels=self.max_image_pixels)
        self.dataset = PredictDataset(requests, transform, self.on_bad_image)
        log.info("predicting %d request(s) on %d image(s) at %d px", len(requests), len({r.image for r in requests}), size)
        if any(self.skipped_files.values()) and (self.trainer is None or self.trainer.is_global_zero):
            log.warning("not predicting for these entries of the image folders: %s", summarize_skips(self.skipped_files))

    def predict_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("predict")
        assert self.dataset is not None
        self._warned_images = set()
        mean, std = self._mean_std
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=PredictCollate(self.dataset, mean, std),
            persistent_workers=False,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Warn once about each unreadable image, naming the file, however many requests name it
        (this runs in the main process: loader workers do not repeat it; each rank warns about its share)."""
        for item in batch.get("skipped", []):
            if item["image"] not in self._warned_images:
                self._warned_images.add(item["image"])
                log.warning("skipping image %s: %s (its requests get an output line with 'error')", item["image"], item["error"])
        return batch

