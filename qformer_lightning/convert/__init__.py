"""Weight conversion: the only code that knows Hugging Face, LAVIS and BERT key names.

Entry points, both starting from :func:`read_checkpoint` (which reads a source and recognises its
format, once):

- :func:`load_into` fills a model that is already built (a task's ``pretrained:``); the weights
  present decide which parts are filled.
- :func:`load_pretrained` builds the module a checkpoint describes and returns it with a
  :class:`ConversionReport`; ``tools/convert_checkpoint.py`` is its command-line form.

Format modules: :mod:`.hf` (file reading in :mod:`.hf_files`), :mod:`.lavis`, :mod:`.bert`,
:mod:`.native` (our own file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qformer_lightning.convert import hf, lavis, native
from qformer_lightning.convert.checkpoint import Checkpoint, read_checkpoint
from qformer_lightning.convert.into import load_into
from qformer_lightning.convert.parts import VisionQFormer
from qformer_lightning.convert.report import CheckpointError, ConversionReport
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConversionReport",
    "VisionQFormer",
    "load_into",
    "load_pretrained",
    "read_checkpoint",
]


def load_pretrained(
    source: str | Path,
    image_size: int | None = None,
    frozen_vision: bool = True,
    strict: bool = True,
    **kwargs: Any,
) -> tuple[Blip2QFormerModel | VisionQFormer | QFormer, ConversionReport]:
    """Build the module a checkpoint describes and load it.

    - our file (:func:`~qformer_lightning.convert.native.save_native`) -> the saved model;
    - a LAVIS ``.pth`` -> :class:`Blip2QFormerModel` (stage 1) or :class:`VisionQFormer` (stage 2);
    - a Hugging Face directory or hub id -> :class:`Blip2QFormerModel` (``Blip2ForImageTextRetrieval``),
      :class:`VisionQFormer` (``Blip2ForConditionalGeneration``/``Blip2Model``) or :class:`QFormer`
      (``Blip2QFormerModel``); the weights present, not the config's ``use_qformer_text_input``,
      decide whether the Q-Former has text parts.

    Args:
        source: file, directory or hub id.
        image_size: resolution to run at (position embeddings resampled when it differs).
        frozen_vision: freeze the ViT.
        strict: fail on missing/unexpected keys beyond the documented ones (see the format modules).
        kwargs: passed to :func:`~qformer_lightning.convert.lavis.build_from_lavis_state_dict`
            for LAVIS files (head counts, an image encoder for checkpoints without one,
            ``trust_pickle``).
    """
    checkpoint = read_checkpoint(source, trust_pickle=bool(kwargs.pop("trust_pickle", False)))
    if checkpoint.format == "native":
        assert checkpoint.payload is not None
        return native.load_native(checkpoint.payload, image_size, frozen_vision, name=checkpoint.source)
    if checkpoint.format == "lavis":
        model = lavis.build_from_lavis_state_dict(checkpoint.state, image_size, frozen_vision=frozen_vision, **kwargs)
        return model, lavis.load_lavis_state_dict(model, checkpoint.state, checkpoint.source, strict)
    if checkpoint.format == "hf" and checkpoint.config is not None:
        config, state = checkpoint.config, checkpoint.state
        return hf.build_and_load_hf(config, state, checkpoint.source, image_size, frozen_vision, strict)
    if checkpoint.format == "hf":
        raise CheckpointError(
            f"{source}: a Hugging Face Blip2 state dict without its config cannot be built; pass its "
            "save_pretrained directory (or fill a built model with load_into)"
        )
    raise CheckpointError(
        f"{source} is a Lightning training checkpoint ({checkpoint.kind}): build the task's model from its "
        "config and fill it with load_into (or start the task with pretrained: this file)"
    )
