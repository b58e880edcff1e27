"""qformer_lightning: BLIP-2 (Li et al., 2023) as a PyTorch Lightning multi-task framework."""

__version__ = "0.1.0"
