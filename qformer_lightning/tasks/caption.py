"""Image captioning: COCO finetune and caption evaluation (BLIP-2 Sec. 4.2, Table 3).

Glossary: B batch.

Finetune: the stage-2 objective (:class:`~qformer_lightning.tasks.stage2.Stage2`) with the
prompt ``"a photo of"`` in front of every caption; the Q-Former, the projection and the image
encoder train (``frozen: [model.llm]``), the ViT with layer-wise lr decay (``optim.layer_decay``,
0.95) and activation checkpointing (the encoder's ``grad_checkpointing``), at 364 px.

Evaluation (``validate``/``test``; also zero-shot NoCaps): each step generates one caption per
image with the task's generation settings (paper: beam 5, at most 30 and at least 8 new tokens)
after the same prompt and adds it to a :class:`~qformer_lightning.metrics.caption.CaptionMetric`;
at the end of the epoch the captions of all ranks are gathered, written as a COCO results JSON
(``[{"image_id", "caption"}]``) and scored with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr;
SPICE when its CoreNLP jars are installed, else skipped with a message saying how to get them).
Logged: ``{split}/Bleu_4``, ``{split}/CIDEr``, ... as pycocoevalcap reports them (fractions:
CIDEr 1.458 is the paper's 145.8).

References come from ``references[split]`` (a COCO-format annotation JSON, e.g. LAVIS's
``coco_karpathy_test_gt.json`` or NoCaps' ``nocaps_val_4500_captions.json``) or, by default, from
the data module's evaluation dataset (``datamodule.eval_dataset(split).references``: the raw
captions of each image in the annotation file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from qformer_lightning.metrics.caption import CAPTION_METRICS, CaptionMetric
from qformer_lightning.models.blip2_llm import Blip2LLMModel
from qformer_lightning.tasks.base import FrozenDtype, NonFinitePolicy, Optimization
from qformer_lightning.tasks.stage2 import Stage2

CAPTION_PROMPT = "a photo of"
"""BLIP-2's captioning prompt (COCO finetune and evaluation)."""


def caption_finetune_optim() -> Optimization:
    """The paper's captioning finetune schedule: peak 1e-5, cosine to 0, ViT layer decay 0.95
    (warmup 1000 steps from 1e-8 as LAVIS's ``caption_coco_ft``)."""
    return Optimization(lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000, layer_decay=0.95)


def references_from_dataset(dataset: Any, split: str) -> dict[str, Any]:
    """A COCO-format annotation dict built from an evaluation dataset's ``image_ids`` and
    ``references`` (raw captions per image).

    Raises:
        ValueError: the dataset has no references (e.g. a NoCaps list without captions: give
            ``references`` to the task), or an image without captions.
    """
    image_ids = getattr(dataset, "image_ids", None)
    references = getattr(dataset, "references", None)
    if image_ids is None or references is None:
        raise ValueError(
            f"the {split!r} dataset ({type(dataset).__name__}) has no per-image references: use "
            "CaptionDataModule(eval_mode='images') or set the task's `references` to a COCO-format JSON"
        )
    empty = [image_id for image_id, captions in zip(image_ids, references) if not captions]
    if empty:
        raise ValueError(
            f"{len(empty)} images of the {split!r} split have no reference captions (e.g. image ids {empty[:5]}): "
            "set the task's `references` to a COCO-format annotation JSON with their captions"
        )
    annotations = [
        {"image_id": int(image_id), "caption": caption} for image_id, captions in zip(image_ids, references) for caption in captions
    ]
    return {"images": [{"id": int(i)} for i in dict.fromkeys(image_ids)], "annotations": annotations}


class Caption(Stage2):
    """Captioning finetune and evaluation on top of the stage-2 model.

    Args:
        model: the stage-2 model (image encoder, Q-Former, LLM adapter).
        prompt: text in front of every caption, in training and generation (paper: ``"a photo of"``).
        pretrained: stage-2 weights to start from (see :class:`Stage2`): a Hugging Face Blip2 dir
            or hub id (``Salesforce/blip2-opt-2.7b``), a LAVIS ``.pth``, this project's ``.ckpt``,
            or a list of them loaded in order.
        num_beams: beams of the evaluation captions (paper: 5).
        max_new_tokens: at most this many generated tokens (paper: 30).
        min_new_tokens: at least this many (paper: 8).
        length_penalty: beam-search length penalty.
        repetition_penalty: see :class:`~qformer_lightning.tasks.stage2.Stage2` (1.0: off).
        references: per split (``val``/``test``), a COCO-format annotation JSON of the reference
            captions; a split not listed takes them from the data module's evaluation dataset.
        results_dir: where the COCO results JSON of each evaluation goes (default: the logger's
            directory + ``results``).
        use_spice: ``None``: SPICE when its jars are installed (else a message says how to get
            them); ``True``: required; ``False``: never.
        metrics: the pycocoevalcap scorers to run, a subset of ``bleu, meteor, rouge, cider``
            (default: all; METEOR takes ~10 s of Java per evaluation).
        frozen: module prefixes to freeze (default: the LLM only; the ViT finetunes).
        optim: default :func:`caption_finetune_optim` (the paper's lr 1e-5 and layer decay 0.95).
        nonfinite, store_frozen, frozen_dtype: see :class:`~qformer_lightning.tasks.base.Blip2Task`.
    """

    def __init__(
        self,
        model: Blip2LLMModel,
        prompt: str = CAPTION_PROMPT,
        pretrained: str | list[str] | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        references: dict[str, str] | None = None,
        results_dir: str | None = None,
        use_spice: bool | None = None,
        metrics: list[str] | None = None,
        frozen: list[str] | None = None,
        optim: Optimization | None = None,
        nonfinite: NonFinitePolicy = "stop",
        store_frozen: bool | None = None,
        frozen_dtype: FrozenDtype | None = None,
    ) -> None:
        unknown = sorted(set(references or {}) - {"val", "test"})
        if unknown:
            raise ValueError(f"references are given per split 'val'/'test', got {unknown}")
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}")
        super().__init__(
            model=model,
            prompt=prompt,
            prefix_lm=False,
            pretrained=pretrained,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            frozen=["model.llm"] if frozen is None else frozen,
            optim=optim if optim is not None else caption_finetune_optim(),
            nonfinite=nonfinite,
            store_frozen=store_frozen,
            frozen_dtype=frozen_dtype,
        )
        self.references = dict(references or {})
        self.results_path_root = results_dir
        self.use_spice = use_spice
        self.metrics = tuple(CAPTION_METRICS if metrics is None else metrics)
        unknown_metrics = sorted(set(self.metrics) - set(CAPTION_METRICS))
        if unknown_metrics:
            raise ValueError(f"unknown caption metrics {unknown_metrics}; choose from {CAPTION_METRICS}")
        self._metrics: dict[str, CaptionMetric] = {}  # not submodules: no state in checkpoints
        self.last_scores: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ generation
    def generate_captions(self, images: Any) -> list[str]:
        """B captions for (B, 3, H, W) images, after the task prompt, with the task's settings."""
        prompts = [self.prompt] * images.shape[0] if self.prompt else None
        return self.model.caption(images, prompts, **self.generation)

    # ------------------------------------------------------------------ evaluation
    def reference_annotation(self, split: str) -> dict[str, Any] | str:
        """The references of ``split``: ``references[split]`` or the data module's eval dataset."""
        if split in self.references:
            path = Path(self.references[split])
            if not path.is_file():
                raise FileNotFoundError(f"references for {split!r} not found: {path}")
            return str(path)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "eval_dataset"):
            raise ValueError(
                f"no references for the {split!r} split: set the task's references.{split} to a COCO-format "
                "JSON, or evaluate with a CaptionDataModule"
            )
        return references_from_dataset(datamodule.eval_dataset(split), split)

    def start_evaluation(self, split: str, annotation: dict[str, Any] | str | None = None) -> CaptionMetric:
        """A fresh metric for ``split`` whose ``compute`` writes the results JSON (rank 0)."""
        annotation = self.reference_annotation(split) if annotation is None else annotation
        path = self.results_dir(self.results_path_root) / f"captions_{split}_step{self.global_step if self._trainer else 0}.json"
        metric = CaptionMetric(annotation, use_spice=self.use_spice, metrics=self.metrics, results_path=path).to(self.device)
        self._metrics[split] = metric
        return metric

    def evaluation_step(self, batch: dict[str, Any], split: str) -> list[str]:
        """Caption the batch's images and add them to the split's metric."""
        if split not in self._metrics:
            self.start_evaluation(split)
        captions = self.generate_captions(batch["image"])
        self._metrics[split].update(batch["image_id"], captions)
        return captions

    def finish_evaluation(self, split: str) -> dict[str, float]:
        """Gather, write and score the split's captions; log ``{split}/<metric>``."""
        metric = self._metrics.pop(split, None)
        if metric is None:
            return {}
        scores = {name: float(value) for name, value in metric.compute().items()}
        self.last_scores[split] = scores
        if self._trainer is not None:
            for name, value in scores.items():
                self.log(f"{split}/{name}", value, sync_dist=False)  # already gathered: equal on every rank
        summary = ", ".join(f"{name} {value:.4f}" for name, value in scores.items())
        rank_zero_info(f"{split} captions -> {metric.results_path}: {summary}")
        return scores

    def on_validation_epoch_start(self) -> None:
        self.start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self.start_evaluation("test")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.finish_evaluation("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """``[{"image_id", "caption"}]`` for an annotation batch (COCO results records); for the
        requests of :class:`~qformer_lightning.data.predict.PredictDataModule` (user images, prompts),
        the records of :meth:`Stage2.predict_step`."""
        if "request" in batch:
            return super().predict_step(batch, batch_idx)
        captions = self.generate_captions(batch["image"])
        return [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_id"].tolist(), captions)]
