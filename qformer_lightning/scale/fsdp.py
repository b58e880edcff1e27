"""FSDP wrapping that never puts frozen and trainable parameters in one unit.

BLIP-2 holds a frozen ViT and a frozen LLM beside a trainable Q-Former. FSDP1 flattens the
parameters of a unit into one tensor with a single ``requires_grad``; the policy below wraps

- every transformer block (ViT blocks, LLM decoder/encoder blocks, Q-Former layers) as a unit,
- the outermost frozen containers (the ViT, the LLM adapter ``LanguageModel``) as units, so their
  leftover parameters (patch and position embeddings, token embeddings, final norms, the LM head)
  stay among frozen ones. Only the outermost: a container nested in another (transformers'
  ``OPTDecoder`` inside ``OPTForCausalLM``) would split tied weights (OPT's and SmolLM2's LM head
  is the input embedding, T5's encoder and decoder share theirs) between two units, which FSDP2
  refuses and FSDP1 would run sharded,

and leaves only trainable parameters (``ln_vision``, queries, embeddings, heads, projections)
in the root unit.
"""

from __future__ import annotations

import importlib

import torch
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
UNIT_FORWARD_METHODS = ("forward_features", "embed", "generate_ids")
"""Methods that run a unit instead of its ``forward``: FSDP gathers the unit's parameters around
them too. The vision encoder calls timm's ``vit.forward_features``; the LLM adapter embeds the
prompt tokens (``LanguageModel.embed``) and generates (``LanguageModel.generate_ids``) outside its
``forward``. None of them may call another (the inner one would reshard the unit under the outer)."""
ROOT_FORWARD_METHODS = ("training_step", "validation_step", "test_step", "predict_step", "itc_features")
"""Lightning calls these on the task, never its ``forward``: the root unit (the task) gathers its
parameters around them (``itc_features``: stage 1's validation examples)."""


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
    """A module with a ``forward`` of its own, all of whose parameters are frozen and that has children.

    Containers without a ``forward`` (``nn.ModuleList``, ``nn.ModuleDict``) are never units: FSDP
    gathers a unit's parameters in its forward, and theirs is never called (FSDP2's
    ``fully_shard`` refuses them; FSDP1 would leave their parameters sharded in the forward).
    """
    if type(module).forward is nn.Module.forward:
        return False
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params) and any(True for _ in module.children())


def outermost_frozen_containers(root: nn.Module, block_classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The frozen containers holding a block that no other such container holds (top-down)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if is_frozen_container(child) and _holds_block(child, block_classes):
                found.append(child)
            else:
                visit(child)

    visit(root)
    return found


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
        self._containers: set[int] | None = None

    def bind(self, root: nn.Module) -> None:
        """Choose the frozen-container units of the model ``root`` (:func:`outermost_frozen_containers`)."""
        self._containers = {id(m) for m in outermost_frozen_containers(root, self.block_classes)}

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            if self._containers is None:  # FSDP1 asks about the root first
                self.bind(module)
            return True
        if isinstance(module, self.block_classes):
            return True
        return self.frozen_containers and self._containers is not None and id(module) in self._containers


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
    policy.bind(model)
    units = [m for m in model.modules() if m is not model and policy(m, False, 0)]
    depth = {id(m): 0 for m in units}
    for unit in units:
        for child in unit.modules():
            if child is not unit and id(child) in depth:
                depth[id(child)] = max(depth[id(child)], depth[id(unit)] + 1)
    return sorted(units, key=lambda m: -depth[id(m)])


def apply_fully_shard(model: nn.Module, device_mesh, policy: Blip2WrapPolicy | None = None, mp_dtype=None) -> None:
    """FSDP2: ``fully_shard`` every unit of the policy (children first), then the root.

    Scalar parameters (stage 1's ITC temperature ``temp``) cannot be sharded (``fully_shard``
    refuses 0-dim parameters): they stay whole on every rank, outside FSDP, and their gradients
    are averaged over the data-parallel ranks by :func:`average_gradients_over` (as DDP would).

    Args:
        model: the task's module.
        device_mesh: Lightning's mesh (``self.device_mesh`` under ModelParallelStrategy); the
            data-parallel dimension is used.
        policy: which modules are units (default :class:`Blip2WrapPolicy`).
        mp_dtype: parameter dtype for mixed precision (e.g. ``torch.bfloat16``), or None.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    scalars = set(scalar_parameters(model))
    kwargs = {"mesh": mesh, "ignored_params": scalars}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=mp_dtype)
    for unit in wrap_units(model, policy or Blip2WrapPolicy()):
        fully_shard(unit, **kwargs)
        for method in UNIT_FORWARD_METHODS:
            if hasattr(unit, method):
                register_fsdp_forward_method(unit, method)
    fully_shard(model, **kwargs)
    for method in ROOT_FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    average_gradients_over([p for p in scalars if p.requires_grad], mesh.get_group())


def scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 0-dim parameters of ``model`` (FSDP1 and FSDP2 cannot shard them)."""
    return [p for p in model.parameters() if p.dim() == 0]


def route_through_forward(wrapper: nn.Module, method: str) -> None:
    """FSDP1: make ``<method>(...)`` of the wrapped module run inside the wrapper's ``forward``, where
    FSDP gathers the unit's parameters (FSDP1 has no ``register_fsdp_forward_method``; called
    directly, the method would see flat shards).

    The method is replaced on the wrapped module itself, so that the module's own calls
    (``self.embed(ids)`` inside ``LanguageModel``) are routed too, not only calls through the wrapper.

    Args:
        wrapper: a ``FullyShardedDataParallel`` unit; its ``module`` has ``method``.
        method: e.g. ``"forward_features"``.
    """
    inner = wrapper.module
    target = getattr(inner, method)

    def call(*args, **kwargs):
        inner.forward = target  # shadows the class's forward for this one call
        try:
            return wrapper(*args, **kwargs)
        finally:
            del inner.forward

    setattr(inner, method, call)


def average_gradients_over(params: list[nn.Parameter], group: "torch.distributed.ProcessGroup | None") -> None:
    """Average each parameter's gradient over the ranks of ``group`` as soon as it is accumulated.

    For parameters kept outside FSDP. Under gradient accumulation the hook runs after every
    micro-batch; the part already averaged is equal on all ranks, so averaging it again leaves
    it unchanged and the result is the average of the summed micro-batch gradients.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)

    def average(param: nn.Parameter) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
        param.grad.div_(world)

    for param in params:
        param.register_post_accumulate_grad_hook(average)
