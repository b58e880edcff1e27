"""Fill a model that is already built (the task's own architecture) from any weight source.

:func:`load_into` is what a task's ``pretrained:`` goes through (stage 1, retrieval, stage 2 and
its finetunes), whatever the source: this project's Lightning ``.ckpt``, our converted file, a
Hugging Face Blip2 directory / hub id / state dict, or a LAVIS ``.pth``. The source is read and its
format recognised once (:func:`~qformer_lightning.convert.checkpoint.read_checkpoint`); the
format's module puts its tensors under our names (:func:`~qformer_lightning.convert.hf.hf_state_to_ours`,
:func:`~qformer_lightning.convert.lavis.lavis_state_to_ours`; ours already have them); then every
tensor of the model whose name the checkpoint holds is filled. The weights present decide which
parts are loaded, never the model's or the checkpoint's class: a generation checkpoint fills a
stage-1 model's vision and Q-Former and leaves its text parts and heads as built, a stage-1
checkpoint fills a stage-2 model's vision and Q-Former and its text parts are dropped. Every
tensor is reported: loaded, left as built, dropped, resampled.

(:func:`~qformer_lightning.convert.load_pretrained` instead builds a module shaped like the checkpoint.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from torch import Tensor, nn

from qformer_lightning.convert import hf, lavis
from qformer_lightning.convert.checkpoint import Checkpoint, read_checkpoint
from qformer_lightning.convert.keymap import rename_prefixes
from qformer_lightning.convert.report import ConversionReport, load_checked

__all__ = ["VIT_POS_EMBED", "load_into", "to_our_names"]

VIT_POS_EMBED = "vision.vit.pos_embed"
"""Our name of the ViT position embeddings (resampled when the resolution changes)."""

_TOP_LEVEL = ("model", "vision", "qformer", "llm")
_LANGUAGE_MODULES = {"projection", "llm"}
"""Our modules of the language side (:class:`~qformer_lightning.models.blip2_llm.Blip2LLMModel`)."""


def to_our_names(checkpoint: Checkpoint, report: ConversionReport) -> dict[str, tuple[str, Tensor]]:
    """The checkpoint's tensors under our names: our name -> (checkpoint key(s), tensor).

    Keys that have no name of ours go to ``report.unexpected`` (and notes to ``report.notes``).
    """
    if checkpoint.format == "hf":
        return hf.hf_state_to_ours(checkpoint.state, report)
    if checkpoint.format == "lavis":
        return lavis.lavis_state_to_ours(checkpoint.state, report)
    mapped = {name: (name, tensor) for name, tensor in checkpoint.state.items()}
    language_names = {**hf.LANGUAGE_NAMES, **lavis.LANGUAGE_NAMES}  # a native file keeps its source's names
    mapped.update(rename_prefixes(checkpoint.language, language_names, report))
    return mapped


def _unread_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Hugging Face keys not worth reading into ``model``: the LLM and projection of a generative
    checkpoint (billions of parameters) when the model has no language side (stage 1)."""
    has_language = bool(_LANGUAGE_MODULES & {name for name, _ in model.named_children()})
    return () if has_language else hf.LANGUAGE_PREFIXES


def _note_dropped_and_left(report: ConversionReport) -> ConversionReport:
    """Add prefix counts of what was dropped and what was left as built to ``report.notes``."""
    for label, keys in (("dropped (not used by this model)", report.unexpected), ("left as built", report.missing)):
        counts: dict[str, int] = {}
        for key in keys:
            parts = key.split(".")
            head = ".".join(parts[:2]) if parts[0] in _TOP_LEVEL else parts[0]
            counts[head] = counts.get(head, 0) + 1
        if counts:
            report.notes.append(f"{label}: " + ", ".join(f"{k}.* ({n})" for k, n in sorted(counts.items())))
    return report


def load_into(
    model: nn.Module, source: str | Path | Mapping[str, Tensor] | Checkpoint, trust_pickle: bool = False
) -> ConversionReport:
    """Fill a built model from any weight source; the weights present decide what is filled.

    Args:
        model: the model (:class:`~qformer_lightning.models.blip2.Blip2QFormerModel`,
            :class:`~qformer_lightning.models.blip2_llm.Blip2LLMModel` after ``build()``, or any
            module with our parameter names).
        source: a Lightning ``.ckpt`` of this project (any stage), our converted file, a LAVIS
            ``.pth``, a Hugging Face Blip2 directory or hub id, a state dict in memory (LAVIS or
            Hugging Face names), or a :class:`Checkpoint` already read.
        trust_pickle: see :func:`~qformer_lightning.convert.checkpoint.read_checkpoint`.

    Returns:
        The report: ``loaded`` (our names), ``missing`` (ours left as built, e.g. an LLM that
        comes from its own source), ``unexpected`` (checkpoint keys dropped: parts this model does
        not have), ``resampled`` (the ViT position embeddings at another resolution), notes.

    Raises:
        FileNotFoundError: no such source.
        CheckpointFileError: a corrupt torch file.
        CheckpointError: a source of no supported format, a tensor whose shape differs from the
            model's (both shapes named), tied tensors with different values in the checkpoint.
    """
    checkpoint = (
        source if isinstance(source, Checkpoint)
        else read_checkpoint(source, trust_pickle, skip_prefixes=_unread_prefixes(model))
    )
    report = ConversionReport(source=checkpoint.source, kind=checkpoint.kind, notes=list(checkpoint.notes))
    mapped = to_our_names(checkpoint, report)
    load_checked(model, mapped, report, resample=(VIT_POS_EMBED,), strict=False, warn_missing=False)
    return _note_dropped_and_left(report)
