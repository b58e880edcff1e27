"""Evaluation metrics under the official protocols: VQA accuracy, retrieval recall, caption scores."""

from qformer_lightning.metrics.caption import (
    CaptionMetric,
    CaptionScorer,
    score_captions,
    spice_available,
    write_coco_results,
)
from qformer_lightning.metrics.retrieval import retrieval_metrics, retrieval_ranks
from qformer_lightning.metrics.vqa import VQAAccuracy, normalize_answer, vqa_accuracy

__all__ = [
    "CaptionMetric",
    "CaptionScorer",
    "VQAAccuracy",
    "normalize_answer",
    "retrieval_metrics",
    "retrieval_ranks",
    "score_captions",
    "spice_available",
    "vqa_accuracy",
    "write_coco_results",
]
