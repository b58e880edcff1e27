"""Reading one torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) with the checks every weight source gets."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from qformer_lightning.convert.report import CheckpointError
from qformer_lightning.errors import check_checkpoint_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load``."""


def load_torch_file(path: str | Path, what: str = "checkpoint", weights_only: bool = True) -> Any:
    """``torch.load`` on CPU after checking that the file is there and intact.

    Args:
        path: the file.
        what: what the file is, for the messages ("pretrained checkpoint", "LAVIS checkpoint").
        weights_only: refuse pickled objects other than tensors and plain containers (pass False
            only for files you trust, such as this project's own Lightning checkpoints).

    Raises:
        FileNotFoundError: no such file.
        CheckpointFileError: an empty, truncated or corrupt file, or not a torch file (the message
            names the newest intact checkpoint beside it).
        CheckpointError: a weights-only load met other pickled objects (the message says how to
            trust the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    check_checkpoint_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects beyond tensors ({err}); if you trust the file, pass trust_pickle=True"
        ) from err
