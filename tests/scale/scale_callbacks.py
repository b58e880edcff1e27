"""Test-only callbacks and data, loaded by the training subprocesses (``PYTHONPATH=tests/scale``).

Added to a CLI run with ``--trainer.callbacks+='{"class_path": "scale_callbacks.PauseAt", ...}'``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset


class PauseAt(Callback):
    """After optimizer step ``step``: write ``marker`` and block (the test then kills the process)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            while True:
                time.sleep(0.05)


class SignalAt(Callback):
    """After optimizer step ``step``: send ``signal_name`` to this process's whole group (as SLURM
    does), or, with ``rank``, only to that rank's process."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", rank: int | None = None) -> None:
        self.step, self.signal_name, self.rank = step, signal_name, rank

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        if self.rank is None:
            os.killpg(os.getpgid(0), getattr(signal, self.signal_name))
        elif trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class StepRecord(Callback):
    """Per optimizer step (rank 0): the averaged gradients of step ``grad_step`` and the trainable
    parameters at the end (``{path}/grads.pt``, ``{path}/params.pt``) and the callback metrics
    after each validation (``{path}/val.jsonl``).

    With ``state=True`` also the optimizer state at the end (``optim.pt``) and, when training
    starts (after a checkpoint restore), the parameters and optimizer state it starts from
    (``start_params.pt``, ``start_optim.pt``). ``param_steps``: also the parameters (with ``state``
    the optimizer state too) after those optimizer steps (``params_step{k}.pt``, ``optim_step{k}.pt``).

    Sharded runs are recorded whole (every rank takes part in the gathering): FSDP2's DTensors
    through ``full_tensor()``, FSDP1's flat parameters through ``summon_full_params``.
    """

    def __init__(self, path: str, grad_step: int = 0, state: bool = False, param_steps: list[int] | None = None) -> None:
        self.path, self.grad_step, self.state = Path(path), grad_step, state
        self.param_steps = list(param_steps or [])

    def _save(self, trainer: pl.Trainer, value: Any, name: str) -> None:
        if trainer.is_global_zero:
            torch.save(value, self.path / name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state:
            self._save(trainer, full_trainable(trainer, pl_module), "start_params.pt")
            self._save(trainer, full_optimizer_state(trainer), "start_optim.pt")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.grad_step:
            self._save(trainer, full_trainable(trainer, pl_module, grads=True), "grads.pt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.param_steps:
            self._save(trainer, full_trainable(trainer, pl_module), f"params_step{trainer.global_step}.pt")
            if self.state:
                self._save(trainer, full_optimizer_state(trainer), f"optim_step{trainer.global_step}.pt")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            with open(self.path / "val.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, full_trainable(trainer, pl_module), "params.pt")
        if self.state:
            self._save(trainer, full_optimizer_state(trainer), "optim.pt")


def full_trainable(trainer: pl.Trainer, pl_module: pl.LightningModule, grads: bool = False) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable parameters (or of their gradients, where there is one), by
    their unwrapped names. Collective under FSDP/FSDP2: every rank must call it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    from qformer_lightning.tasks.base import unwrapped_name

    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    def collect() -> dict[str, torch.Tensor]:
        out = {}
        for name, p in pl_module.named_parameters():
            value = p.grad if grads else p
            if p.requires_grad and value is not None:
                out[unwrapped_name(name)] = whole(value)
        return out

    root = trainer.strategy.model
    if isinstance(root, FSDP):
        with FSDP.summon_full_params(root, writeback=False, with_grads=grads):
            return collect()
    return collect()


def full_optimizer_state(trainer: pl.Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's state per parameter name, whole (collective under FSDP/FSDP2); ``{}`` before the
    first step (torch's ``get_optimizer_state_dict`` would initialise an empty state with a step)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # FSDP2's root unit keeps its gathered parameters after a forward without backward (validation);
    # the optimizer holds the sharded ones (a model state_dict() would reshard too, as Lightning's saves do)
    for module in trainer.strategy.model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    optimizer = trainer.optimizers[0]
    if not optimizer.state:
        return {}
    state = get_optimizer_state_dict(trainer.strategy.model, optimizer, options=StateDictOptions(full_state_dict=True))
    return {name: {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in entry.items()}
            for name, entry in state["state"].items()}


class ShardingRecord(Callback):
    """When training starts (rank 0), what FSDP made of the model, as ``{path}/units.json``.

    ``units``: every FSDP unit (FSDP1 ``FullyShardedDataParallel`` or FSDP2 ``FSDPModule``) by its
    unwrapped module name (``""`` the root), with the parameters it manages (those no inner unit
    manages): names, ``requires_grad``, dtypes and whether each is sharded (an FSDP2 DTensor; FSDP1
    flat-parameter views). ``left_out``: parameters kept whole outside FSDP. ``checkpointed``:
    modules under activation checkpointing.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        from qformer_lightning.tasks.base import unwrapped_name

        root = trainer.strategy.model
        named = list(root.named_modules())
        left_out = {id(p) for m in named if isinstance(m[1], FullyShardedDataParallel) for p in m[1]._ignored_params}
        left_out |= {id(p) for p in root.parameters() if isinstance(root, FSDPModule) and not isinstance(p, DTensor)}
        owned: set[int] = set(left_out)
        units = []
        for name, unit in reversed(named):  # pre-order reversed: inner units first
            if not isinstance(unit, (FSDPModule, FullyShardedDataParallel)):
                continue
            params = [(n, p) for n, p in unit.named_parameters() if id(p) not in owned]
            owned |= {id(p) for _, p in params}
            units.append({
                "name": unwrapped_name(name + ".").rstrip(".") if name else "",
                "class": type(unit).__name__,
                "params": [unwrapped_name(f"{name}.{n}" if name else n) for n, _ in params],
                "requires_grad": sorted({p.requires_grad for _, p in params}),
                "dtypes": sorted({str(p.dtype) for _, p in params}),
                "sharded": sorted({isinstance(p, DTensor) or isinstance(unit, FullyShardedDataParallel) for _, p in params}),
            })
        record = {
            "units": units,
            "left_out": [unwrapped_name(n) for n, p in pl_module.named_parameters() if id(p) in left_out],
            "checkpointed": [unwrapped_name(n + ".").rstrip(".") for n, m in pl_module.named_modules() if isinstance(m, CheckpointWrapper)],
        }
        (self.path / "units.json").write_text(json.dumps(record, indent=1))


class SaveFullCopy(Callback):
    """After each validation (all ranks): also save the checkpoint as one full file at ``path``, from a
    sharding strategy of ``qformer_lightning.scale.strategies`` set to write sharded checkpoints."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        attribute, full = ("_state_dict_type", "full") if hasattr(strategy, "_state_dict_type") else ("_save_distributed_checkpoint", False)
        sharded = getattr(strategy, attribute)
        setattr(strategy, attribute, full)
        try:
            trainer.save_checkpoint(self.path)
        finally:
            setattr(strategy, attribute, sharded)


class HardestNegatives(Callback):
    """Replace stage 1's sampled ITM negatives by the hardest one (argmax of the same weights).

    The draw is then a function of the global batch alone, the same for one process and for W
    ranks, so that a DDP run can be compared with a single-process run number for number.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from qformer_lightning.losses import itm
        from qformer_lightning.tasks import stage1

        def hardest(sim_i2t, sim_t2i, image_ids_local=None, image_ids_global=None, generator=None, rank=None,
                    text_ids_local=None, text_ids_global=None):
            batch, global_batch = sim_i2t.shape
            rank = itm.rank_and_world()[0] if rank is None else rank
            own, positives = itm._own_and_positive(
                batch, global_batch, image_ids_local, image_ids_global, rank, sim_i2t.device, text_ids_local, text_ids_global
            )
            with torch.no_grad():
                weights_t2i = itm.negative_weights(sim_t2i, own, positives)
                weights_i2t = itm.negative_weights(sim_i2t, own, positives)
            return weights_t2i.argmax(1), weights_i2t.argmax(1)

        stage1.sample_hard_negatives = hardest


class GlobalBatchSet(Dataset):
    """Fixed image-text samples: sample i is a seeded random image, caption ``captions[i % len]``
    and image id ``i // 2`` (two captions per image: ITC/ITM positives across samples)."""

    def __init__(self, num: int, image_size: int, captions: list[str], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num // 2, 3, image_size, image_size, generator=generator)
        self.captions = captions
        self.num = num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i // 2], "text": self.captions[i % len(self.captions)],
                "image_id": torch.tensor(i // 2), "key": f"s{i:05d}"}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([s["image"] for s in samples]), "text": [s["text"] for s in samples],
            "image_id": torch.stack([s["image_id"] for s in samples]), "key": [s["key"] for s in samples]}


class GlobalBatchData(pl.LightningDataModule):
    """Training batches defined globally: global batch k is samples ``[k*G, (k+1)*G)`` and rank r
    takes the slice ``[k*G + r*B, k*G + (r+1)*B)`` (B = G / world size), so that one process and
    W processes see the same global batches. Validation: ``num_val`` samples split the same way.

    Run with ``trainer.use_distributed_sampler=false`` (the split is done here).
    """

    def __init__(self, global_batch: int = 8, num_train: int = 32, num_val: int = 16, image_size: int = 32,
                 captions: list[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.global_batch, self.num_train, self.num_val = global_batch, num_train, num_val
        self.image_size, self.seed = image_size, seed
        self.captions = captions or ["a red circle", "two small blue squares on the left side", "a green triangle"]

    def _loader(self, num: int, seed: int) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.global_batch % world:
            raise ValueError(f"global batch {self.global_batch} does not split over {world} ranks")
        local = self.global_batch // world
        data = GlobalBatchSet(num, self.image_size, self.captions, seed)
        indices = [k * self.global_batch + rank * local + j for k in range(num // self.global_batch) for j in range(local)]
        return DataLoader(torch.utils.data.Subset(data, indices), batch_size=local, shuffle=False, collate_fn=_collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.num_train, self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.num_val, self.seed + 1)

