"""LightningDataModule for caption annotation files: COCO / Flickr30K Karpathy, NoCaps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.data import DataLoader

from qformer_lightning.data.annotations import load_captions
from qformer_lightning.data.base import ReplacementCounting, annotation_loader
from qformer_lightning.data.datasets import CaptionPairDataset, ImageTextEvalDataset, check_image_files
from qformer_lightning.data.image import CLIP_MEAN, CLIP_STD, ImageTransform
from qformer_lightning.data.synthetic import SyntheticCorpusConfig


@dataclass
class CaptionSplit:
    """One split of a caption annotation file.

    Args:
        annotations: JSON path (Karpathy ``dataset_*.json``, BLIP/LAVIS list, or COCO format).
        image_root: directory the annotation's image paths are relative to.
        splits: Karpathy-format only: the ``split`` values to take (COCO train: train, restval).
    """

    annotations: str
    image_root: str
    splits: list[str] | None = None


class CaptionDataModule(ReplacementCounting):
    """Image-caption data for captioning and retrieval finetuning and evaluation.

    Training batches: one item per (image, caption) pair, shuffled, RandomResizedCrop + flip.
    Evaluation batches (``val``, ``test``): with ``eval_mode="images"``, one item per image
    (eval resize), with ``batch["index"]`` its position in :meth:`eval_dataset`, whose
    ``references`` (raw captions per image, for caption metrics), ``texts``, ``txt2img``,
    ``img2txt`` and ``image_ids`` serve captioning and retrieval evaluation; with
    ``eval_mode="pairs"``, one item per (image, caption) pair (for pair-wise validation metrics).
    ``image_id`` is the COCO image id for COCO files.

    Args:
        train, val, test: the splits (any may be omitted).
        batch_size: training batch size per rank.
        eval_batch_size: evaluation batch size (default ``batch_size``).
        num_workers: data-loader workers.
        image_size: image side S.
        mean, std: the encoder's normalisation.
        crop_scale: RandomResizedCrop area range.
        hflip: random horizontal flip in training.
        hflip_swaps_text: swap "left"/"right" in the caption of a flipped image (spatial captions,
            e.g. the synthetic corpus); otherwise turn ``hflip`` off for such captions.
        max_words: caption cleanup length (BLIP ``pre_caption``).
        eval_mode: ``images`` or ``pairs`` (above).
        check_images: check at setup that every image file exists (clear error otherwise).
        pin_memory: default: when CUDA is available.
        synthetic: generate the synthetic corpus in ``prepare_data`` if missing.
    """

    def __init__(
        self,
        train: CaptionSplit | None = None,
        val: CaptionSplit | None = None,
        test: CaptionSplit | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        image_size: int = 384,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        hflip_swaps_text: bool = False,
        max_words: int = 30,
        eval_mode: Literal["images", "pairs"] = "images",
        check_images: bool = True,
        pin_memory: bool | None = None,
        synthetic: SyntheticCorpusConfig | None = None,
    ) -> None:
        super().__init__()
        self.splits = {"train": train, "val": val, "test": test}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.hflip_swaps_text = hflip_swaps_text
        self.max_words = max_words
        self.eval_mode = eval_mode
        self.check_images = check_images
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.synthetic = synthetic
        self._datasets: dict[str, CaptionPairDataset | ImageTextEvalDataset] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.make()

    def setup(self, stage: str | None = None) -> None:
        for name, split in self.splits.items():
            if split is None or name in self._datasets:
                continue
            images = load_captions(split.annotations, split.splits)
            if self.check_images:
                check_image_files(split.image_root, [im.image for im in images])
            rooted = [(split.image_root, im) for im in images]
            if name == "train":
                transform = ImageTransform(
                    self.image_size, True, self.crop_scale, hflip=self.hflip, hflip_swaps_text=self.hflip_swaps_text
                )
                self._datasets[name] = CaptionPairDataset(rooted, transform, self.max_words)
            else:
                transform = ImageTransform(self.image_size, False)
                cls = ImageTextEvalDataset if self.eval_mode == "images" else CaptionPairDataset
                self._datasets[name] = cls(rooted, transform, self.max_words)

    def eval_dataset(self, split: Literal["val", "test"]) -> ImageTextEvalDataset | CaptionPairDataset:
        """The evaluation dataset of ``split`` (after setup); see the class docstring."""
        if split not in self._datasets:
            self.setup()
        if split not in self._datasets:
            raise ValueError(f"CaptionDataModule has no {split!r} split configured")
        return self._datasets[split]

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self._datasets:
            self.setup()
        if split not in self._datasets:
            raise ValueError(f"CaptionDataModule has no {split!r} split configured")
        return annotation_loader(
            self._datasets[split], self.batch_size if train else self.eval_batch_size, shuffle=train,
            drop_last=train, num_workers=self.num_workers, mean=self.mean, std=self.std, pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", False) if self.splits["val"] is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", False) if self.splits["test"] is not None else []

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)
