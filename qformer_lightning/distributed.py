"""Collectives: every cross-rank helper of the package, usable with and without a process group.

Glossary: B local batch (this rank), W world size, G = W * B global batch.

Without an initialised process group (or with one process) each helper returns its input (or
what one rank alone would get), so the same code runs in a single CPU process. Under a process
group every rank must call each helper (they are collectives).

- Gathers for the in-batch losses (:func:`all_gather_with_grad`, :func:`all_gather_no_grad`,
  :func:`pad_to_global_length`): every rank must give the same local batch size B
  (``torch.distributed`` gathers equal shapes); rank r's samples occupy rows
  ``[r * B, (r + 1) * B)`` of a gathered tensor.
- Gathers of unequal parts (:func:`gather_concat`), of Python objects (:func:`gather_objects`),
  reductions (:func:`max_over_ranks`, :func:`all_ranks_true`) and :func:`rank_and_world` /
  :func:`is_global_zero`.

Gradient convention of :func:`all_gather_with_grad`
----------------------------------------------------
Each rank computes its loss ``L_r`` over its B local rows against all G gathered columns, and
DDP (or FSDP) then *averages* parameter gradients over the W ranks. The single-process loss on
the concatenated batch is the mean over all G rows, ``L = (1/W) * sum_r L_r``. For the averaged
parameter gradient to equal ``dL/dtheta``, rank r's local features ``x_r`` must receive
``sum_s dL_s/dx_r``: the sum, over every rank's loss, of the gradient flowing into r's slice of
the gathered tensor. The backward therefore sums the upstream gradients of the gathered tensor
over ranks (a reduce-scatter with SUM) and keeps the local slice. Consequently
``x_r.grad == W * dL/dx_r``; after DDP's division by W the parameter gradients match the
single-process ones exactly. (Same convention as ``torch.distributed.nn.functional.all_gather``
and the ``GatherLayer`` of SimCLR/LAVIS.)
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.14 renames the tensor collectives; older versions only have the *_tensor names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_global_zero() -> bool:
    """Whether this process is rank 0 (true without a process group)."""
    return rank_and_world()[0] == 0


def _gather(x: Tensor, world: int) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0: (B, ...) -> (W * B, ...)."""
    x = x.contiguous()
    if x.dtype == torch.bool:  # not every backend reduces/gathers bool: go through uint8
        return _gather(x.to(torch.uint8), world).bool()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_flat(out, x)
    return out


def pad_to_global_length(ids: Tensor, mask: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad token ids and their mask to the longest length over all ranks.

    Each rank pads its captions to its own longest, but a gather needs equal shapes.

    Args:
        ids: (B, T) token ids.
        mask: (B, T) attention mask (1 = token).
        pad_id: id written into the new columns (their mask is 0).

    Returns:
        (B, T_max) ids and mask; the inputs themselves without a process group or when no
        rank is longer.
    """
    _, world = rank_and_world()
    if world == 1:
        return ids, mask
    length = torch.tensor([ids.shape[1]], device=ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    extra = int(length.item()) - ids.shape[1]
    if extra == 0:
        return ids, mask
    return torch.nn.functional.pad(ids, (0, extra), value=pad_id), torch.nn.functional.pad(mask, (0, extra), value=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Gather along dim 0; backward sums the gathered gradient over ranks, keeps the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        _, world = rank_and_world()
        ctx.world = world
        return _gather(x, world)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        world = ctx.world
        local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))  # (B, ...)
        _reduce_scatter_flat(local, grad.contiguous(), op=dist.ReduceOp.SUM)
        return local


def all_gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, differentiable: (B, ...) -> (G, ...).

    Without an initialised process group (or with one process) ``x`` itself is returned.
    The backward routes to each rank the sum over ranks of the gradient of its own slice; see
    the module docstring for why that gives single-process gradients under DDP's averaging.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, detached: (B, ...) -> (G, ...).

    For ids, masks and token ids (any dtype, bool included). Without a process group returns
    ``x`` detached.
    """
    _, world = rank_and_world()
    if world == 1:
        return x.detach()
    return _gather(x.detach(), world)


# ----------------------------------------------------------------------------- unequal parts, objects, reductions


def gather_concat(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order; first dims may differ.

    (B_r, ...) on rank r -> (sum_r B_r, ...) on every rank. Without a process group (or with
    one process) ``x`` itself is returned. Every rank must call it (a collective).
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    if x.dtype == torch.bool:  # not every backend gathers bool
        return gather_concat(x.to(torch.uint8)).bool()
    x = x.contiguous()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))  # (B_max, ...)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_objects(items: list[T]) -> list[T]:
    """All ranks' lists of picklable objects, concatenated in rank order (a copy of ``items`` without a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return list(items)
    everyone: list[list[T] | None] = [None] * world
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in (part or [])]


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all ranks (``value`` itself without a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_ranks_true(flag: Tensor) -> bool:
    """Whether the scalar ``flag`` (bool or 0/1) holds on every rank (on this one without a process group)."""
    flag = flag.detach().to(torch.float32)
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0
