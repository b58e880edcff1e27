"""Image-text matching of BLIP-2 stage 1 (ITM): hard-negative mining, targets and loss.

Glossary: B local batch (this rank), G global batch (all ranks), Q query tokens.

For every local image one negative text, and for every local text one negative image, is drawn
from the whole global batch with probability ``softmax(ITC logits)`` over the non-positive
columns (BLIP's hard-negative mining; LAVIS ``blip2_qformer``). The ITM batch is 3B pairs laid
out as ``[positives (image i, text i) | (negative image, text i) | (image i, negative text)]``
with targets ``[1] * B + [0] * 2B``; the matched/unmatched logit of a pair is the ITM head
averaged over the Q query outputs.

Positives: with image ids, every column sharing the row's image id (all captions of one image);
without them, the row's own column ``rank * B + i``. The own column is always a positive. With
text ids (one per distinct caption string, e.g. ``data.batch.stable_id`` of the text) every
column whose caption equals the row's caption is a positive too: a duplicate caption describes
both images (web corpora repeat captions; the synthetic corpus repeats whole scenes), so mining
it as a "hard negative" teaches the ITM head to call a true pair unmatched (the demo's head then
stayed at the constant 1/3 guess).

A row with no negative at all (every sample of the global batch shares its ids) still gets
an index, so the 3B layout keeps its shape on every rank: uniformly at random one of the other
columns (the own column if G == 1). That pair is *not* a true negative; :func:`has_negative`
flags such rows, and :func:`itm_loss` leaves their negative pairs out when given the flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer_lightning.distributed import rank_and_world


def _same(local: Tensor | None, global_: Tensor | None, device: torch.device) -> Tensor | None:
    """(B, G) bool ``local[i] == global_[j]``, or ``None`` without ids."""
    if local is None or global_ is None:
        return None
    return local.to(device)[:, None] == global_.to(device)[None, :]


def _own_and_positive(
    batch: int,
    global_batch: int,
    image_ids_local: Tensor | None,
    image_ids_global: Tensor | None,
    rank: int,
    device: torch.device,
    text_ids_local: Tensor | None = None,
    text_ids_global: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(B, G) bool masks: the own column ``rank * B + i``, and all positives (own included): the
    same image id or, with text ids, the same caption."""
    own = F.one_hot(rank * batch + torch.arange(batch, device=device), global_batch).bool()  # (B, G)
    positives = own
    for same in (_same(image_ids_local, image_ids_global, device), _same(text_ids_local, text_ids_global, device)):
        if same is not None:
            positives = positives | same
    return own, positives


def has_negative(
    image_ids_local: Tensor | None,
    image_ids_global: Tensor | None,
    global_batch: int,
    text_ids_local: Tensor | None = None,
    text_ids_global: Tensor | None = None,
) -> Tensor:
    """Whether each local sample has at least one true negative in the global batch.

    Args:
        image_ids_local: (B,) image ids, or ``None`` (then only the own column is positive).
        image_ids_global: (G,) image ids of all ranks in rank order, or ``None``.
        global_batch: G.
        text_ids_local: (B,) caption ids (equal captions, equal ids), or ``None``.
        text_ids_global: (G,) caption ids of all ranks in rank order, or ``None``.

    Returns:
        (B,) bool (with neither kind of id: shape (1,), broadcastable). The flag holds for both
        directions, as image j and text j share their ids.
    """
    if image_ids_local is None and text_ids_local is None:
        return torch.full((1,), global_batch > 1, dtype=torch.bool)
    local = image_ids_local if image_ids_local is not None else text_ids_local
    positives = torch.zeros(local.shape[0], global_batch, dtype=torch.bool, device=local.device)  # (B, G)
    for same in (_same(image_ids_local, image_ids_global, local.device), _same(text_ids_local, text_ids_global, local.device)):
        if same is not None:
            positives = positives | same
    return (~positives).any(dim=1)


def negative_weights(logits: Tensor, own: Tensor, positives: Tensor) -> Tensor:
    """Sampling distribution over the global columns for each local row.

    Args:
        logits: (B, G) ITC logits (any float dtype; non-finite entries count as 0 so that a
            diverged step cannot crash the sampler, the loss guard sees the non-finite loss).
        own: (B, G) bool, the row's own column.
        positives: (B, G) bool, all positives (``own`` included).

    Returns:
        (B, G) float32 rows summing to 1: ``softmax(logits)`` restricted to the non-positives;
        rows without any non-positive get the uniform distribution over the non-own columns
        (over the own column when G == 1).
    """
    scores = logits.detach().float()
    scores = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    usable = ~positives.all(dim=1, keepdim=True)  # (B, 1)
    masked = scores.masked_fill(positives & usable, float("-inf"))  # unusable rows stay finite
    weights = torch.softmax(masked, dim=1)  # (B, G)
    if positives.shape[1] > 1:
        fallback = (~own).float()
    else:
        fallback = own.float()
    fallback = fallback / fallback.sum(dim=1, keepdim=True)
    return torch.where(usable, weights, fallback)


def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids_local: Tensor | None = None,
    image_ids_global: Tensor | None = None,
    generator: torch.Generator | None = None,
    rank: int | None = None,
    text_ids_local: Tensor | None = None,
    text_ids_global: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One hard negative image per local text and one hard negative text per local image.

    Args:
        sim_i2t: (B, G) logits of local images vs all texts (:class:`ItcOutput.sim_i2t`).
        sim_t2i: (B, G) logits of local texts vs all images.
        image_ids_local: (B,) image ids of the local samples, or ``None``.
        image_ids_global: (G,) image ids of all samples in rank order, or ``None``.
        generator: random generator on the logits' device (seed it for reproducible draws).
        rank: this rank (the local rows are global rows ``rank * B + i``); default: the
            process group's rank, 0 without one.
        text_ids_local: (B,) caption ids (equal captions, equal ids), or ``None``: columns with the row's
            caption are positives, never drawn.
        text_ids_global: (G,) caption ids of all samples in rank order, or ``None``.

    Returns:
        ``(neg_image_index, neg_text_index)``, each (B,) int64 indices into the GLOBAL batch:
        ``neg_image_index[i]`` is the negative image of local text i, ``neg_text_index[i]`` the
        negative text of local image i. Never a positive unless the row has no negative at all
        (see :func:`has_negative` and the module docstring).
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape != sim_t2i.shape:
        raise ValueError(
            f"sim_i2t and sim_t2i must both be (B, G), got {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}"
        )
    batch, global_batch = sim_i2t.shape
    rank = rank_and_world()[0] if rank is None else rank
    if (rank + 1) * batch > global_batch:
        raise ValueError(f"rank {rank} with local batch {batch} does not fit a global batch of {global_batch}")
    if (image_ids_local is None) != (image_ids_global is None):
        raise ValueError("give both image_ids_local and image_ids_global, or neither")
    if (text_ids_local is None) != (text_ids_global is None):
        raise ValueError("give both text_ids_local and text_ids_global, or neither")
    for name, ids in (("image_ids_global", image_ids_global), ("text_ids_global", text_ids_global)):
        if ids is not None and ids.shape != (global_batch,):
            raise ValueError(f"{name} must have shape ({global_batch},), got {tuple(ids.shape)}")
    own, positives = _own_and_positive(
        batch, global_batch, image_ids_local, image_ids_global, rank, sim_i2t.device, text_ids_local, text_ids_global
    )
    with torch.no_grad():
        weights_t2i = negative_weights(sim_t2i, own, positives)  # (B, G) over images
        weights_i2t = negative_weights(sim_i2t, own, positives)  # (B, G) over texts
        neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)  # (B,)
        neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)  # (B,)
    return neg_image, neg_text


def itm_targets(batch: int, device: torch.device | str | None = None) -> Tensor:
    """Matched (1) / unmatched (0) labels of the 3B ITM pairs: ``[1] * B + [0] * 2B`` (3B,) int64."""
    return torch.cat(
        [torch.ones(batch, dtype=torch.long, device=device), torch.zeros(2 * batch, dtype=torch.long, device=device)]
    )


def itm_logits_from_queries(head_output: Tensor) -> Tensor:
    """ITM logits of a pair: the ITM head's output averaged over queries, (3B, Q, 2) -> (3B, 2)."""
    if head_output.dim() != 3:
        raise ValueError(f"head_output must be (3B, Q, 2), got {tuple(head_output.shape)}")
    return head_output.mean(dim=1)


def itm_loss(logits: Tensor, targets: Tensor, negative_valid: Tensor | None = None) -> Tensor:
    """Cross-entropy of the matched/unmatched classifier, averaged over the used pairs.

    Args:
        logits: (3B, 2) ITM logits in the ``[pos | neg image | neg text]`` layout.
        targets: (3B,) from :func:`itm_targets`.
        negative_valid: optional (B,) bool from :func:`has_negative`; the two negative pairs of
            a row without a true negative are left out of the mean. ``None``: all 3B pairs count.

    Returns:
        scalar loss (float32).
    """
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"logits must be (3B, 2) matching targets (3B,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if negative_valid is None:
        return F.cross_entropy(logits.float(), targets)
    batch = logits.shape[0] // 3
    valid = negative_valid.to(logits.device).float().expand(batch)  # (B,)
    weight = torch.cat([torch.ones_like(valid), valid, valid])  # (3B,)
    per_pair = F.cross_entropy(logits.float(), targets, reduction="none")  # (3B,)
    return (per_pair * weight).sum() / weight.sum()
