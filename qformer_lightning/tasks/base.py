"""The shared LightningModule base: freezing, optimisation, schedules, checkpoints, loss guards.

Every stage and finetune subclasses :class:`Blip2Task`; the subclass owns its objective and
metrics, this class owns what all of them share:

- ``frozen``: module-name prefixes frozen (``requires_grad=False``, kept in eval mode).
- AdamW + per-step warmup/cosine schedule + layer-wise lr decay on an unfrozen ViT.
- Small checkpoints: frozen weights that can be reloaded from their source are not stored; the
  run's resolved config (set by the CLI) and the task's counters are.
- Exact resume: the global random generators are reseeded at every training batch from
  ``(seed, global step, epoch, batch index, rank)``, so a run resumed from a mid-epoch checkpoint
  draws the same random numbers (ITM negatives, dropout) as the uninterrupted run.
- A non-finite loss either skips the step (all ranks agree) or stops with a message naming the
  step and the batch's sample keys.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from qformer_lightning.distributed import all_ranks_true
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.seeding import mix_seed
from qformer_lightning.tasks.optim import param_groups, warmup_cosine

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["skip", "stop"]
FrozenDtype = Literal["bf16", "fp16"]


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
"""Name segments that FSDP1 and activation checkpointing insert into ``named_parameters`` (not into state dicts)."""


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/inf and the policy is ``stop``."""


@dataclass
class Optimization:
    """Optimiser and schedule settings (the ``optim`` block of a task's YAML).

    Args:
        lr: peak learning rate.
        min_lr: final learning rate of the cosine decay.
        warmup_lr: learning rate at step 0 of the warmup.
        weight_decay: AdamW weight decay (not on biases, norms, query tokens, temperature).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        total_steps: schedule length; ``None`` takes ``trainer.max_steps`` (must then be set).
        layer_decay: layer-wise lr decay of an unfrozen ViT (1.0 = off; SPEC: 0.95 in finetunes).
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 2000
    total_steps: int | None = None
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        """Refuse impossible settings; each message starts with ``field:`` so the CLI can name the option."""
        if self.lr <= 0:
            raise ValueError(f"lr: need lr > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay: need 0 < layer_decay <= 1, got {self.layer_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: need warmup_steps >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps: need total_steps >= 1 (or null: trainer.max_steps), got {self.total_steps}")


class Blip2Task(pl.LightningModule):
    """Base of all qformer_lightning tasks.

    Args:
        frozen: prefixes of module names to freeze (e.g. ``["model.vision.vit"]``).
        optim: optimiser and schedule settings.
        nonfinite: what to do on a NaN/inf loss: ``skip`` the step or ``stop`` the run.
        store_frozen: keep frozen weights in checkpoints. ``None`` (default): store them only when
            they have no external source to be reloaded from (random init).
        frozen_dtype: cast the frozen modules to ``bf16``/``fp16`` (memory, speed); ``None`` keeps fp32.
            SPEC: FlanT5 must be bf16 (fp16 overflows T5).
    """

    def __init__(
        self,
        frozen: list[str] | None = None,
        optim: Optimization | None = None,
        nonfinite: NonFinitePolicy = "stop",
        store_frozen: bool | None = None,
        frozen_dtype: FrozenDtype | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in ("skip", "stop"):
            raise ValueError(f"nonfinite must be 'skip' or 'stop', got {nonfinite!r}")
        if frozen_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"frozen_dtype must be 'bf16', 'fp16' or null, got {frozen_dtype!r}")
        self.frozen = list(frozen) if frozen is not None else []
        self.optim = optim if optim is not None else Optimization()
        self.nonfinite = nonfinite
        self.store_frozen = store_frozen
        self.frozen_dtype = frozen_dtype
        self.num_skipped_steps = 0
        self.run_config: str | None = None  # the resolved YAML config, set by the CLI, stored in checkpoints
        self._replaced_total = 0
        self._replaced: Counter[str] = Counter()  # per reason, summed over training steps
        self._last_step_time: float | None = None
        self._model_configured = False

    # ------------------------------------------------------------------ freezing
    def apply_freezing(self) -> None:
        """Freeze the modules named in ``frozen``; unfreeze a vision encoder not listed."""
        names = dict(self.named_modules())
        for prefix in self.frozen:
            if prefix not in names:
                raise ValueError(f"frozen entry {prefix!r} names no module; modules include {self._top_module_names()}")
            names[prefix].requires_grad_(False)
        for name, module in names.items():
            if isinstance(module, TimmVisionEncoder):
                module.frozen = f"{name}.vit" in self.frozen or name in self.frozen
                if not module.frozen:
                    module.vit.requires_grad_(True)
        self.train(self.training)

    def _top_module_names(self) -> list[str]:
        return sorted({n for n, _ in self.named_modules() if n and n.count(".") <= 2})

    def frozen_modules(self) -> list[nn.Module]:
        """The modules listed in ``frozen``."""
        names = dict(self.named_modules())
        return [names[p] for p in self.frozen if p in names]

    def train(self, mode: bool = True) -> "Blip2Task":
        """Frozen modules stay in eval mode (no dropout, fixed norm statistics)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------------ weights, dtype, sharding
    def load_initial_weights(self) -> None:
        """Load pretrained/initial weights (subclasses); runs once, before any checkpoint restore."""

    def configure_model(self) -> None:
        """Initial weights (the image encoder's ``checkpoint_path``, then :meth:`load_initial_weights`),
        frozen-part dtype and FSDP2 sharding, once per process."""
        if self._model_configured:
            return
        self._model_configured = True
        for module in self.modules():  # local image-encoder files first: a `pretrained` checkpoint may override them
            if isinstance(module, TimmVisionEncoder):
                module.load_weights()
        self.load_initial_weights()
        self.apply_freezing()
        self.cast_frozen()
        mesh = getattr(self, "device_mesh", None)
        if mesh is not None:
            from qformer_lightning.scale.fsdp import apply_fully_shard

            apply_fully_shard(self, mesh)

    def cast_frozen(self) -> None:
        """Cast the frozen modules to ``frozen_dtype`` (no-op without one). FSDP1 calls it again after
        Lightning's precision plugin has converted the whole module (``32-true`` makes it fp32)."""
        if self.frozen_dtype is not None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.frozen_dtype]
            for module in self.frozen_modules():
                module.to(dtype)

    # ------------------------------------------------------------------ optimisation
    def vision_encoder(self) -> TimmVisionEncoder | None:
        """The task's image encoder, if any (for layer-wise lr decay)."""
        for module in self.modules():
            if isinstance(module, TimmVisionEncoder):
                return module
        return None

    def schedule_length(self) -> int:
        """Total optimizer steps of the schedule, from the config (never estimated from the loader)."""
        if self.optim.total_steps is not None:
            return self.optim.total_steps
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps < 1:
            raise ValueError("set model.total_steps or trainer.max_steps: the lr schedule needs its length")
        return max_steps

    def configure_optimizers(self) -> dict[str, Any]:
        vit_prefix, blocks = None, 0
        encoder = self.vision_encoder()
        if encoder is not None and not encoder.frozen:
            for name, module in self.named_modules():
                if module is encoder.vit:
                    vit_prefix, blocks = name + ".", len(encoder.vit.blocks)
        opt = self.optim
        groups = param_groups(self.named_parameters(), opt.lr, opt.weight_decay, vit_prefix, blocks, opt.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        total = self.schedule_length()

        def factor(step: int) -> float:
            return warmup_cosine(step, opt.warmup_steps, total, opt.lr, opt.min_lr, opt.warmup_lr) / opt.lr

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ loss guard and logging
    def guard_loss(self, loss: Tensor, batch: dict[str, Any]) -> Tensor | None:
        """Return the loss, or None to skip this step when it is not finite (all ranks agree).

        Raises:
            NonFiniteLossError: policy ``stop``; the message names the step and the sample keys.
        """
        if all_ranks_true(torch.isfinite(loss.detach())):
            return loss
        keys = batch.get("key") or batch.get("image_id")
        if isinstance(keys, Tensor):
            keys = keys.tolist()
        message = f"non-finite loss ({loss.item()}) at global step {self.global_step}, batch {self._batch_idx}; sample keys: {keys}"
        if self.nonfinite == "stop":
            raise NonFiniteLossError(message + " (nonfinite='stop': weights were not updated)")
        self.num_skipped_steps += 1
        log.warning("%s; step skipped (nonfinite='skip', %d skipped so far)", message, self.num_skipped_steps)
        self.log("train/skipped_steps", float(self.num_skipped_steps), rank_zero_only=True)
        return None

    def step_seed(self, batch_idx: int) -> int:
        """The seed of this training batch: a 63-bit mix of ``(seed, global step, epoch, batch, rank)``.

        ``seed`` is the run's ``seed_everything`` value (``PL_GLOBAL_SEED``, 0 if unset).
        """
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return mix_seed(base, self.global_step, self.current_epoch, batch_idx, self.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed the global generators from the batch's position (exact resume, see module docstring)."""
        self._batch_idx = batch_idx
        torch.manual_seed(self.step_seed(batch_idx))

    def log_throughput(self, batch_size: int) -> None:
        """Log samples/s (this rank x world size) measured between consecutive steps, and the lr."""
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = batch_size * self.trainer.world_size / max(now - self._last_step_time, 1e-9)
            self.log("train/samples_per_s", rate, prog_bar=True, batch_size=batch_size)
        self._last_step_time = now
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", optimizer.param_groups[-1]["lr"] / optimizer.param_groups[-1].get("lr_scale", 1.0), batch_size=batch_size)

    def log_data_skips(self, batch: dict[str, Any]) -> None:
        """Log the bad samples the data layer has replaced so far in training (total and per reason).

        Every scalar is cumulative and every reason seen so far is logged at every step: Lightning
        re-emits a key's last value at log steps where it was not logged, so a per-batch count
        would be repeated on batches without that reason. The counts are this rank's, and they
        are the ones stored in (and restored from) checkpoints.
        """
        self._replaced_total += int(batch.get("num_replaced", 0))
        self._replaced.update({reason: int(n) for reason, n in (batch.get("replaced") or {}).items()})
        self.log("data/replaced_total", float(self._replaced_total), reduce_fx="max", batch_size=1)
        for reason, count in sorted(self._replaced.items()):
            self.log(f"data/replaced_{reason}", float(count), reduce_fx="max", batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def frozen_weights_have_source(self) -> bool:
        """Whether frozen weights are reloaded by the config (pretrained weights or a checkpoint path).

        Subclasses that load weights from a ``pretrained`` source override this.
        """
        encoder = self.vision_encoder()
        return encoder is not None and encoder.has_weight_source

    def _dropped_keys(self, state_names: Iterable[str] | None = None) -> list[str]:
        """The frozen state-dict keys left out of checkpoints, among ``state_names`` (default: this
        module's ``state_dict()``; under FSDP pass the keys of the strategy's state dict: FSDP1
        gathers parameters for a ``state_dict()`` of an inner module)."""
        store = self.store_frozen if self.store_frozen is not None else not self.frozen_weights_have_source()
        if store:
            return []
        trainable = {unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}
        names = self.state_dict().keys() if state_names is None else state_names
        dropped = []
        for prefix in self.frozen:
            dropped += [k for k in names if k.startswith(prefix + ".") and k not in trainable]
        return dropped

    def task_class(self) -> type:
        """The task's class as written, not FSDP2's: ``fully_shard`` swaps the class of the task (the
        root unit) for a generated ``FSDP<Task>`` subclass."""
        from torch.distributed.fsdp import FSDPModule

        return next(c for c in type(self).__mro__ if not issubclass(c, FSDPModule))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen weights that have a source; store the task name, the config and the counters.

        The state dict may be sharded (FSDP1 sharded tensors, FSDP2 DTensors): only its keys are read.
        """
        dropped = set(self._dropped_keys(checkpoint["state_dict"].keys()))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in dropped}
        task = self.task_class()
        checkpoint["qformer_lightning"] = {
            "task": task.__qualname__,
            "task_class": f"{task.__module__}.{task.__qualname__}",
            "dropped_frozen_keys": sorted(dropped),
            "config": self.run_config,
            "num_skipped_steps": self.num_skipped_steps,
            "replaced_total": self._replaced_total,
            "replaced": dict(self._replaced),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse another task's checkpoint; check the stored keys; restore the counters.

        Under ``qformer_lightning.scale.strategies`` (FSDP, FSDP2) the strategy has loaded and
        checked the tensors itself before this hook (the checkpoint then carries its report and no
        ``state_dict``).
        """
        from qformer_lightning.scale.strategies import LOAD_REPORT

        meta = checkpoint.get("qformer_lightning")
        if meta is None:
            raise ValueError("this checkpoint was not written by qformer_lightning (no 'qformer_lightning' entry)")
        task = self.task_class()
        if meta["task"] != task.__qualname__:
            raise ValueError(
                f"checkpoint was written by task {meta.get('task_class', meta['task'])}, but this run's task is "
                f"{task.__module__}.{task.__qualname__}: a checkpoint resumes only its own task. To "
                "start from another stage's weights use the task's `pretrained` option (it reports what is loaded and left)"
            )
        if LOAD_REPORT not in checkpoint:
            self._check_state_dict(checkpoint["state_dict"], set(meta["dropped_frozen_keys"]))
        self.strict_loading = False  # the dropped frozen weights come from their source
        self.num_skipped_steps = int(meta.get("num_skipped_steps", 0))
        self._replaced_total = int(meta.get("replaced_total", 0))
        self._replaced = Counter({reason: int(n) for reason, n in meta.get("replaced", {}).items()})

    def _check_state_dict(self, state: dict[str, Any], dropped: set[str]) -> None:
        """Raise unless ``state`` holds every key of this module (but ``dropped``), no other, same shapes."""
        own = self.state_dict()
        missing = [k for k in own if k not in state and k not in dropped]
        unexpected = [k for k in state if k not in own]
        shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
        if missing or unexpected or shape:
            raise ValueError(
                f"checkpoint does not fit this model: missing {missing[:20]}, unexpected {unexpected[:20]}, shape mismatch {shape[:20]}"
            )


def unwrapped_name(name: str) -> str:
    """A parameter name without FSDP1's and activation checkpointing's wrapper segments (the
    state-dict name)."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name
