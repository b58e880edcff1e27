"""``torch.compile`` the transformer blocks of a task, from YAML.

Compiling block by block (every ViT block, Q-Former layer and LLM layer is its own compiled
function) keeps compile time bounded by the number of distinct block shapes, not the depth, and
leaves the Python around the blocks (masks, losses, gathering) eager. The block classes are the
ones the FSDP wrap policy knows (:data:`qformer_lightning.scale.fsdp.DEFAULT_BLOCKS`).

Use it by adding the callback::

    trainer:
      callbacks+:
        - class_path: qformer_lightning.callbacks.CompileBlocks
          init_args: {targets: [vision]}   # the frozen ViT: one shape, the biggest win per second of compiling

Where it pays has to be measured on the device (``tools/benchmark_train.py --compile``): the
Q-Former runs several passes of different lengths (query, text, query + text, decoder), each a
compilation of its own.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from qformer_lightning.scale.fsdp import DEFAULT_BLOCKS, import_classes

TARGETS = ("vision", "qformer", "llm")
"""The parts of a task's model whose blocks can be compiled (attribute names of ``task.model``)."""


def compile_blocks(model: nn.Module, targets: tuple[str, ...], block_classes: tuple[type[nn.Module], ...], **options: Any) -> list[str]:
    """``module.compile(**options)`` in place for every block of ``model.<target>``.

    Args:
        model: the task's model (with ``vision`` / ``qformer`` / ``llm`` attributes).
        targets: which of :data:`TARGETS` to compile.
        block_classes: the block types.
        **options: ``torch.compile`` options (``mode``, ``dynamic``, ``fullgraph``).

    Returns:
        The compiled blocks' names (relative to ``model``).

    Raises:
        ValueError: a target the model does not have.
    """
    compiled = []
    for target in targets:
        part = getattr(model, target, None)
        if not isinstance(part, nn.Module):
            raise ValueError(f"compile target {target!r}: this model ({type(model).__name__}) has no {target!r} part")
        for name, module in part.named_modules():
            if isinstance(module, block_classes):
                module.compile(**options)
                compiled.append(f"{target}.{name}")
    return compiled


class CompileBlocks(pl.Callback):
    """Compile the blocks of ``task.model`` once, before the first training, validation, test or
    predict step (after the strategy has wrapped the model and the frozen weights are loaded).

    Args:
        targets: parts to compile, a subset of ``vision``, ``qformer``, ``llm`` (default: all
            that the model has).
        block_classes: import paths of the block types (default: the FSDP policy's list).
        mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``).
        dynamic: ``torch.compile``'s ``dynamic`` (None: decided by PyTorch).
        fullgraph: fail on graph breaks instead of falling back.
    """

    def __init__(
        self,
        targets: list[str] | None = None,
        block_classes: list[str] | None = None,
        mode: str | None = None,
        dynamic: bool | None = None,
        fullgraph: bool = False,
    ) -> None:
        unknown = sorted(set(targets or ()) - set(TARGETS))
        if unknown:
            raise ValueError(f"unknown compile targets {unknown}: choose from {list(TARGETS)}")
        self.targets = tuple(targets) if targets is not None else None
        self.block_classes = import_classes(block_classes or list(DEFAULT_BLOCKS))
        self.options = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}
        self.compiled: list[str] = []
        self._done = False

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:
            return
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", True):
            raise ValueError(
                "CompileBlocks under FSDPStrategy needs use_orig_params: true (Lightning's default; compiled blocks must see their own "
                "parameters, not views of FSDP's flat parameter); or use configs/strategy/fsdp2.yaml"
            )
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"CompileBlocks expects a task with a `model` attribute, got {type(pl_module).__name__}")
        targets = self.targets or tuple(t for t in TARGETS if isinstance(getattr(model, t, None), nn.Module))
        self.compiled = compile_blocks(model, targets, self.block_classes, **self.options)
        if not self.compiled:
            raise ValueError(f"CompileBlocks found no block of {[c.__name__ for c in self.block_classes]} in {list(targets)}")
        self._done = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)
