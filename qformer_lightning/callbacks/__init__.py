"""Lightning callbacks: the JSONL prediction writer, the TensorBoard views of the model, block-wise torch.compile,
the grounding monitor."""

from qformer_lightning.callbacks.compile import CompileBlocks
from qformer_lightning.callbacks.grounding import GroundingMonitor
from qformer_lightning.callbacks.prediction_writer import JsonlPredictionWriter
from qformer_lightning.callbacks.tensorboard import GradNormMonitor, ValidationExamples

__all__ = ["CompileBlocks", "GradNormMonitor", "GroundingMonitor", "JsonlPredictionWriter", "ValidationExamples"]
