"""Every YAML under configs/ is parsed and instantiated by the CLI (tiny stand-ins for heavy parts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qformer_lightning.cli import Blip2CLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
TINY = Path(__file__).parent / "configs"

# experiment config -> extra configs layered on top so that it builds tiny on CPU
OVERRIDES: dict[str, list[str]] = {
    "configs/stage1_vitg.yaml": [str(TINY / "tiny_stage1.yaml")],
    "configs/stage1_vitl.yaml": [str(TINY / "tiny_stage1.yaml")],
    "configs/demo/stage1.yaml": [],
}
# strategy fragments are composed with the demo experiment
FRAGMENTS = {c for c in CONFIGS if c.startswith("configs/strategy/") or c.startswith("configs/trainer/")}


def _instantiate(configs: list[str], extra: list[str] | None = None) -> Blip2CLI:
    args = []
    for config in configs:
        args += ["--config", config]
    return Blip2CLI(args=[*args, *(extra or [])], run=False)


def test_every_config_is_covered() -> None:
    uncovered = [c for c in CONFIGS if c not in OVERRIDES and c not in FRAGMENTS and not _covered_elsewhere(c)]
    assert not uncovered, f"configs without an instantiation test: {uncovered}"


def _covered_elsewhere(config: str) -> bool:
    """Configs whose instantiation test lives beside their task's tests (tests/*/test_*configs*.py)."""
    name = Path(config).name
    return any(name in p.read_text() for p in (ROOT / "tests").rglob("test_*config*.py") if p.name != "test_configs.py")


@pytest.mark.parametrize("config", sorted(OVERRIDES))
def test_experiment_config_instantiates(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cli = _instantiate([config, *OVERRIDES[config]])
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in cli.model.parameters() if not p.requires_grad)
    assert trainable > 0 and frozen > 0


class _ParseOnly(Blip2CLI):
    """Parses and validates the composed config without building anything."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("fragment", sorted(FRAGMENTS))
def test_strategy_fragment_composes(fragment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fragment composes with an experiment; its strategy instantiates, alone and inside the
    Trainer the CLI builds (on CPU; tests/scale/test_fsdp_cpu.py trains with FSDP/FSDP2 there)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    monkeypatch.chdir(ROOT)
    expected = {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy", "fsdp2": "ModelParallelStrategy"}[Path(fragment).stem]
    args = ["--config", "configs/demo/stage1.yaml", "--config", fragment, "--trainer.devices=1"]
    config = _ParseOnly(args=args, run=False).config
    assert config.trainer.strategy.class_path.endswith(expected)
    assert config.model.class_path.endswith("Stage1")  # the experiment survived the composition
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config.trainer.strategy})).strategy
    assert type(strategy).__name__ == expected
    trainer_strategy = _instantiate(["configs/demo/stage1.yaml", fragment], ["--trainer.devices=1"]).trainer.strategy
    assert type(trainer_strategy).__name__ == expected
    if expected != "DDPStrategy":  # the project's subclasses (atomic sharded saves, resume without frozen weights)
        assert type(trainer_strategy).__module__ == "qformer_lightning.scale.strategies"
    if expected == "FSDPStrategy":
        from qformer_lightning.scale.fsdp import Blip2WrapPolicy, BlockPolicy

        assert isinstance(strategy.kwargs["auto_wrap_policy"], Blip2WrapPolicy)
        assert strategy._state_dict_type == "sharded"
        assert isinstance(strategy._activation_checkpointing_kwargs["auto_wrap_policy"], BlockPolicy)


def test_fsdp_policy_separates_frozen_and_trainable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the FSDP policy every unit holds only frozen or only trainable parameters."""
    from qformer_lightning.scale.fsdp import Blip2WrapPolicy, wrap_units

    monkeypatch.chdir(ROOT)
    model = _instantiate(["configs/demo/stage1.yaml"]).model
    units = wrap_units(model, Blip2WrapPolicy())
    assert any(type(u).__name__ == "QFormerLayer" for u in units) and any(u is model.model.vision.vit for u in units)
    owned: set[int] = set()
    for unit in units:  # children first: a unit owns the parameters no inner unit took
        params = [p for p in unit.parameters() if id(p) not in owned]
        assert len({p.requires_grad for p in params}) <= 1, type(unit).__name__
        owned |= {id(p) for p in params}
    root = [p for p in model.parameters() if id(p) not in owned]
    assert root and all(p.requires_grad for p in root)


def test_print_config_shows_paper_settings() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "qformer_lightning", "fit", "--config", "configs/stage1_vitg.yaml", "--print_config"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    for expected in ("max_steps: 250000", "lr: 0.0001", "warmup_steps: 2000", "weight_decay: 0.05",
                     "- 0.9", "- 0.98", "precision: bf16-mixed", "num_query_tokens: 32", "cross_attention_freq: 2",
                     "model_name: eva_giant_patch14_clip_224", "image_size: 224", "batch_size: 105", "devices: 16"):
        assert expected in out, expected


def test_config_typo_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        _instantiate(["configs/demo/stage1.yaml"], ["--model.init_args.optim.lrr=0.1"])
    assert "lrr" in capsys.readouterr().err


def test_command_line_null_reaches_nested_class_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--...llm.init_args.gguf_file=null`` (a class inside another class's init_args) gives None, not
    the string "None" jsonargparse makes of it: the demo stage 2 then loads a plain HF directory."""
    from qformer_lightning.cli import null_overrides

    monkeypatch.chdir(ROOT)
    llm = "--model.init_args.model.init_args.llm.init_args"
    cli = _instantiate(["configs/demo/stage2.yaml"], [f"{llm}.gguf_file=null", f"{llm}.tokenizer", "~",
                                                      "--model.init_args.pretrained=null"])
    assert cli.model.model.llm.gguf_file is None and cli.model.model.llm.tokenizer_name is None
    assert cli.model.pretrained is None
    assert "gguf_file: null" in cli.model.run_config
    assert null_overrides(["fit", "--a.b=null", "--c", "None", "--d=none", "--e", "x", "--f"]) == ["a.b", "c"]
