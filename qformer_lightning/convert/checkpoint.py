"""Read any weight source once and recognise its format: the one place that sniffs formats.

Formats (:data:`Format`):

- ``"lightning"``: a Lightning ``.ckpt`` written by this project (a ``qformer_lightning`` entry
  beside ``state_dict``); tensors under our names, the task's ``model.`` prefix removed.
- ``"native"``: our converted file (:func:`~qformer_lightning.convert.native.save_native`); tensors
  under our names, the language side of a ``VisionQFormer`` under its checkpoint's names.
- ``"lavis"``: a LAVIS ``.pth`` (``{"model": state_dict}``) or state dict, keys ``Qformer.bert.*``.
- ``"hf"``: a Hugging Face ``save_pretrained`` directory or hub id (config + tensors), or a bare
  Blip2 state dict in a torch file (no config: it can fill a built model, not build one).

:func:`~qformer_lightning.convert.load_into` (fill a built model) and
:func:`~qformer_lightning.convert.load_pretrained` (build a model from the checkpoint) both start here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from torch import Tensor

from qformer_lightning.convert import hf, lavis, native
from qformer_lightning.convert.hf_files import is_hub_id, read_hf_checkpoint
from qformer_lightning.convert.report import CheckpointError
from qformer_lightning.convert.torch_file import TORCH_SUFFIXES, load_torch_file

__all__ = ["Checkpoint", "Format", "read_checkpoint", "state_dict_checkpoint"]

Format = Literal["lightning", "native", "lavis", "hf"]

_LIGHTNING_META = "qformer_lightning"
"""The entry this project's tasks add to their Lightning checkpoints (task name, dropped frozen keys)."""


@dataclass
class Checkpoint:
    """A weight source read into memory, its format recognised.

    Attributes:
        source: the path, hub id or ``"<state_dict>"``.
        format: see :data:`Format`.
        kind: what was recognised, for reports (``"qformer_lightning:Stage1"``,
            ``"hf:Blip2ForConditionalGeneration"``, ``"lavis"``, ...).
        state: the tensors: our names for ``lightning``/``native``, the checkpoint's own otherwise.
        language: ``native`` only: the language side of a ``VisionQFormer`` under its checkpoint's
            names (Hugging Face ``language_projection.*``/``language_model.*``, LAVIS ``opt_proj.*``, ...).
        config: ``hf`` only: the checkpoint's config (None for a state dict without one).
        payload: ``native`` only: the whole saved payload (constructor arguments).
        notes: facts for the report (e.g. frozen tensors a Lightning checkpoint did not store).
    """

    source: str
    format: Format
    kind: str
    state: dict[str, Tensor]
    language: dict[str, Tensor] = field(default_factory=dict)
    config: Any = None
    payload: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def state_dict_checkpoint(state: Mapping[str, Tensor], source: str = "<state_dict>") -> Checkpoint:
    """Recognise a bare state dict by its key names: LAVIS (``Qformer.bert.*``) or Hugging Face Blip2.

    Raises:
        CheckpointError: neither (the first keys are named).
    """
    state = dict(state)
    if lavis.is_lavis_state(state):
        return Checkpoint(source, "lavis", "lavis", state)
    try:
        kind = hf.detect_hf_kind(state)
    except CheckpointError:
        raise CheckpointError(
            f"{source}: neither a qformer_lightning checkpoint nor a LAVIS or Hugging Face BLIP-2 state dict "
            f"(keys start {sorted(state)[:4]})"
        ) from None
    return Checkpoint(source, "hf", f"hf:{kind}", state)


def _lightning_checkpoint(obj: dict[str, Any], source: str) -> Checkpoint:
    """A loaded Lightning checkpoint of this project -> our-named tensors (``model.`` removed)."""
    meta = obj[_LIGHTNING_META]
    state = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
    checkpoint = Checkpoint(source, "lightning", f"qformer_lightning:{meta['task']}", state)
    if meta.get("dropped_frozen_keys"):
        checkpoint.notes.append(
            f"{len(meta['dropped_frozen_keys'])} frozen tensors were not stored in the checkpoint: "
            "they keep the weights from their own source"
        )
    return checkpoint


def _torch_object_checkpoint(obj: Any, source: str) -> Checkpoint:
    """Recognise what ``torch.load`` returned."""
    if isinstance(obj, dict) and _LIGHTNING_META in obj and "state_dict" in obj:
        return _lightning_checkpoint(obj, source)
    if native.is_native(obj):
        state, language = obj["state_dict"], obj.get("language_state") or {}
        return Checkpoint(source, "native", f"{native.FORMAT}:{obj['kind']}", state, language, payload=obj)
    if isinstance(obj, dict) and "state_dict" in obj:
        raise CheckpointError(f"{source} is not a qformer_lightning checkpoint (no '{_LIGHTNING_META}' entry)")
    return state_dict_checkpoint(lavis.unwrap_lavis_state(obj, source), source)


def read_checkpoint(
    source: str | Path | Mapping[str, Tensor], trust_pickle: bool = False, skip_prefixes: tuple[str, ...] = ()
) -> Checkpoint:
    """Read a weight source and recognise its format (see the module docstring).

    Args:
        source: a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), a ``save_pretrained``
            directory, a hub id, or a state dict already in memory.
        trust_pickle: read torch files other than Lightning ``.ckpt`` with ``weights_only=False``
            (only for files you trust; a ``.ckpt`` pickles its hyper-parameters and is always read so).
        skip_prefixes: Hugging Face keys not to read from a directory or hub id (e.g. the LLM's).

    Raises:
        FileNotFoundError: no such file or directory and not a hub id; the hub unreachable.
        CheckpointFileError: an empty, truncated or corrupt torch file.
        CheckpointError: a file of another type, or contents of no supported format.
    """
    if isinstance(source, Mapping):
        return state_dict_checkpoint(source)
    path = Path(source)
    if path.is_dir() or is_hub_id(source):
        read = read_hf_checkpoint(source, skip_prefixes)
        return Checkpoint(read.source, "hf", f"hf:{read.architecture}", read.state, config=read.config)
    if not path.is_file():
        raise FileNotFoundError(f"{str(source)!r} is neither an existing file or directory nor a hub id (owner/name)")
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r} (expected {TORCH_SUFFIXES})")
    weights_only = path.suffix != ".ckpt" and not trust_pickle
    return _torch_object_checkpoint(load_torch_file(path, "pretrained checkpoint", weights_only), str(path))

