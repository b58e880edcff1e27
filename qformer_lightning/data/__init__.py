"""Data: shard streaming (pretraining), annotation datasets (finetuning, evaluation), the
synthetic corpus. Batch layout: see :mod:`qformer_lightning.data.batch`.

Names are imported lazily, so ``qformer_lightning.data.synthetic`` (used by tools) does not pull
in Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS: dict[str, str] = {
    "CaptionImage": "annotations",
    "VQAQuestion": "annotations",
    "load_captions": "annotations",
    "load_vqa": "annotations",
    "CaptionDataModule": "caption_datamodule",
    "CaptionSplit": "caption_datamodule",
    "CaptionPairDataset": "datasets",
    "ImageTextEvalDataset": "datasets",
    "VQADataset": "datasets",
    "CLIP_MEAN": "image",
    "CLIP_STD": "image",
    "REASONS": "image",
    "ImageTransform": "image",
    "ShardDataModule": "shard_datamodule",
    "ShardSource": "shard_datamodule",
    "ResumableShardLoader": "stream",
    "ShardStream": "stream",
    "SyntheticCorpus": "synthetic",
    "SyntheticCorpusConfig": "synthetic",
    "make_synthetic_corpus": "synthetic",
    "pre_caption": "text",
    "pre_question": "text",
    "VQADataModule": "vqa_datamodule",
    "VQAFiles": "vqa_datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
