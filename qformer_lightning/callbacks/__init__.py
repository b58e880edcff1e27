"""Lightning callbacks: the JSONL prediction writer and the TensorBoard views of the model."""

from qformer_lightning.callbacks.prediction_writer import JsonlPredictionWriter
from qformer_lightning.callbacks.tensorboard import GradNormMonitor, ValidationExamples

__all__ = ["GradNormMonitor", "JsonlPredictionWriter", "ValidationExamples"]
