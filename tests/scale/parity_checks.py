"""What the multi-process CPU tests (DDP, FSDP, FSDP2) compare between a 1-process run and its
2-process twin (files written by ``scale_callbacks.StepRecord``).

Tolerances. Gradients: a relative difference of the whole gradient (a wrong reduction, a sum or
one rank's share, is off by O(1)). Parameters: AdamW divides each gradient by its running RMS, so
rounding differences in a tiny gradient become visible; the key-bias third of each Q-Former
self-attention ``qkv_proj.bias`` has a gradient that is zero in exact arithmetic (softmax ignores a
shift shared by all keys), so its update is the sign of rounding noise and two correct runs may
differ by up to ``2 * sum(lr_t)`` there. Everything else is compared element-wise at ``1e-4`` and
as a whole: the update of all parameters differs by < 1e-3 of its norm (FSDP1 without its
weight-decay fix was at 8e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qformer_lightning.tasks.optim import warmup_cosine

STRATEGIES = {
    "fsdp2": ["--config", "configs/strategy/fsdp2.yaml"],
    "fsdp1": ["--config", "configs/strategy/fsdp.yaml"],
}
"""The production strategy fragments, unchanged."""


def demo_lrs(steps: int, warmup_steps: int) -> list[float]:
    """The learning rates of the first ``steps`` steps under the demo configs' schedule (lr 1e-3, min
    1e-4, warmup from 1e-5 over ``warmup_steps``: 30 in ``configs/demo/stage1.yaml``, 15 in stage 2)."""
    return [warmup_cosine(t, warmup_steps, steps, 1e-3, 1e-4, 1e-5) for t in range(steps)]


def validation_at(run: Path, step: int) -> dict[str, float]:
    """The validation metrics ``StepRecord`` logged at ``step`` (the last such record)."""
    records = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    matching = [r for r in records if r["step"] == step]
    assert matching, f"no validation at step {step} in {run / 'val.jsonl'}: {[r['step'] for r in records]}"
    return matching[-1]


def assert_same_retrieval_validation(one: Path, two: Path, step: int) -> None:
    """Stage 1's validation at ``step``: the same retrieval recalls, ITC/ITM/ITG losses within 1e-4."""
    val_one, val_two = validation_at(one, step), validation_at(two, step)
    for key in ("val/txt_r1", "val/txt_r5", "val/img_r1", "val/img_r5", "val/r_mean"):
        assert val_one[key] == val_two[key], key
    for key in ("val/itc", "val/itm", "val/itg"):
        assert val_one[key] == pytest.approx(val_two[key], rel=1e-4), key


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def split_key_bias(params: dict[str, torch.Tensor], width: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The parameters without the key thirds of the self-attention biases (``(3 * width,)``), and those thirds."""
    rest, keys = {}, []
    for name, value in params.items():
        if name.endswith("self_attn.qkv_proj.bias"):
            keys.append(value[width:2 * width])
            value = torch.cat([value[:width], value[2 * width:]])
        rest[name] = value
    return rest, torch.cat(keys)


def assert_same_gradients(one: Path, two: Path) -> dict[str, torch.Tensor]:
    """The gradients of step 0 (``grads.pt`` of ``StepRecord``) agree; returns the 1-process ones."""
    grads_one, grads_two = torch.load(one / "grads.pt"), torch.load(two / "grads.pt")
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 20
    flat_one = torch.cat([g.flatten() for g in grads_one.values()])
    flat_two = torch.cat([grads_two[k].flatten() for k in grads_one])
    assert relative(flat_one, flat_two) < 1e-5
    for name in grads_one:
        assert relative(grads_one[name], grads_two[name]) < 1e-2, name
    return grads_one


def assert_same_start(one: Path, two: Path) -> None:
    """Both runs start from the same trainable weights."""
    start_one, start_two = torch.load(one / "start_params.pt"), torch.load(two / "start_params.pt")
    assert start_one.keys() == start_two.keys()
    for name, value in start_one.items():
        assert torch.equal(value, start_two[name]), name


def assert_restored_exactly(params: Path, optim: Path, resumed: Path, steps: int = 2) -> None:
    """The resumed run starts from the trainable weights ``params`` and the optimizer state ``optim``
    (``StepRecord`` files of the run that wrote the checkpoint, after ``steps`` steps), bit for bit."""
    saved, restored = torch.load(params), torch.load(resumed / "start_params.pt")
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    saved_optim, restored_optim = torch.load(optim), torch.load(resumed / "start_optim.pt")
    assert saved_optim.keys() == saved.keys() == restored_optim.keys()
    for name, state in saved_optim.items():
        assert state.keys() == restored_optim[name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key in state:
            assert torch.equal(state[key], restored_optim[name][key]), (name, key)
        assert float(state["step"]) == steps


def assert_same_training(start: dict, reference: dict, other: dict, lrs: list[float], width: int) -> None:
    """``other`` took the same optimizer steps (learning rates ``lrs``) from ``start`` as ``reference``
    (module docstring; ``width``: the Q-Former's hidden size)."""
    assert reference.keys() == other.keys() == start.keys() and len(reference) > 20
    ref, ref_keys = split_key_bias(reference, width)
    oth, oth_keys = split_key_bias(other, width)
    init, _ = split_key_bias(start, width)
    for name in ref:
        assert torch.allclose(ref[name], oth[name], rtol=0, atol=1e-4), name
    update_ref = torch.cat([(ref[n] - init[n]).flatten() for n in ref])
    update_oth = torch.cat([(oth[n] - init[n]).flatten() for n in ref])
    assert relative(update_ref, update_oth) < 1e-3
    assert (ref_keys - oth_keys).abs().max() <= 2.02 * sum(lrs)  # |AdamW step| <= 1.001 lr (betas 0.9, 0.98)


def logged_text(run_dir: Path, tag: str) -> str:
    """The last text summary ``tag`` that TensorBoard holds under ``run_dir`` (the ValidationExamples tables)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir), size_guidance={"tensors": 0})
    events.Reload()
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()
