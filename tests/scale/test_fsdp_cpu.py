"""FSDP1 and FSDP2 on 2 CPU processes (gloo) train stage 1 exactly as one process does, and resume.

The runs are ``python -m qformer_lightning fit`` on the demo stage 1, shrunk as in
``test_ddp_stage1`` (32 px, global batch 8 split over the ranks by ``scale_callbacks.GlobalBatchData``,
hardest ITM negatives), composed with the production strategy fragments unchanged:
``configs/strategy/fsdp2.yaml`` (``fully_shard`` from ``Blip2Task.configure_model``) and
``configs/strategy/fsdp.yaml`` (FSDP1 with ``Blip2WrapPolicy``, sharded checkpoints; activation
checkpointing is pointed at the Q-Former layers, since stage 1 has no LLM block). Every run keeps
the frozen ViT in bf16 (``frozen_dtype: bf16``) and loads it from a file, so checkpoints leave it out.

- one process, 3 steps: the reference (gradients of step 0, parameters after steps 2 and 3,
  validation at step 2);
- per strategy, 2 processes, 2 steps, validation at step 2 and a checkpoint after it; then a
  second ``fit --ckpt_path`` on that checkpoint to step 3.

Tolerances: ``parity_checks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from parity_checks import (
    STRATEGIES as FRAGMENTS,
    assert_restored_exactly,
    assert_same_gradients,
    assert_same_retrieval_validation,
    assert_same_start,
    assert_same_training,
    demo_lrs,
    logged_text,
)
from qformer_lightning.scale.checkpointing import parked_previous, stale_temporaries
from scale_runs import callback_arg, run

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]  # 5 tokens each with [CLS] / [SEP]
WIDTH = 64  # the demo Q-Former's hidden size: qkv_proj.bias is (3 * WIDTH,), keys in the middle third
STRATEGIES = {
    "fsdp2": FRAGMENTS["fsdp2"],
    "fsdp1": [*FRAGMENTS["fsdp1"], "--trainer.strategy.init_args.activation_checkpointing_policy.init_args.block_classes="
              "[qformer_lightning.nn.qformer.QFormerLayer]"],
}
LAYERS = ["model.qformer.layers.0", "model.qformer.layers.1"]
UNITS = {"": True, "model.vision.vit": False, "model.vision.vit.blocks.0": False, "model.vision.vit.blocks.1": False,
         "model.qformer.layers.0": True, "model.qformer.layers.1": True}  # unit -> trainable


def _args(out: Path, vit: Path, devices: int, steps: int, extra: list[str], callbacks: list[str]) -> list[str]:
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "scale_callbacks.GlobalBatchData", "init_args": {
        "global_batch": 8, "num_train": 16, "num_val": 16, "image_size": 32, "captions": CAPTIONS}}}))
    vision = "--model.init_args.model.init_args.vision.init_args"
    return [
        "fit", "--config", "configs/demo/stage1.yaml", "--config", str(data), *extra,
        f"{vision}.image_size=32", f"{vision}.checkpoint_path={vit}", "--model.init_args.frozen_dtype=bf16",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}/tb", "--trainer.enable_progress_bar=false", "--trainer.use_distributed_sampler=false",
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        # one checkpoint, after the validation of step 2 (FSDP2's root unit is still gathered then)
        f"--trainer.callbacks.dirpath={out}/ckpt", "--trainer.callbacks.every_n_train_steps=0",
        "--trainer.callbacks.every_n_epochs=1",
        callback_arg("scale_callbacks.HardestNegatives"),
        callback_arg("scale_callbacks.StepRecord", path=str(out), state=True, param_steps=[2]),
        callback_arg("scale_callbacks.ShardingRecord", path=str(out)),
        *callbacks,  # after the ModelCheckpoint overrides, which address the last callback
    ]


def _fit(out: Path, vit: Path, devices: int, steps: int, extra: list[str] | None = None,
         callbacks: list[str] | None = None) -> Path:
    out.mkdir()
    status = run(_args(out, vit, devices, steps, extra or [], callbacks or []), out / "log.txt", timeout=240)
    assert status == 0, (out / "log.txt").read_text()[-4000:]
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, vit_source: Path) -> Path:
    return _fit(tmp_path_factory.mktemp("fsdp") / "one", vit_source, 1, 3)


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, vit_source: Path) -> tuple[str, Path, Path]:
    """(strategy, the 2-step run, its resumption to step 3). FSDP1's first run also saves a full
    one-file copy of its checkpoint (``full.ckpt``)."""
    root = tmp_path_factory.mktemp(request.param)
    copy = [callback_arg("scale_callbacks.SaveFullCopy", path=str(root / "full.ckpt"))] if request.param == "fsdp1" else []
    first = _fit(root / "first", vit_source, 2, 2, STRATEGIES[request.param], copy)
    resumed = _fit(root / "resumed", vit_source, 2, 3,
                   [*STRATEGIES[request.param], f"--ckpt_path={first / 'ckpt' / 'last.ckpt'}"])
    return request.param, first, resumed


@pytest.fixture(scope="module")
def fsdp1_from_full_file(sharded: tuple[str, Path, Path], vit_source: Path) -> Path:
    """FSDP1 resumed to step 3 from the full one-file copy (needs the ``fsdp1`` parametrisation)."""
    strategy, first, _ = sharded
    assert strategy == "fsdp1"
    return _fit(first.parent / "resumed_full", vit_source, 2, 3,
                [*STRATEGIES["fsdp1"], f"--ckpt_path={first.parent / 'full.ckpt'}"])


def _lrs(steps: int) -> list[float]:
    return demo_lrs(steps, 30)  # configs/demo/stage1.yaml


def test_two_sharded_processes_match_one(one: Path, sharded: tuple[str, Path, Path]) -> None:
    """Gradients of step 0, parameters after 2 steps and validation metrics equal the 1-process
    run's; the retrieval examples (ValidationExamples, run through the strategy) are logged."""
    _, first, _ = sharded
    assert_same_start(one, first)
    grads_one = assert_same_gradients(one, first)
    grads_two = torch.load(first / "grads.pt")
    assert float(grads_two["model.temp"]) == pytest.approx(float(grads_one["model.temp"]), rel=1e-4)  # kept out of FSDP

    assert_same_training(torch.load(one / "start_params.pt"), torch.load(one / "params_step2.pt"),
                         torch.load(first / "params.pt"), _lrs(2), WIDTH)

    assert_same_retrieval_validation(one, first, step=2)
    # rank 0 ranks the 2 distinct images of its 4 samples (the 1-process run has more): the table of
    # its 4 queries is there, made by the sharded model
    table = logged_text(first, "val_examples/retrieval")
    assert "top 2 of 2 images (ITC)" in table and table.count("| a red circle |") >= 1 and len(table.splitlines()) == 6


def test_units_never_mix_frozen_and_trainable(sharded: tuple[str, Path, Path]) -> None:
    """What the policy wrapped in the real run: blocks, the frozen ViT (not its block list), the Q-Former
    layers and the root; each unit's parameters share requires_grad and dtype (bf16 frozen, fp32
    trainable); only the scalar temperature stays outside FSDP."""
    strategy, first, _ = sharded
    record = json.loads((first / "units.json").read_text())
    units = {u["name"]: u for u in record["units"]}
    assert set(units) == set(UNITS)
    for name, trainable in UNITS.items():
        unit = units[name]
        assert unit["params"], name
        assert unit["requires_grad"] == [trainable], name
        assert unit["dtypes"] == (["torch.float32"] if trainable else ["torch.bfloat16"]), name
        assert unit["sharded"] == [True], name
    assert units["model.vision.vit"]["params"] == [
        "model.vision.vit.cls_token", "model.vision.vit.pos_embed",
        "model.vision.vit.patch_embed.proj.weight", "model.vision.vit.patch_embed.proj.bias"]
    assert "model.vision.ln_vision.weight" in units[""]["params"]
    assert record["left_out"] == ["model.temp"]
    assert record["checkpointed"] == (LAYERS if strategy == "fsdp1" else [])


def test_sharded_checkpoint_resumes_exactly(one: Path, sharded: tuple[str, Path, Path]) -> None:
    """The checkpoint is an atomically written shard directory without the frozen ViT; resuming loads
    every trainable weight and the optimizer state bit for bit and the third step equals the
    uninterrupted single-process run."""
    from torch.distributed.checkpoint import FileSystemReader

    strategy, first, resumed = sharded
    ckpt = first / "ckpt" / "last.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert stale_temporaries(ckpt) == [] and parked_previous(ckpt) == []
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    assert meta["global_step"] == 2 and meta["qformer_lightning"]["task"] == "Stage1"  # not FSDP2's FSDPStage1
    assert meta["qformer_lightning"]["task_class"] == "qformer_lightning.tasks.stage1.Stage1"
    dropped = meta["qformer_lightning"]["dropped_frozen_keys"]
    assert len(dropped) == 30 and all(k.startswith("model.vision.vit.") for k in dropped)
    prefix = {"fsdp2": "state_dict.", "fsdp1": "model."}[strategy]
    stored = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith(prefix)]
    assert len(stored) > 50 and not any(k.startswith(prefix + "model.vision.vit.") for k in stored)
    assert prefix + "model.temp" in stored and prefix + "model.vision.ln_vision.weight" in stored

    assert_restored_exactly(first / "params.pt", first / "optim.pt", resumed)
    assert_same_training(torch.load(one / "start_params.pt"), torch.load(one / "params.pt"),
                         torch.load(resumed / "params.pt"), _lrs(3), WIDTH)


@pytest.mark.parametrize("sharded", ["fsdp1"], indirect=True)
def test_fsdp1_full_checkpoint_resumes_exactly(one: Path, sharded: tuple[str, Path, Path], fsdp1_from_full_file: Path) -> None:
    """FSDP1 with ``state_dict_type: full``: one file, frozen ViT left out, the optimizer state keyed by
    parameter name and right (FSDP1's rank-0-only gathering put wrong moments there: up to 0.23 off)."""
    first = sharded[1]
    checkpoint = torch.load(first.parent / "full.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2 and checkpoint["qformer_lightning"]["task"] == "Stage1"
    assert len(checkpoint["qformer_lightning"]["dropped_frozen_keys"]) == 30
    assert not any(k.startswith("model.vision.vit.") for k in checkpoint["state_dict"])
    saved = checkpoint["optimizer_states"][0]["state"]
    final = torch.load(first / "optim.pt")  # the optimizer at the end of the first run (no step after the save)
    assert saved.keys() == final.keys()
    for name in final:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[name][key], final[name][key]), (name, key)

    assert_restored_exactly(first / "params.pt", first / "optim.pt", fsdp1_from_full_file)
    assert_same_training(torch.load(one / "start_params.pt"), torch.load(one / "params.pt"),
                         torch.load(fsdp1_from_full_file / "params.pt"), _lrs(3), WIDTH)


# ---------------------------------------------------------------------------- in-process pieces


class _Tower(torch.nn.Module):
    """A frozen ViT in miniature: an embedding, a block list, a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(8, 2, 16) for _ in range(2)])
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_wrap_policy_never_makes_a_module_list_a_unit() -> None:
    """A frozen block list holds blocks and only frozen parameters, but FSDP never runs its forward:
    FSDP2 refuses it ("fully_shard does not support containers that do not implement forward") and
    FSDP1 would leave its parameters sharded. The tower around it is the unit."""
    from qformer_lightning.scale.fsdp import Blip2WrapPolicy, wrap_units

    model = torch.nn.ModuleDict({"tower": _Tower().requires_grad_(False), "head": torch.nn.Linear(8, 2)})
    policy = Blip2WrapPolicy(block_classes=["torch.nn.modules.transformer.TransformerEncoderLayer"])
    assert not policy(model["tower"].blocks, False, 0)
    units = wrap_units(model, policy)
    assert [type(u).__name__ for u in units] == ["TransformerEncoderLayer", "TransformerEncoderLayer", "_Tower"]


def test_directory_swap_keeps_a_complete_checkpoint(tmp_path: Path) -> None:
    """swap_in replaces a checkpoint directory (or file) whole; a crash between its two renames is
    undone by recover_interrupted_swap, which also clears what an interrupted save left."""
    from qformer_lightning.scale.checkpointing import directory_temporary, recover_interrupted_swap, swap_in

    path = tmp_path / "last.ckpt"
    path.write_bytes(b"a file checkpoint of another strategy")
    for step in (1, 2):
        tmp = directory_temporary(path, "123")
        tmp.mkdir()
        (tmp / "meta.pt").write_text(str(step))
        swap_in(tmp, path, "123")
        assert (path / "meta.pt").read_text() == str(step)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed between the renames: the previous checkpoint is parked, the new one still a temporary
    path.rename(tmp_path / ".last.ckpt.old-7")
    directory_temporary(path, "7").mkdir()
    recover_interrupted_swap(path)
    assert (path / "meta.pt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # killed while writing the shards: the temporary is removed, the checkpoint untouched
    (directory_temporary(path, "8") / "sub").mkdir(parents=True)
    recover_interrupted_swap(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (path / "meta.pt").read_text() == "2"


def test_sharded_load_leaves_out_only_the_dropped_weights(tmp_path: Path) -> None:
    from qformer_lightning.scale.strategies import check_loadable

    model = {"model.vit.w", "model.vit.b", "model.q.w", "model.temp"}
    stored = {"model.q.w", "model.temp"}
    assert check_loadable(model, stored, {"model.vit.w", "model.vit.b"}, tmp_path, strict=True) == ["model.vit.b", "model.vit.w"]
    with pytest.raises(ValueError, match=r"missing \['model.vit.b'\] \(1 in all.*unexpected \['model.extra'\]"):
        check_loadable(model, stored | {"model.extra"}, {"model.vit.w"}, tmp_path, strict=True)
    assert check_loadable(model, stored, set(), tmp_path, strict=False) == ["model.vit.b", "model.vit.w"]


def test_dropped_keys_read_unwrapped_names() -> None:
    """FSDP1 and activation checkpointing insert wrapper segments into parameter names, not into the
    (sharded) state-dict names the checkpoint hook filters."""
    from qformer_lightning.tasks.base import unwrapped_name

    name = "model.qformer.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.qkv_proj.bias"
    assert unwrapped_name(name) == "model.qformer.layers.0.self_attn.qkv_proj.bias"
    assert unwrapped_name("model.temp") == "model.temp"


def test_positional_optimizer_state_is_named_by_group_order(tmp_path: Path) -> None:
    """A position-keyed state (DDP, one device) takes this run's names group by group; groups or shapes
    that do not match are refused, naming the checkpoint."""
    from qformer_lightning.scale.strategies import is_positional, name_positional_state

    moments = {"step": torch.tensor(2.0), "exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(3, 2)}
    bias = {"step": torch.tensor(2.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    state = {"state": {0: moments, 1: bias}, "param_groups": [{"weight_decay": 0.05, "lr": 1e-3, "params": [0]},
                                                             {"weight_decay": 0.0, "lr": 1e-3, "params": [1]}]}
    current = {"state": {"m.w": {k: torch.zeros_like(v) for k, v in moments.items()},
                         "m.b": {k: torch.zeros_like(v) for k, v in bias.items()}},
               "param_groups": [{"weight_decay": 0.05, "params": ["m.w"]}, {"weight_decay": 0.0, "params": ["m.b"]}]}
    assert is_positional(state) and not is_positional(current)
    named = name_positional_state(state, current, tmp_path)
    assert named["state"] == {"m.w": moments, "m.b": bias}
    assert [g["params"] for g in named["param_groups"]] == [["m.w"], ["m.b"]] and named["param_groups"][0]["lr"] == 1e-3
    swapped = {**current, "param_groups": current["param_groups"][::-1]}
    with pytest.raises(ValueError, match="groups of sizes"):
        name_positional_state(state, swapped, tmp_path / "last.ckpt")
    wrong = {**current, "state": {**current["state"], "m.w": {k: torch.zeros(2, 3) for k in moments}}}
    with pytest.raises(ValueError, match="exp_avg of m.w has shape"):
        name_positional_state(state, wrong, tmp_path)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_single_device_checkpoint_resumes_under_sharding(one: Path, strategy: str, tmp_path: Path, vit_source: Path) -> None:
    """The 1-process run's one-file checkpoint (step 2) resumes on 2 sharded processes: weights and Adam
    state restored bit for bit, and the third step equals the 1-process run's."""
    resumed = _fit(tmp_path / "resumed", vit_source, 2, 3, [*STRATEGIES[strategy], f"--ckpt_path={one / 'ckpt' / 'last.ckpt'}"])
    assert_restored_exactly(one / "params_step2.pt", one / "optim_step2.pt", resumed)
    assert_same_training(torch.load(one / "start_params.pt"), torch.load(one / "params.pt"),
                         torch.load(resumed / "params.pt"), _lrs(3), WIDTH)


def test_sharded_checkpoint_of_the_other_fsdp_is_named(tmp_path: Path) -> None:
    """FSDP1 stores the module state under "model", FSDP2 under "state_dict": a sharded checkpoint of
    one resumed under the other names the strategy that wrote it."""
    import torch.distributed.checkpoint as dcp

    from qformer_lightning.scale.strategies import check_sharded_writer, sharded_checkpoint_keys

    dcp.save({"model": {"model.q.w": torch.ones(2)}, "optimizer_0": {"step": torch.tensor(1.0)}}, checkpoint_id=tmp_path / "fsdp1")
    fsdp1 = sharded_checkpoint_keys(tmp_path / "fsdp1")
    check_sharded_writer(fsdp1, "model", tmp_path / "fsdp1")
    with pytest.raises(ValueError, match=r"sharded checkpoint of FSDP1 \(configs/strategy/fsdp.yaml\)"):
        check_sharded_writer(fsdp1, "state_dict", tmp_path / "fsdp1")
    dcp.save({"state_dict": {"model.q.w": torch.ones(2)}}, checkpoint_id=tmp_path / "fsdp2")
    with pytest.raises(ValueError, match="of FSDP2"):
        check_sharded_writer(sharded_checkpoint_keys(tmp_path / "fsdp2"), "model", tmp_path / "fsdp2")


def test_tensor_parallel_size_must_divide_the_ranks() -> None:
    from qformer_lightning.scale.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=3)
    strategy.parallel_devices = [torch.device("cpu")] * 2
    strategy.num_nodes = 1
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the 2 ranks"):
        strategy.setup_environment()


def test_one_file_checkpoint_with_another_number_of_optimizers_is_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from qformer_lightning.scale.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy()
    model = torch.nn.Linear(2, 2)
    strategy.model = model
    strategy._lightning_module = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING)))
    strategy.optimizers = [torch.optim.AdamW(model.parameters())]
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [{}, {}]}
    with pytest.raises(ValueError, match="holds 2 optimizer states, this run has 1 optimizers"):
        strategy._load_file(checkpoint, tmp_path / "last.ckpt")
