"""Load a checkpoint into a model that is already built (the task's own architecture).

:func:`~qformer_lightning.convert.load_pretrained` builds a module from a checkpoint; a task
that starts from weights (``pretrained:`` in YAML) instead has its model built from the YAML
and fills what the checkpoint has. The helpers here do that by our parameter names and report
every tensor: loaded, left as built, or dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from qformer_lightning.convert.report import CheckpointError, ConversionReport, resample_grid_pos_embed
from qformer_lightning.errors import check_checkpoint_file
from qformer_lightning.models.blip2 import Blip2QFormerModel

__all__ = ["copy_matching", "finish_report", "load_into", "load_lightning_into", "read_lightning_state", "resample_vit_pos_embed"]

VIT_POS_EMBED = "vision.vit.pos_embed"
"""Our name of the ViT position embeddings (resampled when the resolution changes)."""

_TOP_LEVEL = ("model", "vision", "qformer", "llm")


def copy_matching(model: nn.Module, state: dict[str, Tensor], report: ConversionReport) -> None:
    """Copy tensors whose (our) names exist in ``model``; fills ``loaded``/``unexpected`` only.

    Raises:
        CheckpointError: a tensor whose shape differs from the model's (both shapes named).
    """
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"{report.source}: shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model {tuple(own[name].shape)}"
            )
        with torch.no_grad():
            own[name].copy_(tensor.to(own[name].dtype))
        report.loaded.append(name)


def finish_report(model: nn.Module, loaded: set[str], report: ConversionReport) -> ConversionReport:
    """Set ``report.loaded``/``missing`` over all of ``model``'s names (a tied name counts as loaded
    when its partner is) and add prefix counts of what was dropped and left to the notes."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    done = {name for names in by_tensor.values() if loaded & set(names) for name in names}
    names = list(model.state_dict())
    report.loaded = [n for n in names if n in done]
    report.missing = [n for n in names if n not in done]
    for label, keys in (("dropped (not used by this model)", report.unexpected), ("left as built", report.missing)):
        counts: dict[str, int] = {}
        for key in keys:
            parts = key.split(".")
            head = ".".join(parts[:2]) if parts[0] in _TOP_LEVEL else parts[0]
            counts[head] = counts.get(head, 0) + 1
        if counts:
            report.notes.append(f"{label}: " + ", ".join(f"{k}.* ({n})" for k, n in sorted(counts.items())))
    return report


def resample_vit_pos_embed(model: nn.Module, state: dict[str, Tensor], report: ConversionReport) -> None:
    """Resample ``vision.vit.pos_embed`` in ``state`` (in place) to the model's token grid.

    A checkpoint trained at 224 px can start a 364 px finetune: the position embeddings are
    interpolated (bicubic) to the new grid; the class token's embedding is kept.
    """
    own = model.state_dict().get(VIT_POS_EMBED)
    theirs = state.get(VIT_POS_EMBED)
    if own is None or theirs is None or theirs.shape == own.shape:
        return
    vit = model.get_submodule("vision.vit")
    prefix = getattr(vit, "num_prefix_tokens", 1)
    state[VIT_POS_EMBED] = resample_grid_pos_embed(theirs, own.shape[1], prefix)
    report.resampled.append(VIT_POS_EMBED)
    report.notes.append(f"{VIT_POS_EMBED} resampled from {theirs.shape[1]} to {own.shape[1]} tokens (bicubic)")


def read_lightning_state(path: str | Path) -> tuple[dict[str, Tensor], ConversionReport]:
    """The model tensors of one of this project's Lightning checkpoints, ``model.`` prefix removed.

    Raises:
        FileNotFoundError: no such file.
        CheckpointFileError: an empty, truncated or corrupt file, or not a torch file.
        CheckpointError: a ``.ckpt`` that this project did not write.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    check_checkpoint_file(path, "pretrained checkpoint")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    meta = checkpoint.get("qformer_lightning") if isinstance(checkpoint, dict) else None
    if meta is None or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a qformer_lightning checkpoint (no 'qformer_lightning' entry)")
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    report = ConversionReport(source=str(path), kind=f"qformer_lightning:{meta['task']}")
    if meta.get("dropped_frozen_keys"):
        report.notes.append(
            f"{len(meta['dropped_frozen_keys'])} frozen tensors were not stored in the checkpoint: "
            "they keep the weights from their own source"
        )
    return state, report


def load_lightning_into(model: nn.Module, path: str | Path) -> ConversionReport:
    """Fill any built model from one of this project's Lightning checkpoints, by our names: what
    the model lacks is dropped, what the checkpoint lacks is left as built (both reported), the
    ViT position embeddings are resampled to the model's resolution.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_lightning_state`; shape mismatches.
    """
    state, report = read_lightning_state(path)
    resample_vit_pos_embed(model, state, report)
    copy_matching(model, state, report)
    return finish_report(model, set(report.loaded), report)


def load_into(model: Blip2QFormerModel, source: str | Path) -> ConversionReport:
    """Fill a built stage-1 model (:class:`Blip2QFormerModel`) from a checkpoint.

    Sources: this project's Lightning ``.ckpt`` (any stage: what this model lacks is dropped
    and reported), a LAVIS stage-1 ``.pth``, or a Hugging Face ``Blip2ForImageTextRetrieval``
    directory / hub id.

    Returns:
        The report (``loaded``, ``missing`` = left as built, ``unexpected`` = dropped).

    Raises:
        CheckpointError: shape mismatches, a checkpoint of another kind (e.g. a stage-2 LAVIS
            file without the Q-Former text parts).
    """
    path = Path(source)
    if path.suffix == ".ckpt":
        return load_lightning_into(model, path)
    if path.suffix in (".pth", ".pt", ".bin") and path.is_file():
        from qformer_lightning.convert.lavis import load_lavis_state_dict, read_lavis_checkpoint

        return load_lavis_state_dict(model, read_lavis_checkpoint(path), str(path), strict=False)
    from qformer_lightning.convert.hf import load_hf_state_dict, read_hf_checkpoint

    checkpoint = read_hf_checkpoint(source)
    return load_hf_state_dict(model, checkpoint.state, checkpoint.source, strict=False)
