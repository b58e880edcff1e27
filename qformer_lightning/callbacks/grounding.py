"""Is the model looking at the image? The grounding monitor (docs/grounding.md).

Glossary: B batch, Q queries, Dl LLM width, P positive (true) pairs, N negative (wrong) pairs.

The failure it detects: a generative BLIP-2 model whose soft prompt ignores the image, so that the
frozen LLM writes the same text for every picture (LAVIS issues #463, #407, #552). Its training
loss still falls (the LLM learns the captions' language), so the loss curve does not show it.
:class:`GroundingMonitor` measures it at validation, on the first ``max_batches`` batches:

- ``val/grounding_gap`` (stage 2, captioning, VQA): the task's own teacher-forced LM loss with each
  row given another image of the batch (:func:`rolled_rows`) minus the loss with the true images,
  in nats, averaged over the batches weighted by batch size. About 0 when the prompt ignores the
  image; the more the text depends on the image, the larger.
- ``val/prompt_cosine`` (same tasks): the mean cosine between the flattened soft prompts of two
  different images of a batch (:func:`pairwise_cosine`). Close to 1 when every image gets the
  same prompt.
- ``val/itm_auc`` (stage 1, retrieval): ROC AUC of the ITM match probability of the true pairs
  against in-batch wrong pairs (texts rolled by one, pairs of one image or one caption text left
  out, :func:`wrong_pair_rows`), computed exactly over all validation scores (:func:`roc_auc`).
  0.5 when ITM cannot tell a true pair from a wrong one.

When the gap stays below ``min_gap`` (or the AUC below ``min_auc``) for ``patience`` consecutive
validations, a warning names the collapse. Values are gathered across ranks (DDP, FSDP); the model
runs inside the strategy wrapper's forward (:func:`call_in_forward`), so sharded parameters are
gathered as in a validation step. Rolled images and prompt pairs come from each rank's own batch:
the same data split over more ranks pairs other images, which moves the figures a little.

Added in YAML (keep ``ModelCheckpoint`` last in the list)::

    trainer:
      callbacks:
        - class_path: qformer_lightning.callbacks.GroundingMonitor
          init_args: {max_batches: 4, min_gap: 0.1, patience: 2}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from qformer_lightning.distributed import gather_concat

log = logging.getLogger(__name__)

DOCS = "docs/grounding.md"
GAP_STREAM = 2
"""Seed stream of the prefix-LM split points drawn for the gap (``Stage2.split_seed``; 0: train, 1: validation)."""


# ---------------------------------------------------------------------------- pure computations


def rolled_rows(image_ids: Tensor | None, batch_size: int) -> Tensor | None:
    """For each row, the row whose image it gets in the rolled batch: the first row of the next
    distinct image (in order of first appearance, cyclically). Without ids, every row is its own
    image and this is a roll by one. Rows of one image (VQA: several questions per image) never get
    their own image back.

    Args:
        image_ids: (B,) image id per row, or None.
        batch_size: B.

    Returns:
        (B,) long row indices, or None when the batch shows fewer than 2 distinct images.
    """
    if image_ids is None:
        image_ids = torch.arange(batch_size)
    ids = image_ids.tolist()
    if len(ids) != batch_size:
        raise ValueError(f"{len(ids)} image ids for a batch of {batch_size}")
    first: dict[Any, int] = {}
    for row, image_id in enumerate(ids):
        first.setdefault(image_id, row)
    distinct = list(first)
    if len(distinct) < 2:
        return None
    following = {image_id: first[distinct[(k + 1) % len(distinct)]] for k, image_id in enumerate(distinct)}
    return torch.tensor([following[image_id] for image_id in ids], dtype=torch.long)


def grounding_gap(loss_fn: Callable[[dict[str, Any]], Tensor], batch: dict[str, Any], rows: Tensor) -> tuple[Tensor, Tensor]:
    """The LM loss with the images rolled, and with the true images.

    Args:
        loss_fn: the task's loss of a batch (e.g. ``Stage2.compute_loss``), a scalar.
        batch: ``image`` (B, 3, S, S) and whatever ``loss_fn`` reads; nothing else is changed.
        rows: (B,) the row whose image each row gets (:func:`rolled_rows`).

    Returns:
        (rolled loss, true loss), float32 scalars; the gap is their difference.
    """
    true = loss_fn(batch)
    rolled = loss_fn({**batch, "image": batch["image"][rows.to(batch["image"].device)]})
    return rolled.detach().float(), true.detach().float()


def pairwise_cosine(prompts: Tensor, image_ids: Tensor | None = None) -> tuple[Tensor, int]:
    """Mean cosine similarity between the flattened soft prompts of two different images.

    Args:
        prompts: (B, Q, Dl) soft prompts (any trailing shape: each row is flattened).
        image_ids: (B,) ids; pairs of rows of one image are left out. None: every row is an image.

    Returns:
        (mean cosine over the off-diagonal pairs of different images (float64 scalar), number of
        ordered pairs counted). With no such pair: (0.0, 0).
    """
    flat = torch.nn.functional.normalize(prompts.detach().double().flatten(1), dim=1)  # (B, Q*Dl)
    cosine = flat @ flat.T  # (B, B)
    b = flat.shape[0]
    ids = torch.arange(b) if image_ids is None else image_ids.detach().cpu()
    other = (ids[:, None] != ids[None, :]).to(cosine.device)  # (B, B), False on the diagonal
    pairs = int(other.sum())
    if pairs == 0:
        return cosine.new_zeros(()), 0
    return cosine[other].mean(), pairs


def wrong_pair_rows(image_ids: Tensor, texts: list[str]) -> Tensor:
    """Rows whose text, rolled by one (row i gets text i - 1), is a wrong pair for its image: not a
    caption of the same image and not the same caption text.

    Args:
        image_ids: (B,) ids.
        texts: B captions.

    Returns:
        (B,) bool.
    """
    ids = image_ids.detach().cpu()
    if len(texts) != ids.shape[0]:
        raise ValueError(f"{len(texts)} texts for {ids.shape[0]} image ids")
    rolled_texts = texts[-1:] + texts[:-1]
    same_text = torch.tensor([a == b for a, b in zip(texts, rolled_texts)], dtype=torch.bool)
    return (ids != ids.roll(1, 0)) & ~same_text


def roc_auc(positives: Tensor, negatives: Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U): the probability that a positive outscores a negative, ties
    counted one half.

    Args:
        positives: (P,) scores of true pairs.
        negatives: (N,) scores of wrong pairs.

    Raises:
        ValueError: no positive or no negative score.
    """
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError(f"ROC AUC needs positive and negative scores, got {positives.numel()} and {negatives.numel()}")
    scores = torch.cat([positives.flatten(), negatives.flatten()]).double().cpu()  # (P + N,)
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    mid_rank = ends - (counts.double() - 1) / 2  # (U,) average rank of each tie group
    p, n = positives.numel(), negatives.numel()
    rank_sum = mid_rank[inverse[:p]].sum().item()
    return (rank_sum - p * (p + 1) / 2) / (p * n)


def itm_match_probability(logits: Tensor) -> Tensor:
    """(B, 2) ITM logits (column 1 = matched) -> (B,) float32 match probability."""
    return logits.float().softmax(dim=-1)[:, 1]


# ---------------------------------------------------------------------------- running the model


def call_in_forward(trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` as Lightning runs a ``validation_step``: inside the forward of the strategy's
    wrapper (DDP, FSDP1: the root unit's parameters are gathered only there), or of the task itself
    when it is an FSDP2 root unit (its forward hooks gather them), in the precision's autocast.

    ``fn`` may be any function of the task (unlike ``callbacks.tensorboard.call_as_step``, which
    needs a method registered as a root forward under FSDP2). Every rank must call it under FSDP.
    """
    from torch.distributed.fsdp import FSDPModule

    strategy = trainer.strategy
    wrapper = strategy.model if strategy.model is not None else pl_module
    with strategy.precision_plugin.val_step_context():
        if wrapper is pl_module and not isinstance(pl_module, FSDPModule):
            return fn(*args)
        missing = object()
        saved = pl_module.__dict__.get("forward", missing)  # Lightning's own redirection may leave one
        pl_module.forward = fn  # an instance attribute shadows the class's forward for this call
        try:
            return wrapper(*args)
        finally:
            if saved is missing:
                del pl_module.forward
            else:
                pl_module.forward = saved


def soft_prompts(task: Any, batch: dict[str, Any]) -> Tensor:
    """(B, Q, Dl) soft prompts of the batch's images as the task feeds them to the LLM (a VQA task
    that feeds the question to the Q-Former: with the question)."""
    from qformer_lightning.tasks.vqa import VQA

    question = task.qformer_question(list(batch["text"])) if isinstance(task, VQA) else None
    return task.model.soft_prompt(batch["image"], question)


def prefix_generator(task: Any, batch_idx: int) -> torch.Generator | None:
    """The same prefix-LM split points for the true and the rolled batch (None without a prefix LM)."""
    if not getattr(task, "prefix_lm", False):
        return None
    from qformer_lightning.tasks.stage2 import split_seed

    return torch.Generator().manual_seed(split_seed(task.seed, GAP_STREAM, 0, batch_idx, task.global_rank))


@dataclass
class GenerativeMeasure:
    """One batch's generative measurements (see :func:`measure_generative`)."""

    rolled_loss: Tensor
    true_loss: Tensor
    cosine: Tensor
    pairs: int


def measure_generative(task: Any, batch: dict[str, Any], rows: Tensor, batch_idx: int) -> GenerativeMeasure:
    """Rolled and true LM loss (the task's ``compute_loss``) and the soft prompts' pairwise cosine."""
    rolled, true = grounding_gap(lambda b: task.compute_loss(b, prefix_generator(task, batch_idx)), batch, rows)
    ids = batch.get("image_id")
    cosine, pairs = pairwise_cosine(soft_prompts(task, batch), ids if isinstance(ids, Tensor) else None)
    return GenerativeMeasure(rolled, true, cosine, pairs)


def measure_itm(task: Any, batch: dict[str, Any], wrong: Tensor) -> tuple[Tensor, Tensor]:
    """ITM match probabilities of the true pairs (B,) and of the wrong rows' rolled pairs (wrong.sum(),)."""
    model = task.model
    ids, mask = task.text(list(batch["text"]), batch["image"].device)  # (B, T)
    embeds = model.image_embeds(batch["image"])  # (B, N, Dv)
    positive = itm_match_probability(model.itm_logits(embeds, ids, mask))
    # every row, kept or not: each rank runs the same passes (FSDP gathers per pass)
    rolled = itm_match_probability(model.itm_logits(embeds, ids.roll(1, 0), mask.roll(1, 0)))  # row i: text i - 1
    return positive, rolled[wrong.to(rolled.device)]


# ---------------------------------------------------------------------------- the callback


class GroundingMonitor(pl.Callback):
    """Log ``val/grounding_gap``, ``val/prompt_cosine`` (generative tasks) or ``val/itm_auc`` (stage 1,
    retrieval) at each validation, and warn when the model ignores the image (module docstring).

    Args:
        max_batches: validation batches measured per validation (from the first; each costs about
            three validation steps).
        min_gap: nats; a gap below it counts as a collapsed validation.
        min_auc: an ITM AUC below it counts as a collapsed validation.
        patience: consecutive collapsed validations before the warning.

    Attributes:
        last: the values logged at the last validation (empty before one).
        skipped: batches left out so far (fewer than 2 distinct images, or no wrong pair / answers).
    """

    def __init__(self, max_batches: int = 4, min_gap: float = 0.1, min_auc: float = 0.6, patience: int = 2) -> None:
        if max_batches < 1 or patience < 1:
            raise ValueError(f"max_batches and patience must be >= 1, got {max_batches}, {patience}")
        if not 0.0 <= min_auc <= 1.0:
            raise ValueError(f"min_auc must be in [0, 1], got {min_auc}")
        self.max_batches = max_batches
        self.min_gap = float(min_gap)
        self.min_auc = float(min_auc)
        self.patience = patience
        self.last: dict[str, float] = {}
        self.skipped = 0
        self._low_gap = 0
        self._low_auc = 0
        self._reset()

    def _reset(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64)  # gap * B, B, cosine * pairs, pairs
        self._positive: list[Tensor] = []
        self._negative: list[Tensor] = []

    @staticmethod
    def kind(pl_module: pl.LightningModule) -> str | None:
        """``"generative"`` (Stage2 and subclasses), ``"itm"`` (Stage1 and subclasses) or None."""
        from qformer_lightning.tasks.stage1 import Stage1
        from qformer_lightning.tasks.stage2 import Stage2

        if isinstance(pl_module, Stage2):
            return "generative"
        if isinstance(pl_module, Stage1):
            return "itm"
        return None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or batch_idx >= self.max_batches:
            return
        kind = self.kind(pl_module)
        if kind is None or not isinstance(batch, dict) or "image" not in batch:
            return
        if kind == "generative":
            self._measure_generative(trainer, pl_module, batch, batch_idx)
        else:
            self._measure_itm(trainer, pl_module, batch)

    def _measure_generative(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any], batch_idx: int) -> None:
        from qformer_lightning.tasks.vqa import VQA

        if isinstance(pl_module, VQA) and "answers" not in batch:  # a split without answers: so on every rank
            self.skipped += 1
            return
        size = batch["image"].shape[0]
        ids = batch.get("image_id")
        rows = rolled_rows(ids if isinstance(ids, Tensor) else None, size)
        weight = size
        if rows is None:  # one image only: measured with weight 0, so that every rank runs the model alike (FSDP, DDP)
            rows, weight = torch.arange(size).roll(1, 0), 0
            self.skipped += 1
        m = call_in_forward(trainer, pl_module, measure_generative, pl_module, batch, rows, batch_idx)
        gap = float(m.rolled_loss - m.true_loss)
        self._sums += torch.tensor([gap * weight, weight, float(m.cosine) * m.pairs, m.pairs], dtype=torch.float64)

    def _measure_itm(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any]) -> None:
        size = batch["image"].shape[0]
        ids = batch["image_id"] if isinstance(batch.get("image_id"), Tensor) else torch.arange(size)
        wrong = wrong_pair_rows(ids, list(batch["text"]))
        if not bool(wrong.any()):
            self.skipped += 1  # still run: every rank runs the model alike (FSDP, DDP)
        positive, negative = call_in_forward(trainer, pl_module, measure_itm, pl_module, batch, wrong)
        self._positive.append(positive.double().cpu())
        self._negative.append(negative.double().cpu())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        kind = self.kind(pl_module)
        if kind == "generative":
            self._finish_generative(trainer, pl_module)
        elif kind == "itm":
            self._finish_itm(trainer, pl_module)

    def _finish_generative(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = gather_concat(self._sums.to(pl_module.device)[None]).sum(0).cpu()  # (4,)
        if sums[1] == 0:
            self._nothing_measured(trainer)
            return
        values = {"val/grounding_gap": float(sums[0] / sums[1])}
        if sums[3] > 0:
            values["val/prompt_cosine"] = float(sums[2] / sums[3])
        self._log(pl_module, values)
        self._low_gap = self._low_gap + 1 if values["val/grounding_gap"] < self.min_gap else 0
        if self._low_gap >= self.patience and trainer.is_global_zero:
            cosine = values.get("val/prompt_cosine", float("nan"))
            log.warning(
                "grounding collapse: the soft prompt ignores the image. The true image lowers the LM loss by only "
                "%.4f nats (val/grounding_gap < min_gap=%g for %d validations in a row; prompt cosine between "
                "images %.4f), so generated text will not depend on the image. See %s",
                values["val/grounding_gap"], self.min_gap, self._low_gap, cosine, DOCS,
            )

    def _finish_itm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        local = torch.cat(self._positive) if self._positive else torch.zeros(0, dtype=torch.float64)
        wrong = torch.cat(self._negative) if self._negative else torch.zeros(0, dtype=torch.float64)
        counts = gather_concat(torch.tensor([[local.numel(), wrong.numel()]], dtype=torch.long, device=device)).sum(0)
        if int(counts[0]) == 0 or int(counts[1]) == 0:
            self._nothing_measured(trainer)
            return
        auc = roc_auc(gather_concat(local.to(device)).cpu(), gather_concat(wrong.to(device)).cpu())
        self._log(pl_module, {"val/itm_auc": auc})
        self._low_auc = self._low_auc + 1 if auc < self.min_auc else 0
        if self._low_auc >= self.patience and trainer.is_global_zero:
            log.warning(
                "ITM collapse: the ITM head does not tell true image-text pairs from wrong ones (val/itm_auc %.4f < "
                "min_auc=%g for %d validations in a row; 0.5 is chance). See %s",
                auc, self.min_auc, self._low_auc, DOCS,
            )

    def _nothing_measured(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            log.warning(
                "GroundingMonitor measured nothing in this validation (%d batches left out so far: fewer than 2 "
                "distinct images, no wrong pair, or no answers)", self.skipped,
            )

    def _log(self, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        self.last = dict(values)
        for name, value in values.items():  # equal on every rank (gathered): the sync averages equal values
            pl_module.log(name, value, prog_bar=True, sync_dist=True)  # and spares Lightning's warning
