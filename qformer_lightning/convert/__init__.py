"""Weight conversion: the only code that knows Hugging Face, LAVIS and BERT key names.

Entry point: :func:`load_pretrained` detects the format of a path or hub id and returns our
module plus a :class:`ConversionReport`. Format modules: :mod:`.hf`, :mod:`.lavis`, :mod:`.bert`,
:mod:`.native` (our own file). ``tools/convert_checkpoint.py`` is the command-line form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qformer_lightning.convert.parts import VisionQFormer
from qformer_lightning.convert.report import CheckpointError, ConversionReport
from qformer_lightning.errors import check_checkpoint_file
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "VisionQFormer",
    "detect_format",
    "load_pretrained",
]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def detect_format(source: str | Path) -> str:
    """``"native"``, ``"lavis"`` (a torch file) or ``"hf"`` (a directory with config.json or a hub id).

    Raises:
        FileNotFoundError: a path that does not exist and is not a hub id.
        CheckpointError: a file of another kind.
    """
    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"{path} is a directory without config.json (not a save_pretrained directory)")
    if path.is_file():
        if path.suffix not in _TORCH_SUFFIXES:
            raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r} (expected {_TORCH_SUFFIXES})")
        return "torch"
    if str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        return "hf"
    raise FileNotFoundError(f"{source!r} is neither an existing file or directory nor a hub id (owner/name)")


def load_pretrained(
    source: str | Path,
    image_size: int | None = None,
    frozen_vision: bool = True,
    strict: bool = True,
    **kwargs: Any,
) -> tuple[Blip2QFormerModel | VisionQFormer | QFormer, ConversionReport]:
    """Load any supported checkpoint into our modules.

    - our file (:func:`~qformer_lightning.convert.native.save_native`) -> the saved model;
    - a LAVIS ``.pth`` -> :class:`Blip2QFormerModel` (stage 1) or :class:`VisionQFormer` (stage 2);
    - a Hugging Face directory or hub id -> :class:`Blip2QFormerModel` (``Blip2ForImageTextRetrieval``),
      :class:`VisionQFormer` (``Blip2ForConditionalGeneration``/``Blip2Model``) or :class:`QFormer`
      (``Blip2QFormerModel``).

    Args:
        source: file, directory or hub id.
        image_size: resolution to run at (position embeddings resampled when it differs).
        frozen_vision: freeze the ViT.
        strict: fail on missing/unexpected keys beyond the documented ones (see the format modules).
        kwargs: passed to :func:`~qformer_lightning.convert.lavis.build_from_lavis_state_dict`
            for LAVIS files (head counts, an image encoder for checkpoints without one,
            ``trust_pickle``).
    """
    kind = detect_format(source)
    if kind == "hf":
        from qformer_lightning.convert.hf import load_hf

        return load_hf(source, image_size, frozen_vision, strict)
    from qformer_lightning.convert import lavis, native

    trust = bool(kwargs.pop("trust_pickle", False))
    check_checkpoint_file(source, "pretrained checkpoint")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=not trust)
    except Exception as err:  # pickle.UnpicklingError and friends: say what to do
        raise CheckpointError(
            f"{source} could not be read as a weights-only torch file ({type(err).__name__}: {err}); if you trust "
            "it, pass trust_pickle=True"
        ) from err
    if native.is_native(obj):
        return native.load_native(obj, image_size, frozen_vision, name=str(source))
    state = lavis.unwrap_lavis_state(obj, str(source))
    if any(k.startswith("Qformer.bert.") for k in state):
        model = lavis.build_from_lavis_state_dict(state, image_size, frozen_vision=frozen_vision, **kwargs)
        return model, lavis.load_lavis_state_dict(model, state, str(source), strict)
    raise CheckpointError(
        f"{source}: a torch file that is neither a qformer_lightning checkpoint nor a LAVIS BLIP-2 state dict "
        f"(keys start {sorted(state)[:4]}); a Hugging Face state dict needs its save_pretrained directory"
    )
