"""Seeing the model in TensorBoard: validation examples and the gradient norm.

Glossary: B batch, K examples shown, Q queries, E ITC width, S image side.

- :class:`ValidationExamples`: at the first validation batch of each validation run, a stage-2
  task (``Stage2``, ``Caption``, ``VQA``) runs its own ``predict_step`` on K samples of the batch
  (captions, or answers to their questions: K more generations besides the validation step's,
  with the same deterministic settings); the table shows what was asked (the VQA question, else
  the prompt), the generated text and the reference (the caption, or the human answers with their
  counts and the answer's VQA accuracy); a stage-1/retrieval model
  ranks the batch's images for K of its captions (ITC) and shows the top hits, a green frame
  on the true image, red on the others. Images go to ``add_image``, the texts to ``add_text``
  (a Markdown table). A no-op unless the trainer has a ``TensorBoardLogger``.
- :class:`GradNormMonitor`: logs the total norm of the trainable parameters' gradients before
  each optimizer step (after AMP unscaling), as ``train/grad_norm``; works with every logger.

Both are added in YAML::

    trainer:
      callbacks:
        - class_path: qformer_lightning.callbacks.ValidationExamples
          init_args: {num_examples: 4}
        - qformer_lightning.callbacks.GradNormMonitor
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.metrics.vqa import vqa_accuracy
from qformer_lightning.tasks.predict import batch_requests

GREEN = (0.0, 0.8, 0.0)
RED = (0.9, 0.0, 0.0)


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first ``TensorBoardLogger``, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def call_as_step(trainer: pl.Trainer, pl_module: pl.LightningModule, method: str, *args: Any) -> Any:
    """Run ``pl_module.<method>(*args)`` as Lightning runs a ``validation_step``: through the strategy's
    wrapper (FSDP1 gathers the root unit's parameters only in its forward) and in the precision's
    autocast. Under FSDP2 the task is its own root unit, with ``method`` registered as a forward
    (``qformer_lightning.scale.fsdp.ROOT_FORWARD_METHODS``). Every rank must call it under FSDP.
    """
    strategy = trainer.strategy
    with strategy.precision_plugin.val_step_context():
        if strategy.model is not None and strategy.model is not pl_module:
            return strategy._forward_redirection(strategy.model, pl_module, method, *args)
        return getattr(pl_module, method)(*args)


def denormalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(B, 3, S, S) normalised -> (B, 3, S, S) float32 in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() * s + m).clamp_(0.0, 1.0)


def frame(image: Tensor, color: tuple[float, float, float], width: int = 2) -> Tensor:
    """A copy of (3, S, S) ``image`` with a ``width``-pixel frame of ``color``."""
    out = image.clone()
    c = torch.tensor(color, dtype=out.dtype, device=out.device).view(3, 1, 1)
    out[:, :width, :] = c
    out[:, -width:, :] = c
    out[:, :, :width] = c
    out[:, :, -width:] = c
    return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard renders it); ``|`` and newlines in cells are escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def retrieval_topk(image_feats: Tensor, text_feats: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """ITC ranking of images for each text query.

    Args:
        image_feats: (I, Q, E) normalised query features of I images.
        text_feats: (X, E) normalised text features of X queries.
        k: hits kept per query (at most I).

    Returns:
        scores (X, k) max-over-queries cosines, best first, and the image indices (X, k).
    """
    sim = torch.einsum("iqe,xe->xiq", image_feats.float(), text_feats.float()).amax(dim=-1)  # (X, I)
    return sim.topk(min(k, sim.shape[1]), dim=1)


def first_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """The first ``k`` samples of a batch dict: tensors and lists of batch length are cut, the rest kept."""
    size = batch["image"].shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, (Tensor, list, tuple)) and len(value) == size:
            out[key] = value[:k]
        else:
            out[key] = value
    return out


def generated_text(record: dict[str, Any]) -> str:
    """The generated text of a ``predict_step`` record (``output``, ``caption`` or ``answer``)."""
    for key in ("output", "caption", "answer", "text"):
        if key in record:
            return str(record[key])
    return json.dumps(record, default=str)


def answer_counts(answers: Sequence[str]) -> str:
    """Human answers with their counts, most frequent first (ties: first listed): ``"yellow ×8, orange ×2"``."""
    return ", ".join(f"{answer} ×{count}" for answer, count in Counter(answers).most_common())


def reference_text(batch: dict[str, Any], i: int) -> str:
    """What sample ``i`` should have given: a VQA batch's human answers (counted), else its caption ``text``."""
    if "answers" in batch:
        return answer_counts(batch["answers"][i])
    text = batch.get("text")
    return text[i] if text is not None else ""


def generation_rows(
    batch: dict[str, Any], records: Sequence[dict[str, Any]], task_prompt: str
) -> tuple[list[str], list[list[Any]]]:
    """The table of generated examples: header and one row per record.

    Each row: the sample number, what was asked (a VQA question, else the LLM prompt, the request's
    prompt or the task's prompt), the generated text and the reference (:func:`reference_text`); a
    VQA batch (``answers``) adds the official accuracy of the generated answer (percent).
    """
    requests = batch_requests(batch, score_texts=False)
    scored = "answers" in batch
    header = ["#", "question / prompt", "generated", "reference"] + (["VQA acc"] if scored else [])
    rows = []
    for i, (request, record) in enumerate(zip(requests, records)):
        asked = request.get("question") or record.get("llm_prompt") or request.get("prompt") or task_prompt
        generated = generated_text(record)
        row = [i, asked, generated, reference_text(batch, i)]
        if scored:
            row.append(f"{100 * vqa_accuracy(generated, batch['answers'][i]):.0f}")
        rows.append(row)
    return header, rows


class ValidationExamples(pl.Callback):
    """Log K validation images with the model's captions/answers, or retrieval examples (module docstring).

    Every rank runs the model on the examples (so sharded models work); global rank 0 writes.

    Args:
        num_examples: K, images captioned (stage 2) or caption queries ranked (stage 1).
        top_k: images shown per query (stage 1).
        tag: the TensorBoard tag prefix.
    """

    def __init__(self, num_examples: int = 4, top_k: int = 3, tag: str = "val_examples") -> None:
        if num_examples < 1 or top_k < 1:
            raise ValueError(f"num_examples and top_k must be >= 1, got {num_examples}, {top_k}")
        self.num_examples = num_examples
        self.top_k = top_k
        self.tag = tag

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        writer = tensorboard_writer(trainer)
        if writer is None or not isinstance(batch, dict) or "image" not in batch:
            return
        from qformer_lightning.tasks.stage1 import Stage1
        from qformer_lightning.tasks.stage2 import Stage2

        if isinstance(pl_module, Stage2):
            self.log_generation(trainer, pl_module, batch, writer)
        elif isinstance(pl_module, Stage1):
            self.log_retrieval(trainer, pl_module, batch, writer)

    @staticmethod
    def _norm(pl_module: pl.LightningModule) -> tuple[tuple[float, ...], tuple[float, ...]]:
        encoder = next((m for m in pl_module.modules() if isinstance(m, TimmVisionEncoder)), None)
        if encoder is None:
            raise ValueError("ValidationExamples needs a model with a TimmVisionEncoder (for the image normalisation)")
        return encoder.mean, encoder.std

    @torch.no_grad()
    def log_generation(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any], writer: Any) -> None:
        """The task's own ``predict_step`` on the first K samples: an image grid and a table
        (question or prompt, generated text, reference)."""
        k = min(self.num_examples, batch["image"].shape[0])
        head = first_rows(batch, k)
        records = call_as_step(trainer, pl_module, "predict_step", head, 0)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        mean, std = self._norm(pl_module)
        writer.add_image(f"{self.tag}/images", make_grid(denormalize(head["image"], mean, std).cpu(), nrow=k, padding=2), step)
        header, rows = generation_rows(head, records, pl_module.prompt)
        writer.add_text(f"{self.tag}/generated", markdown_table(header, rows), step)

    @torch.no_grad()
    def log_retrieval(self, trainer: pl.Trainer, pl_module: Any, batch: dict[str, Any], writer: Any) -> None:
        """Rank the batch's distinct images for K of its captions (ITC); one grid row per query."""
        image_ids = batch["image_id"].tolist()
        first = {}
        for i, image_id in enumerate(image_ids):
            first.setdefault(image_id, i)
        gallery = list(first.values())  # one row per distinct image
        num_queries = min(self.num_examples, len(image_ids))
        texts = list(batch["text"][:num_queries])
        images = batch["image"][gallery]  # (I, 3, S, S)
        image_feats, text_feats = call_as_step(trainer, pl_module, "itc_features", images, texts)  # (I, Q, E), (X, E)
        scores, hits = retrieval_topk(image_feats, text_feats, self.top_k)  # (X, k)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        mean, std = self._norm(pl_module)
        shown = denormalize(images, mean, std).cpu()
        tiles, rows = [], []
        for x in range(num_queries):
            ranked = []
            for score, hit in zip(scores[x].tolist(), hits[x].tolist()):
                correct = image_ids[gallery[hit]] == image_ids[x]
                tiles.append(frame(shown[hit], GREEN if correct else RED))
                ranked.append(f"{'✓' if correct else '✗'} image {image_ids[gallery[hit]]} ({score:.3f})")
            rows.append([x, texts[x], image_ids[x], "; ".join(ranked)])
        grid = make_grid(torch.stack(tiles), nrow=hits.shape[1], padding=2)
        writer.add_image(f"{self.tag}/retrieval", grid, step)
        table = markdown_table(["query", "text", "true image", f"top {hits.shape[1]} of {len(gallery)} images (ITC)"], rows)
        writer.add_text(f"{self.tag}/retrieval", table, step)


def total_grad_norm(parameters: list[torch.nn.Parameter], norm_type: float = 2.0) -> Tensor | None:
    """The ``norm_type`` norm of all gradients together (a sharded DTensor norm is made whole); None without gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm


class GradNormMonitor(pl.Callback):
    """Log the total gradient norm of the trainable parameters before each optimizer step.

    Args:
        norm_type: the p of the p-norm (2: Euclidean).
        name: the logged metric name.
    """

    def __init__(self, norm_type: float = 2.0, name: str = "train/grad_norm") -> None:
        self.norm_type = float(norm_type)
        self.name = name

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        norm = total_grad_norm([p for p in pl_module.parameters() if p.requires_grad], self.norm_type)
        if norm is not None:
            pl_module.log(self.name, norm.detach().float(), on_step=True, on_epoch=False)
