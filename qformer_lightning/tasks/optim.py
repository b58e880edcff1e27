"""Parameter groups and learning-rate schedules shared by every task.

- AdamW with no weight decay on biases, norms, query tokens, the temperature and ViT
  position/class embeddings.
- Layer-wise lr decay on an unfrozen ViT: block i of K gets ``lr * decay^(K - i)``; the patch,
  class and position embeddings get ``lr * decay^(K + 1)``; ``ln_vision`` and everything outside
  the ViT get ``lr``.
- Per-step linear warmup, then cosine decay from the peak to ``min_lr``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from torch import nn

NO_DECAY_NAMES = ("query_tokens", "temp", "pos_embed", "cls_token", "position_embeddings")

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def uses_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: not to biases, norms (1-d) or the named embeddings."""
    if param.ndim < 2:
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf not in NO_DECAY_NAMES and not any(name.endswith(n) for n in NO_DECAY_NAMES)


def vit_layer_id(name: str, num_blocks: int) -> int:
    """Depth index of a ViT parameter name (relative to the ViT): 0 embeddings, i+1 block i,
    ``num_blocks + 1`` for anything after the blocks."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "reg_token", "norm_pre")):
        return 0
    return num_blocks + 1


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    vit_prefix: str | None = None,
    vit_num_blocks: int = 0,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Build AdamW parameter groups.

    Args:
        named_params: (name, parameter) pairs; frozen ones (``requires_grad=False``) are skipped.
        lr: peak learning rate.
        weight_decay: decoupled weight decay for matrices.
        vit_prefix: name prefix of the ViT (e.g. ``"model.vision.vit."``) for layer-wise decay.
        vit_num_blocks: K, the number of ViT blocks kept.
        layer_decay: per-layer lr factor (SPEC: 0.95 when the ViT is finetuned; 1.0 = off).

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr`` and ``lr_scale`` (used by the scheduler),
        and a ``name`` for logging.
    """
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        scale = 1.0
        if vit_prefix and name.startswith(vit_prefix) and layer_decay != 1.0:
            layer = vit_layer_id(name[len(vit_prefix) :], vit_num_blocks)
            scale = layer_decay ** (vit_num_blocks + 1 - layer)
        decay = uses_weight_decay(name, param)
        key = (scale, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * scale,
                "lr_scale": scale,
                "name": f"lr_scale={scale:.4g}" + ("" if decay else ",no_decay"),
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters: check the task's `frozen` list")
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, peak_lr: float, min_lr: float, warmup_start_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine from ``peak_lr`` to ``min_lr``.

    Raises:
        ValueError: ``total_steps`` < 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
