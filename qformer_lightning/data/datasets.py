"""Map-style datasets over annotation records, for finetuning and evaluation.

Items are :class:`~qformer_lightning.data.batch.Sample` (or ``Failed`` for a bad image or
caption); :class:`BatchCollate` builds the shared batch layout and replaces bad items
deterministically within the batch. Image files are checked at setup (:func:`check_image_files`)
so that a wrong root is an error, not a run of replacements.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from qformer_lightning.data.annotations import CaptionImage, VQAQuestion
from qformer_lightning.data.batch import Failed, ReplacementLog, Sample, assemble_batch
from qformer_lightning.data.image import BadSample, ImageTransform
from qformer_lightning.data.text import pre_caption, pre_question


def check_image_files(root: str, relative: Sequence[str], threads: int = 16) -> None:
    """Raise ``FileNotFoundError`` naming the root or the first missing files."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root {root!r} does not exist or is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise PermissionError(f"image root {root!r} is not readable")
    unique = sorted(set(relative))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        exists = list(pool.map(lambda rel: os.path.isfile(os.path.join(root, rel)), unique))
    missing = [rel for rel, ok in zip(unique, exists) if not ok]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(unique)} images are missing under {root!r}, e.g. "
            + ", ".join(repr(os.path.join(root, m)) for m in missing[:5])
        )


class _ImageDataset(Dataset):
    """Shared image loading: ``transform`` on the file bytes, a per-item rng when training."""

    transform: ImageTransform

    def _image(self, root: str, rel: str):
        return self._image_with_caption(root, rel, "")[0]

    def _image_with_caption(self, root: str, rel: str, caption: str):
        """The transformed image and its caption (left/right swapped if the transform flipped it and
        ``transform.hflip_swaps_text``)."""
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise BadSample("missing_image", f"{path}: {err}") from err
        rng = random.Random(int(torch.randint(0, 2**62, ()).item())) if self.transform.train else None
        return self.transform.with_caption(data, caption, rng)

    def spare(self) -> Sample:
        """The first good item (deterministic replacement for a batch with no good item)."""
        for index in range(min(len(self), 1000)):
            item = self[index]
            if isinstance(item, Sample):
                return item
        raise RuntimeError(f"no usable item among the first {min(len(self), 1000)} of {type(self).__name__}")


class CaptionPairDataset(_ImageDataset):
    """One item per (image, caption) pair: captioning/retrieval training, "pairs" evaluation.

    Args:
        images: (image root, record) per image.
        transform: image transform.
        max_words: caption cleanup length (BLIP ``pre_caption``).
    """

    def __init__(self, images: list[tuple[str, CaptionImage]], transform: ImageTransform, max_words: int = 30) -> None:
        self.images = images
        self.transform = transform
        self.max_words = max_words
        self.pairs = [(i, j) for i, (_, im) in enumerate(images) for j in range(len(im.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample | Failed:
        i, j = self.pairs[index]
        root, record = self.images[i]
        text = pre_caption(record.captions[j], self.max_words)
        try:
            if not text:
                raise BadSample("empty_caption", f"caption {j} of {record.image} is empty after cleanup")
            image, text = self._image_with_caption(root, record.image, text)
        except BadSample as err:
            return Failed(record.image, err)
        return Sample(image, text, record.image_id, record.image, index=index)


class ImageTextEvalDataset(_ImageDataset):
    """One item per image (captioning and retrieval evaluation); the texts are attributes.

    Attributes:
        references: per image, its raw reference captions (for pycocoevalcap).
        texts: all cleaned captions, image by image.
        txt2img: per text, the index of its image.
        img2txt: per image, the indices of its texts.
        image_ids: per image, its id (COCO id for COCO).

    Items carry ``index`` (the image's position), so a retrieval task can place image features
    (with a DistributedSampler, padded duplicates share an index).
    """

    def __init__(self, images: list[tuple[str, CaptionImage]], transform: ImageTransform, max_words: int = 30) -> None:
        self.images = images
        self.transform = transform
        self.references = [im.captions for _, im in images]
        self.image_ids = [im.image_id for _, im in images]
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for i, (_, im) in enumerate(images):
            self.img2txt.append([])
            for caption in im.captions:
                self.img2txt[i].append(len(self.texts))
                self.texts.append(pre_caption(caption, max_words))
                self.txt2img.append(i)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample | Failed:
        root, record = self.images[index]
        try:
            image = self._image(root, record.image)
        except BadSample as err:
            return Failed(record.image, err)
        text = self.texts[self.img2txt[index][0]] if self.img2txt[index] else ""
        return Sample(image, text, record.image_id, record.image, index=index)


class VQADataset(_ImageDataset):
    """One item per question; ``text`` is the cleaned question (BLIP ``pre_question``).

    Args:
        questions: (image root, record) per question.
        transform: image transform.
        max_words: question cleanup length.
    """

    def __init__(self, questions: list[tuple[str, VQAQuestion]], transform: ImageTransform, max_words: int = 50) -> None:
        self.questions = questions
        self.transform = transform
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> Sample | Failed:
        root, q = self.questions[index]
        try:
            image = self._image(root, q.image)
        except BadSample as err:
            return Failed(q.image, err)
        return Sample(image, pre_question(q.question, self.max_words), q.image_id, q.image, q.question_id,
                      list(q.answers), index=index)


class BatchCollate:
    """``collate_fn`` building the batch layout of ``qformer_lightning.data.batch``.

    Args:
        dataset: the dataset (its ``spare()`` replaces a batch without a good item).
        mean, std: image normalisation.
    """

    def __init__(self, dataset: _ImageDataset, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.dataset = dataset
        self.mean, self.std = mean, std
        self.replacement_log = ReplacementLog()

    def __call__(self, items: list[Sample | Failed]) -> dict:
        return assemble_batch(items, self.mean, self.std, self.dataset.spare, self.replacement_log)
