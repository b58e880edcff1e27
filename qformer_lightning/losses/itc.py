"""Image-text contrastive loss of BLIP-2 stage 1 (ITC).

Glossary: B local batch (this rank), G global batch (all ranks), Q query tokens, E ITC width.

The similarity of image i and text j is the maximum over the Q query outputs of the dot product
of the (projected, L2-normalised) query feature with the (projected, L2-normalised) text [CLS]
feature, i.e. the best cosine; the logits are that similarity divided by the temperature.
In-batch negatives come from every rank (no momentum queue): each rank scores its B local rows
against the G gathered columns, in both directions.

Targets:

- without image ids (BLIP-2 pretraining, as LAVIS ``blip2_qformer``): the positive of local row
  i is global column ``rank * B + i``; the loss is
  ``F.cross_entropy(logits, targets, label_smoothing=0.1)`` per direction, exactly LAVIS.
- with image ids (retrieval finetune; several captions per image): every column whose image id
  equals the row's is a positive. The target distribution is uniform over the positives,
  ``p = pos / pos.sum(1)`` (BLIP's ``sim_targets``, without its momentum distillation), then
  label-smoothed like PyTorch does for probability targets: ``q = (1 - eps) * p + eps / G``;
  loss per row ``-sum_j q_j * log_softmax(logits)_j``. With one positive per row this equals the
  id-less loss exactly.

The returned loss is the mean over the B local rows of the two directions' average; see
:mod:`qformer_lightning.distributed` for why this gives single-process gradients under
DDP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer_lightning.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world


class ItcOutput(NamedTuple):
    """Result of :func:`itc_loss`.

    Attributes:
        loss: scalar, mean of the image->text and text->image cross-entropies.
        sim_i2t: (B, G) logits (similarity / temperature) of local images vs all texts.
        sim_t2i: (B, G) logits of local texts vs all images.
        targets: (B, G) float target distribution before label smoothing (one-hot without ids).
        image_ids_all: (G,) the gathered image ids (for the ITM sampler), ``None`` without ids.
    """

    loss: Tensor
    sim_i2t: Tensor
    sim_t2i: Tensor
    targets: Tensor
    image_ids_all: Tensor | None


# BLIP's range of the learnable ITC temperature (see clamp_temperature)
MIN_TEMPERATURE = 0.001
MAX_TEMPERATURE = 0.5


def clamp_temperature(temperature: Tensor | float, min: float = MIN_TEMPERATURE, max: float = MAX_TEMPERATURE) -> Tensor:
    """The temperature clamped to ``[min, max]`` (scalar tensor; differentiable inside the range).

    The one place the temperature is clamped: the model's ``temperature``, :func:`itc_loss` and
    :func:`clamp_temperature_` all call it.

    Outside the range the clamp has zero gradient. To keep a learnable parameter from drifting
    past the bounds, also call :func:`clamp_temperature_` on the parameter before the forward.
    The clamp, and its ``[0.001, 0.5]`` range, come from BLIP (``temp.clamp_(0.001, 0.5)`` in
    place each step); BLIP-2's LAVIS code (``blip2_qformer.py``) divides by ``temp`` unclamped.
    """
    if min <= 0 or min > max:
        raise ValueError(f"temperature bounds must satisfy 0 < min <= max, got min={min}, max={max}")
    if not isinstance(temperature, Tensor):
        temperature = torch.tensor(float(temperature))
    return temperature.clamp(min, max)


@torch.no_grad()
def clamp_temperature_(temperature: Tensor, min: float = MIN_TEMPERATURE, max: float = MAX_TEMPERATURE) -> Tensor:
    """Clamp a temperature parameter in place (no autograd record), as BLIP does each step
    (BLIP-2's LAVIS code never clamps ``temp``)."""
    return temperature.copy_(clamp_temperature(temperature, min, max))


def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """Max over queries of query-text dot products: (B, Q, E), (B', E) -> (B, B').

    The caller L2-normalises both inputs along E, so each dot product is a cosine.
    """
    if image_feats.dim() != 3 or text_feats.dim() != 2:
        raise ValueError(
            f"itc_similarity expects image_feats (B, Q, E) and text_feats (B', E), got "
            f"{tuple(image_feats.shape)} and {tuple(text_feats.shape)}"
        )
    if image_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(
            f"feature widths differ: image_feats E={image_feats.shape[-1]}, text_feats E={text_feats.shape[-1]}"
        )
    per_query = torch.einsum("bqe,te->btq", image_feats, text_feats)  # (B, B', Q)
    return per_query.amax(dim=-1)  # (B, B')


def itc_targets(
    image_ids_local: Tensor | None,
    image_ids_global: Tensor | None,
    batch: int,
    rank: int,
    world: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Target distributions of the local rows over the global columns, before smoothing.

    Args:
        image_ids_local: (B,) ids of the local samples, or ``None``.
        image_ids_global: (G,) ids of all samples in rank order, or ``None``.
        batch: B. rank, world: this rank and the world size (G = world * B).
        device: where to build the targets (default: the ids' device, else CPU).

    Returns:
        (B, G) float32 rows summing to 1: one-hot at ``rank * B + i`` without ids, otherwise
        uniform over the columns sharing the row's image id (the row's own column included).
    """
    if device is None and image_ids_local is not None:
        device = image_ids_local.device
    if image_ids_local is None or image_ids_global is None:
        own = rank * batch + torch.arange(batch, device=device)  # (B,)
        return F.one_hot(own, world * batch).float()
    positives = (image_ids_local.to(device)[:, None] == image_ids_global.to(device)[None, :]).float()  # (B, G)
    return positives / positives.sum(dim=1, keepdim=True)


def itc_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    temperature: Tensor | float,
    image_ids: Tensor | None = None,
    label_smoothing: float = 0.1,
    min_temperature: float = MIN_TEMPERATURE,
    max_temperature: float = MAX_TEMPERATURE,
) -> ItcOutput:
    """Symmetric in-batch contrastive loss with features gathered from all ranks.

    Args:
        image_feats: (B, Q, E) L2-normalised projected query outputs of the local images.
        text_feats: (B, E) L2-normalised projected [CLS] outputs of the local texts.
        temperature: scalar; clamped to ``[min_temperature, max_temperature]`` here.
        image_ids: (B,) integer image ids of the local samples; when given, all captions of an
            image are positives (see the module docstring). ``None``: sample i pairs only with
            text i.
        label_smoothing: epsilon of the label smoothing (BLIP-2: 0.1).

    Returns:
        :class:`ItcOutput` with the scalar loss, the (B, G) logits of both directions and the
        gathered image ids, which the ITM hard-negative sampler uses.
    """
    if image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(
            "image_feats and text_feats must have the same batch size, got "
            f"{image_feats.shape[0]} and {text_feats.shape[0]}"
        )
    if image_ids is not None and image_ids.shape != (image_feats.shape[0],):
        raise ValueError(f"image_ids must have shape ({image_feats.shape[0]},), got {tuple(image_ids.shape)}")
    rank, world = rank_and_world()
    batch = image_feats.shape[0]
    temp = clamp_temperature(temperature, min_temperature, max_temperature).to(image_feats.device)

    image_feats_all = all_gather_with_grad(image_feats)  # (G, Q, E)
    text_feats_all = all_gather_with_grad(text_feats)  # (G, E)
    sim_i2t = itc_similarity(image_feats, text_feats_all).float() / temp  # (B, G)
    sim_t2i = itc_similarity(image_feats_all, text_feats).t().float() / temp  # (B, G)

    image_ids_all = all_gather_no_grad(image_ids) if image_ids is not None else None  # (G,)
    targets = itc_targets(image_ids, image_ids_all, batch, rank, world, sim_i2t.device)  # (B, G)
    if image_ids is None:
        hard = targets.argmax(dim=1)  # (B,) == rank * B + arange(B)
        loss_i2t = F.cross_entropy(sim_i2t, hard, label_smoothing=label_smoothing)
        loss_t2i = F.cross_entropy(sim_t2i, hard, label_smoothing=label_smoothing)
    else:
        loss_i2t = F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        loss_t2i = F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    return ItcOutput((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i, targets, image_ids_all)
