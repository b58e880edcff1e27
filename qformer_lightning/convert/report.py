"""What a weight conversion did, and the checked load that fills it in.

Every importer returns a :class:`ConversionReport`: which of our parameters received weights,
which kept their initial values, which checkpoint keys were not used, and which tensors were
resampled. A checkpoint of the wrong kind or with wrong shapes raises :class:`CheckpointError`
naming the key and both shapes; it never loads silently in part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: wrong kind, wrong shapes, missing parts."""


@dataclass
class ConversionReport:
    """The outcome of one import or export.

    Attributes:
        source: the path or hub id converted.
        kind: what was recognised, e.g. ``"hf:Blip2ForImageTextRetrieval"``, ``"lavis"``, ``"bert"``.
        loaded: our parameter names that received checkpoint weights.
        missing: our parameter names left at their initial values.
        unexpected: checkpoint keys that were not used.
        resampled: our parameter names whose checkpoint tensor was resampled (position embeddings).
        ignored: checkpoint keys skipped on purpose (non-weight buffers, verified duplicates).
        notes: facts worth knowing about the conversion (tied heads, eps, dropped parts).
    """

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for logs and the command line."""
        lines = [f"{self.kind} from {self.source}: {len(self.loaded)} tensors loaded"]
        for name in ("missing", "unexpected", "resampled", "ignored"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {name}: {shown}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Whether ``key`` matches one of the shell-style ``patterns`` (``*`` spans dots)."""
    return any(fnmatchcase(key, pattern) for pattern in patterns)


def resample_grid_pos_embed(pos_embed: Tensor, num_tokens: int, num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic resampling of square-grid ViT position embeddings, as Hugging Face's
    ``interpolate_pos_encoding`` and LAVIS's ``interpolate_pos_embed`` do it (``align_corners=False``,
    no antialiasing; prefix tokens kept).

    Args:
        pos_embed: (1, prefix + G*G, Dv).
        num_tokens: prefix + G'*G', the target length.
        num_prefix_tokens: class tokens in front of the grid.

    Returns:
        (1, prefix + G'*G', Dv) in the input dtype.
    """
    old_grid = round((pos_embed.shape[1] - num_prefix_tokens) ** 0.5)
    new_grid = round((num_tokens - num_prefix_tokens) ** 0.5)
    if old_grid**2 + num_prefix_tokens != pos_embed.shape[1] or new_grid**2 + num_prefix_tokens != num_tokens:
        raise CheckpointError(
            f"position embeddings of {pos_embed.shape[1]} tokens cannot be resampled to {num_tokens}: "
            "not a square grid plus class token"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, Dv, G, G)
    grid = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)  # (1, G'*G', Dv)
    return torch.cat([prefix, grid], dim=1)


def load_checked(
    module: nn.Module,
    mapped: dict[str, tuple[str, Tensor]],
    report: ConversionReport,
    allowed_missing: Iterable[str] = (),
    resample: Iterable[str] = (),
    strict: bool = True,
    warn_missing: bool = True,
) -> ConversionReport:
    """Copy converted tensors into ``module`` after checking every name and shape.

    Args:
        module: the target; its ``state_dict()`` names are ours.
        mapped: our name -> (checkpoint key(s) it came from, tensor).
        report: filled in (loaded, missing, resampled) and returned.
        allowed_missing: patterns of our names that may stay at their initial values without
            failing a strict load (still listed in ``report.missing``).
        resample: our names of position embeddings that are resampled when only their token
            count differs.
        strict: raise when one of our names has no weight (beyond ``allowed_missing``) or when
            ``report.unexpected`` is not empty.
        warn_missing: log a warning naming the tensors that keep their initial values.

    Raises:
        CheckpointError: a name that the module does not have, a shape mismatch (both shapes
            named), or a strict load with missing/unexpected keys.
    """
    target = module.state_dict(keep_vars=True)
    resample = set(resample)
    ready: dict[str, Tensor] = {}
    for name, (source_key, tensor) in mapped.items():
        if name not in target:
            report.unexpected.append(source_key)
            continue
        expected = tuple(target[name].shape)
        if tuple(tensor.shape) != expected:
            if name in resample and tensor.dim() == 3 and tensor.shape[-1] == expected[-1]:
                old_tokens = tensor.shape[1]
                tensor = resample_grid_pos_embed(tensor, expected[1])
                report.resampled.append(name)
                report.notes.append(f"{name}: {source_key} resampled from {old_tokens} to {expected[1]} tokens (bicubic)")
            else:
                raise CheckpointError(
                    f"{report.source}: shape mismatch for {source_key} -> {name}: checkpoint "
                    f"{tuple(tensor.shape)}, model {expected}"
                )
        ready[name] = tensor
    groups = _tie_groups(module)
    for group in groups.values():
        given = [name for name in group if name in ready]
        for name in given[1:]:
            if not torch.equal(ready[name], ready[given[0]]):
                raise CheckpointError(
                    f"{report.source}: the model ties {group} but the checkpoint holds different values for "
                    f"{mapped[given[0]][0]} and {mapped[name][0]}"
                )
    missing = [name for name in target if not any(n in ready for n in groups.get(name, (name,)))]
    report.loaded.extend(name for name in target if name in ready)
    report.missing.extend(missing)
    if strict:
        blocking = [name for name in missing if not matches_any(name, allowed_missing)]
        if blocking or report.unexpected:
            raise CheckpointError(
                f"{report.source} does not fit the model ({report.kind}): missing {blocking}, "
                f"unexpected {report.unexpected}"
            )
    with torch.no_grad():
        for name, tensor in ready.items():
            target[name].copy_(tensor.to(dtype=target[name].dtype))
    if missing and warn_missing:
        log.warning("%s: %d tensors keep their initial values (not in the checkpoint): %s", report.source, len(missing), missing)
    return report


def _tie_groups(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Names that share one tensor (tied weights): each name of a group -> the whole group."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: tuple(names) for names in by_tensor.values() if len(names) > 1 for name in names}
