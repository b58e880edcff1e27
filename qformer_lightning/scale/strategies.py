"""Lightning's sharded strategies fitted to BLIP-2 (``configs/strategy/fsdp.yaml``, ``fsdp2.yaml``).

:class:`FSDPStrategy` (FSDP1) and :class:`ModelParallelStrategy` (FSDP2, sharded by
``Blip2Task.configure_model``) are Lightning's classes of the same names and arguments, plus:

- **Atomic sharded checkpoints.** A sharded checkpoint is a directory (one shard file per rank,
  ``meta.pt``) that Lightning writes in place, without a ``CheckpointIO`` (so the CLI's
  ``AtomicCheckpointIO`` never sees it): a crash during the save of ``last.ckpt`` would leave new
  shards beside old metadata. Here it is written beside the target and swapped in
  (:func:`~qformer_lightning.scale.checkpointing.swap_in`); the previous checkpoint stays loadable.
- **Resume without the dropped frozen weights.** The task leaves frozen weights that have a source
  out of its checkpoints (``checkpoint["qformer_lightning"]["dropped_frozen_keys"]``); Lightning's
  loaders ask the checkpoint for every tensor of the model (strict loading; torch's distributed
  checkpoint refuses a key the checkpoint lacks). Here every tensor the
  checkpoint holds is loaded, and exactly the dropped ones keep the values they were built with
  (from their source). Any other missing key, or one the model does not have, is an error naming
  them (unless the task's ``strict_loading`` is off). The returned checkpoint carries
  ``LOAD_REPORT`` (what was loaded, what was left out): the task's ``on_load_checkpoint`` then
  knows the tensors were checked.
- **FSDP1 on a CPU** (gloo): Lightning refuses ``FSDPStrategy`` without a GPU; torch's FSDP1 runs
  on CPU when it is given the CPU device.
- **FSDP1 keeps the task's ``frozen_dtype``**: Lightning's precision plugin converts the whole
  module to the precision's dtype before wrapping (``32-true``: fp32) and gives FSDP an fp32
  "mixed precision" that computes every unit in fp32; here the frozen modules are cast back
  (``Blip2Task.cast_frozen``) and ``32-true`` uses no mixed precision, so bf16 frozen units stay bf16.
- **Scalar parameters** (stage 1's ITC temperature): FSDP refuses 0-dim parameters; they stay
  whole on every rank, outside FSDP, with gradients averaged over the ranks
  (:func:`~qformer_lightning.scale.fsdp.average_gradients_over`), as DDP would.
- **FSDP1 optimizer groups from the real shapes**: ``configure_optimizers`` runs with the trainable
  units gathered (weight decay is chosen by ``param.ndim``, and FSDP1 shows flat shards outside forward).
- **FSDP1 full (one-file) checkpoints with the right optimizer state**: FSDP1's rank-0-only
  gathering of the optimizer state (Lightning's path) puts wrong moments in the file; here it is
  gathered by ``torch.distributed.checkpoint.state_dict`` on every rank, keyed by parameter name,
  and loaded back by name.
- **Resume from a one-file checkpoint of DDP or one device** (both strategies): its optimizer state,
  keyed by parameter position, is re-keyed by name (:func:`name_positional_state`, checked group
  by group and shape by shape) and sharded; Lightning's loaders fail on it.
- **Units called through another method** (the vision encoder calls ``vit.forward_features``, the
  LLM adapter embeds prompts and generates outside its ``forward``): FSDP1 gathers their parameters
  there too (:func:`~qformer_lightning.scale.fsdp.route_through_forward`).
- **FSDP1 gradient clipping by norm** (``gradient_clip_val``): Lightning refuses it under FSDP1; here
  it is the root unit's ``clip_grad_norm_``, the norm of the whole gradient over all shards.
- **FSDP1 ``bf16-mixed`` is autocast**, as under DDP and FSDP2 (Lightning's casts every unit's
  parameters to bf16 and autocasts on CUDA only): see :attr:`FSDPStrategy.mixed_precision_config`.
- ``ModelParallelStrategy(data_parallel_size="auto")`` shards over every rank that tensor
  parallelism does not use (Lightning's ``auto`` is the number of nodes, which with
  ``tensor_parallel_size: 1`` fails on any node with more than one device).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context, _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from qformer_lightning.scale.checkpointing import directory_temporary, recover_interrupted_swap, swap_in
from qformer_lightning.scale.fsdp import UNIT_FORWARD_METHODS, average_gradients_over, route_through_forward, scalar_parameters

LOAD_REPORT = "qformer_lightning_sharded_load"
"""Key of the loaded checkpoint dict: ``{"path", "loaded": [keys], "left_out": [keys]}``."""


def dropped_keys_of(checkpoint: dict[str, Any]) -> set[str]:
    """The frozen weights the task left out of ``checkpoint`` (its metadata, without tensors)."""
    meta = checkpoint.get("qformer_lightning") or {}
    return set(meta.get("dropped_frozen_keys", ()))


def sharded_checkpoint_keys(path: Path) -> set[str]:
    """The state keys of the distributed (sharded) checkpoint ``path``, read from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def stored_tensor_keys(keys: set[str], prefix: str) -> set[str]:
    """The module-state keys among a sharded checkpoint's ``keys``: those under ``prefix``, without it."""
    head = prefix + "."
    return {k[len(head):] for k in keys if k.startswith(head)}


SHARDED_WRITERS = {"model": "FSDP1 (configs/strategy/fsdp.yaml)", "state_dict": "FSDP2 (configs/strategy/fsdp2.yaml)"}
"""The key under which each strategy stores the module state in a sharded checkpoint."""


def check_sharded_writer(keys: set[str], state_key: str, path: Path) -> None:
    """Raise if the sharded checkpoint ``path`` (state ``keys``) holds no module state under
    ``state_key`` but under the other strategy's key: FSDP1 and FSDP2 lay out their sharded
    checkpoints differently.

    Raises:
        ValueError: naming the strategy that wrote it.
    """
    heads = {key.split(".", 1)[0] for key in keys}
    if state_key in heads:
        return
    writers = [SHARDED_WRITERS[h] for h in sorted(heads) if h in SHARDED_WRITERS]
    if writers:
        raise ValueError(
            f"{path} is a sharded checkpoint of {writers[0]}, this run's strategy stores its state otherwise: "
            "resume it with the strategy that wrote it"
        )


def check_loadable(model_keys: set[str], stored: set[str], dropped: set[str], path: Path, strict: bool) -> list[str]:
    """The model keys the checkpoint lacks (its dropped frozen weights).

    Raises:
        ValueError: with ``strict``, a missing key that was not dropped, or a stored key the model
            does not have (both named).
    """
    missing = sorted(model_keys - stored)
    unexplained = [k for k in missing if k not in dropped]
    unexpected = sorted(stored - model_keys)
    if strict and (unexplained or unexpected):
        raise ValueError(
            f"checkpoint {path} does not fit this model: missing {unexplained[:20]} ({len(unexplained)} in all, "
            f"besides the {len(dropped)} frozen weights it dropped), unexpected {unexpected[:20]} ({len(unexpected)})"
        )
    return missing


def is_positional(state: dict[str, Any]) -> bool:
    """Whether an optimizer state dict is keyed by parameter position (``torch.optim``'s own format, as
    DDP and one device save it) rather than by parameter name."""
    return not all(isinstance(key, str) for key in state.get("state", {}))


def name_positional_state(state: dict[str, Any], current: dict[str, Any], path: Path) -> dict[str, Any]:
    """Re-key a position-keyed optimizer state by the parameter names of this run's optimizer.

    Position k of group g is this run's k-th parameter of group g: the task's
    ``configure_optimizers`` builds the same groups, in the same order, under every strategy.
    That is checked: the group sizes and their weight decay must agree, and every state tensor
    must have its parameter's shape.

    Args:
        state: the checkpoint's optimizer state (``{"state": {int: ...}, "param_groups": [...]}``).
        current: this run's optimizer state as ``get_optimizer_state_dict(full_state_dict=True)``
            gives it (keyed by name).
        path: the checkpoint, for the messages.

    Raises:
        ValueError: groups or shapes that do not match (another task or another optimizer setup).
    """
    groups, ours = state["param_groups"], current["param_groups"]
    sizes, our_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in ours]
    decays, our_decays = [g.get("weight_decay") for g in groups], [g.get("weight_decay") for g in ours]
    if sizes != our_sizes or decays != our_decays:
        raise ValueError(
            f"{path}: its optimizer has parameter groups of sizes {sizes} (weight decay {decays}), this run's "
            f"{our_sizes} ({our_decays}): the optimizer state cannot be matched to the parameters"
        )
    names = {}
    for group, our_group in zip(groups, ours):
        names.update(zip(group["params"], our_group["params"]))
    named = {names[position]: entry for position, entry in state["state"].items()}
    for name, entry in named.items():
        for key, value in entry.items():
            expected = current["state"].get(name, {}).get(key)
            if isinstance(value, torch.Tensor) and value.dim() and (expected is None or value.shape != expected.shape):
                raise ValueError(
                    f"{path}: optimizer state {key} of {name} has shape {tuple(value.shape)}, the parameter "
                    f"{None if expected is None else tuple(expected.shape)}"
                )
    return {"state": named, "param_groups": [{**g, "params": o["params"]} for g, o in zip(groups, ours)]}


class _ShardedCheckpoints:
    """Atomic saves and loads without the dropped frozen weights (module docstring), for both strategies.

    Subclasses say under which key Lightning stores the module state (``_STATE_KEY``), whether
    checkpoints are sharded, how to list the model's state keys and how to load the tensors.
    """

    _STATE_KEY: str

    def _saves_sharded(self) -> bool:
        raise NotImplementedError

    def _model_state_keys(self) -> set[str]:
        raise NotImplementedError

    def _load_sharded_tensors(self, path: Path, stored: set[str]) -> None:
        raise NotImplementedError

    def _load_file(self, checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
        """Load a one-file checkpoint (a full-state-dict save, or one of DDP or one device), as read
        from ``path``: the weights, and when fitting the optimizer state by parameter name
        (position-keyed states are re-keyed: :func:`name_positional_state`). Returns the rest of it.

        Raises:
            ValueError: another number of optimizers, or a state that does not match this run's.
        """
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

        _load_raw_module_state(checkpoint.pop("state_dict"), module=self.model, world_size=self.world_size, strict=False)
        states = checkpoint.get("optimizer_states")  # left in: Lightning checks that it is there
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(states) != len(self.optimizers):
            raise ValueError(f"{path} holds {len(states)} optimizer states, this run has {len(self.optimizers)} optimizers")
        options = StateDictOptions(full_state_dict=True)
        for optimizer, state in zip(self.optimizers, states):
            if is_positional(state):
                state = name_positional_state(state, get_optimizer_state_dict(self.model, optimizer, options=options), path)
            set_optimizer_state_dict(self.model, optimizer, state, options=options)
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Sharded: write the directory beside ``filepath``, then swap it in (rank 0). Full: Lightning's
        single file through the ``CheckpointIO`` (atomic under the CLI)."""
        if not self._saves_sharded():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        token = self.broadcast(str(os.getpid()))  # rank 0's: one temporary name for all ranks
        if self.is_global_zero:
            recover_interrupted_swap(path)
        self.barrier()
        tmp = directory_temporary(path, token)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.is_global_zero:
            swap_in(tmp, path, token)
        self.barrier()
        return None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load every stored tensor (weights and optimizer state); leave only the dropped frozen weights."""
        path = Path(self.broadcast(checkpoint_path))
        if self.is_global_zero:
            recover_interrupted_swap(path)
        self.barrier()
        strict = self.lightning_module.strict_loading
        if _is_sharded_checkpoint(path):
            metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
            keys = sharded_checkpoint_keys(path)
            check_sharded_writer(keys, self._STATE_KEY, path)
            stored = stored_tensor_keys(keys, self._STATE_KEY)
            left_out = check_loadable(self._model_state_keys(), stored, dropped_keys_of(metadata), path, strict)
            self._load_sharded_tensors(path, stored)
        else:  # one file (a full-state-dict save, or a checkpoint of another strategy)
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
            stored = set(checkpoint["state_dict"])
            left_out = check_loadable(self._model_state_keys(), stored, dropped_keys_of(checkpoint), path, strict)
            metadata = self._load_file(checkpoint, path)
        metadata[LOAD_REPORT] = {"path": str(path), "loaded": sorted(stored), "left_out": left_out}
        return metadata


class Blip2FSDPPrecision(FSDPPrecision):
    """Lightning's FSDP1 precision with two changes.

    - Clipping by norm goes through the root unit's ``clip_grad_norm_``. Lightning's raises (it has
      no handle on the root unit), and ``torch.nn.utils.clip_grad_norm_`` would clip each rank's
      shard by its own norm.
    - ``bf16-mixed`` / ``16-mixed`` autocast on the device the model runs on. Lightning's autocasts
      on ``"cuda"`` only, a no-op on CPU; with :attr:`FSDPStrategy.mixed_precision_config` this makes
      FSDP1's mixed precision the autocast of DDP and FSDP2.
    """

    def __init__(self, precision: Any, scaler: Any, root: Callable[[], nn.Module], device_type: Callable[[], str]) -> None:
        super().__init__(precision, scaler)
        self._root = root
        self._device_type = device_type

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        self._root().clip_grad_norm_(clip_val)

    def forward_context(self) -> Any:
        if "mixed" in self.precision:
            return torch.autocast(self._device_type(), dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()


class FSDPStrategy(_ShardedCheckpoints, _LightningFSDPStrategy):
    """Lightning's ``FSDPStrategy`` (same arguments) with the additions of the module docstring."""

    _STATE_KEY = "model"

    def setup(self, trainer: Any) -> None:
        """Lightning's setup, with :class:`Blip2FSDPPrecision` in place of its FSDP precision."""
        plugin = self.precision_plugin
        if type(plugin) is FSDPPrecision:
            self.precision_plugin = Blip2FSDPPrecision(plugin.precision, plugin.scaler, lambda: self.model,
                                                       lambda: self.root_device.type)
        super().setup(trainer)

    def _saves_sharded(self) -> bool:
        return self._state_dict_type == "sharded"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap with FSDP on the strategy's device (CPU included), scalars left out; then Lightning's
        remaining setup (metrics to the device, activation checkpointing)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        cast_frozen = getattr(self.lightning_module, "cast_frozen", None)
        if cast_frozen is not None:  # Lightning's FSDPPrecision.convert_module undid it ("32-true": all fp32)
            cast_frozen()
        scalars = scalar_parameters(model)
        kwargs = dict(self.kwargs)
        if hasattr(kwargs.get("auto_wrap_policy"), "bind"):  # Blip2WrapPolicy: its units for this model
            kwargs["auto_wrap_policy"].bind(model)
        if scalars:
            kwargs["ignored_states"] = [*kwargs.get("ignored_states", ()), *scalars]
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **kwargs,
        )
        average_gradients_over([p for p in scalars if p.requires_grad], group=None)
        for unit in model.modules():
            if isinstance(unit, FullyShardedDataParallel) and unit is not model:
                for method in UNIT_FORWARD_METHODS:
                    if hasattr(unit.module, method):
                        route_through_forward(unit, method)
        policy = self.kwargs.pop("auto_wrap_policy", None)  # wrapped already: Lightning would warn and skip it
        try:
            return super()._setup_model(model)
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy

    def setup_optimizers(self, trainer: Any) -> None:
        """Lightning's, with the trainable units gathered: FSDP1 (``use_orig_params``) leaves each
        parameter a flat view of its local shard outside forward, so ``configure_optimizers`` would see
        1-d tensors and put every matrix among the no-weight-decay parameters (``param.ndim < 2``).
        Gathered, the parameters (the same objects the optimizer keeps) have their real shapes."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        units = [m for m in FullyShardedDataParallel.fsdp_modules(self.model) if any(p.requires_grad for p in m.parameters())]
        with contextlib.ExitStack() as stack:
            for unit in units:  # the root first: FSDP initialises the tree from it
                stack.enter_context(FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False))
            super().setup_optimizers(trainer)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Lightning's, except a full (one-file) state: gathered on every rank and keyed by parameter name.

        FSDP1's full optimizer state gathered to rank 0 only (``rank0_only=True``, which Lightning and
        torch's ``cpu_offload`` option use) comes back wrong here: on stage 1 (the temperature kept out
        of FSDP) its moments differ from the optimizer's by up to 0.23. Gathered on every rank it is
        right. It costs a full copy of the trainable parameters' optimizer state per rank for a moment.
        """
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state = get_optimizer_state_dict(self.model, optimizer, options=StateDictOptions(full_state_dict=True))
        if not self.is_global_zero:
            return {}
        return {"state": {name: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                          for name, entry in state["state"].items()},
                "param_groups": state["param_groups"]}

    @property
    def mixed_precision_config(self) -> Any:
        """Lightning's, except none for ``32-true`` and the ``*-mixed`` precisions (unless the
        ``mixed_precision`` argument sets one).

        FSDP1 casts every unit to ``param_dtype``. Lightning's fp32 "mixed precision" (``32-true``)
        would compute the task's bf16/fp16 frozen units in fp32; its ``bf16-mixed`` would compute the
        trainable Q-Former in pure bf16 (layer norms and softmax too) and reduce gradients in bf16,
        where DDP and FSDP2 autocast. Without a policy the frozen units keep ``frozen_dtype``, the
        trainable ones fp32, and :class:`Blip2FSDPPrecision` autocasts, as under DDP and FSDP2.
        """
        precision = getattr(self.precision_plugin, "precision", None)
        if self.mixed_precision is None and precision in ("32-true", "bf16-mixed", "16-mixed"):
            return None
        return super().mixed_precision_config

    def _model_state_keys(self) -> set[str]:
        with _get_sharded_state_dict_context(self.model):
            return set(self.model.state_dict())

    def _load_sharded_tensors(self, path: Path, stored: set[str]) -> None:
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel

        with _get_sharded_state_dict_context(self.model):
            state = self.model.state_dict()
            subset = {k: v for k, v in state.items() if k in stored}
            load({self._STATE_KEY: subset}, checkpoint_id=path)
            state.update(subset)  # the left-out (dropped frozen) keys keep their current values
            self.model.load_state_dict(state)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                reader = FileSystemReader(path=path)
                for idx, optimizer in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    optim_state = load_sharded_optimizer_state_dict(model_state_dict=subset, optimizer_key=key, storage_reader=reader)
                    flat = FullyShardedDataParallel.optim_state_dict_to_load(
                        optim_state_dict=optim_state[key], model=self.model, optim=optimizer
                    )
                    optimizer.load_state_dict(flat)


class ModelParallelStrategy(_ShardedCheckpoints, _LightningModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (same arguments) with the additions of the module docstring."""

    _STATE_KEY = "state_dict"

    def setup_environment(self) -> None:
        """Resolve ``data_parallel_size="auto"`` to the ranks tensor parallelism leaves, then Lightning's setup.

        Raises:
            ValueError: a world size that ``tensor_parallel_size`` does not divide.
        """
        if self._data_parallel_size == "auto" and self._tensor_parallel_size != "auto":
            world = self.num_nodes * self.num_processes
            if world % self._tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self._tensor_parallel_size} does not divide the {world} ranks")
            self._data_parallel_size = world // self._tensor_parallel_size
        super().setup_environment()

    def _saves_sharded(self) -> bool:
        return self._save_distributed_checkpoint

    def _model_state_keys(self) -> set[str]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return set(get_model_state_dict(self.model))

    def _load_sharded_tensors(self, path: Path, stored: set[str]) -> None:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = get_model_state_dict(self.model)
        subset = {k: v for k, v in state.items() if k in stored}
        load({self._STATE_KEY: subset}, checkpoint_id=path)
        state.update(subset)  # the left-out (dropped frozen) keys keep their current values
        self.model.load_state_dict(state)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True))
