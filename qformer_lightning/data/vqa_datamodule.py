"""LightningDataModule for VQA annotation files: VQAv2 (+ VG QA), OK-VQA, GQA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from qformer_lightning.data.annotations import VQAFormat, load_vqa
from qformer_lightning.data.base import ReplacementCounting, annotation_loader
from qformer_lightning.data.datasets import VQADataset, check_image_files
from qformer_lightning.data.image import CLIP_MEAN, CLIP_STD, ImageTransform
from qformer_lightning.data.synthetic import SyntheticCorpusConfig


@dataclass
class VQAFiles:
    """One VQA question file (with its answers) and its images.

    Args:
        questions: questions JSON (VQAv2/OK-VQA questions, GQA questions, or a BLIP list).
        image_root: directory the image paths are relative to.
        annotations: VQAv2/OK-VQA annotations JSON (omit for test-dev or the other formats).
        format: ``vqav2`` (also OK-VQA), ``gqa`` or ``blip`` (BLIP's vqa_train / vg_qa lists).
        image_template: VQAv2 image path from ``subtype`` (the file's ``data_subtype``) and
            ``image_id``.
    """

    questions: str
    image_root: str
    annotations: str | None = None
    format: VQAFormat = "vqav2"
    image_template: str = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg"


class VQADataModule(ReplacementCounting):
    """VQA batches: ``text`` is the cleaned question, ``answers`` the human answers (list per
    question, 10 for VQAv2, empty when unknown) and ``question_id`` the official id.

    Args:
        train: training files, concatenated (e.g. VQAv2 train + val and VG QA).
        val, test: evaluation files.
        batch_size: training batch size per rank.
        eval_batch_size: evaluation batch size (default ``batch_size``).
        num_workers: data-loader workers.
        image_size: image side S.
        mean, std: the encoder's normalisation.
        crop_scale: RandomResizedCrop area range in training.
        hflip: random horizontal flip in training; off by default, since answers may say
            "left" or "right".
        max_question_words: question cleanup length (BLIP ``pre_question``).
        check_images: check at setup that every image file exists.
        pin_memory: default: when CUDA is available.
        synthetic: generate the synthetic corpus in ``prepare_data`` if missing.
    """

    def __init__(
        self,
        train: list[VQAFiles] | None = None,
        val: VQAFiles | None = None,
        test: VQAFiles | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        image_size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        max_question_words: int = 50,
        check_images: bool = True,
        pin_memory: bool | None = None,
        synthetic: SyntheticCorpusConfig | None = None,
    ) -> None:
        super().__init__()
        self.files: dict[str, list[VQAFiles]] = {
            "train": list(train or []), "val": [val] if val else [], "test": [test] if test else [],
        }
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.max_question_words = max_question_words
        self.check_images = check_images
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.synthetic = synthetic
        self._datasets: dict[str, VQADataset] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.make()

    def setup(self, stage: str | None = None) -> None:
        for name, files in self.files.items():
            if not files or name in self._datasets:
                continue
            questions = []
            for f in files:  # training questions must have answers; every entry is checked here
                records = load_vqa(f.questions, f.annotations, f.format, f.image_template, require_answers=name == "train")
                if self.check_images:
                    check_image_files(f.image_root, [q.image for q in records])
                questions.extend((f.image_root, q) for q in records)
            train = name == "train"
            transform = ImageTransform(self.image_size, train, self.crop_scale, hflip=self.hflip)
            self._datasets[name] = VQADataset(questions, transform, self.max_question_words)

    def eval_dataset(self, split: str) -> VQADataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``), after setup."""
        if split not in self._datasets:
            self.setup()
        if split not in self._datasets:
            raise ValueError(f"VQADataModule has no {split!r} files configured")
        return self._datasets[split]

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        return annotation_loader(
            self.eval_dataset(split), self.batch_size if train else self.eval_batch_size, shuffle=train,
            drop_last=train, num_workers=self.num_workers, mean=self.mean, std=self.std, pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.files["val"] else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test") if self.files["test"] else []

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
