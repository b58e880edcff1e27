"""FSDP wrapping that never puts frozen and trainable parameters in one unit.

BLIP-2 holds a frozen ViT and a frozen LLM beside a trainable Q-Former. FSDP1 flattens the
parameters of a unit into one tensor with a single ``requires_grad``; the policy below wraps

- every transformer block (ViT blocks, LLM decoder/encoder blocks, Q-Former layers) as a unit,
- the frozen containers (the ViT, the LLM) as units, so their leftover parameters (patch and
  position embeddings, token embeddings, final norms) stay among frozen ones,

and leaves only trainable parameters (``ln_vision``, queries, embeddings, heads, projections)
in the root unit.
"""

from __future__ import annotations

import importlib

from torch import nn

DEFAULT_BLOCKS = (
    "timm.models.eva.EvaBlock",
    "timm.models.vision_transformer.Block",
    "qformer_lightning.nn.qformer.QFormerLayer",
    "transformers.models.opt.modeling_opt.OPTDecoderLayer",
    "transformers.models.t5.modeling_t5.T5Block",
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
)
DEFAULT_LLM_BLOCKS = DEFAULT_BLOCKS[3:]


def import_classes(paths: list[str] | tuple[str, ...]) -> tuple[type[nn.Module], ...]:
    """Import ``module.Class`` paths.

    Raises:
        ValueError: a path that does not import, with the path named.
    """
    classes = []
    for path in paths:
        module_name, _, class_name = path.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import block class {path!r}: {error}") from error
    return tuple(classes)


def is_frozen_container(module: nn.Module) -> bool:
    """A module all of whose parameters are frozen and that holds blocks (the ViT, the LLM)."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params) and len(list(module.children())) > 1


class Blip2WrapPolicy:
    """FSDP1 ``auto_wrap_policy``: blocks and frozen containers become units.

    Args:
        block_classes: import paths of the block classes to wrap.
        frozen_containers: also wrap fully frozen modules that contain blocks (needed for FSDP1
            without ``use_orig_params``).
    """

    def __init__(self, block_classes: list[str] | None = None, frozen_containers: bool = True) -> None:
        self.block_classes = import_classes(block_classes or list(DEFAULT_BLOCKS))
        self.frozen_containers = frozen_containers

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True
        if isinstance(module, self.block_classes):
            return True
        return self.frozen_containers and is_frozen_container(module) and _holds_block(module, self.block_classes)


class BlockPolicy:
    """Activation-checkpointing policy: checkpoint the given block classes (default: LLM blocks)."""

    def __init__(self, block_classes: list[str] | None = None) -> None:
        self.block_classes = import_classes(block_classes or list(DEFAULT_LLM_BLOCKS))

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or isinstance(module, self.block_classes)


def _holds_block(module: nn.Module, classes: tuple[type[nn.Module], ...]) -> bool:
    return any(isinstance(m, classes) for m in module.modules())


def wrap_units(model: nn.Module, policy: Blip2WrapPolicy) -> list[nn.Module]:
    """The modules the policy wraps, children first (the order FSDP2's ``fully_shard`` needs)."""
    units = [m for m in model.modules() if m is not model and policy(m, False, 0)]
    depth = {id(m): 0 for m in units}
    for unit in units:
        for child in unit.modules():
            if child is not unit and id(child) in depth:
                depth[id(child)] = max(depth[id(child)], depth[id(unit)] + 1)
    return sorted(units, key=lambda m: -depth[id(m)])


def apply_fully_shard(model: nn.Module, device_mesh, policy: Blip2WrapPolicy | None = None, mp_dtype=None) -> None:
    """FSDP2: ``fully_shard`` every unit of the policy (children first), then the root.

    Args:
        model: the task's module.
        device_mesh: Lightning's mesh (``self.device_mesh`` under ModelParallelStrategy); the
            data-parallel dimension is used.
        policy: which modules are units (default :class:`Blip2WrapPolicy`).
        mp_dtype: parameter dtype for mixed precision (e.g. ``torch.bfloat16``), or None.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    kwargs = {"mesh": mesh}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=mp_dtype)
    for unit in wrap_units(model, policy or Blip2WrapPolicy()):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
