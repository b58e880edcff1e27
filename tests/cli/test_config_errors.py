"""Config mistakes end in one ``config error: <option path> ...`` line with exit status 2 (issue 15.5),
and LightningCLI's ``--optimizer``/``--lr_scheduler`` are refused (issue 15.6).

Every run here fails while parsing or while building the classes: none reaches training.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from jsonargparse import ArgumentParser

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.config_errors import (
    DEBUG_ENV, ConfigError, instantiation_error_line, locate_unknown, suggest, unknown_option_key,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo" / "stage1.yaml")
TYPO_LINE = "config error: model.init_args.optim.warmup_stpes is not an option (did you mean warmup_steps?)"
MAX_LINES = 10


def _fail(args: list[str], capsys: pytest.CaptureFixture, max_lines: int = MAX_LINES) -> tuple[ConfigError, list[str]]:
    """Build the CLI without a subcommand (so nothing can train); returns the error and stderr's lines."""
    with pytest.raises(ConfigError) as info, mock.patch.object(sys, "argv", sys.argv[:1]):
        Blip2CLI(args=["--config", DEMO, *args], run=False)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) < max_lines, lines
    assert lines[-1] == str(info.value)
    return info.value, lines


def test_command_line_typo_in_a_nested_option(capsys: pytest.CaptureFixture) -> None:
    _, lines = _fail(["--model.init_args.optim.warmup_stpes=5"], capsys)
    assert lines[-1] == TYPO_LINE


def test_typo_in_a_second_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    optim:\n      warmup_stpes: 5\n")
    _, lines = _fail(["--config", str(typo)], capsys)
    assert lines[-1] == TYPO_LINE


@pytest.mark.parametrize("args", [["--trainer.max_stpes=3"], ["--trainer", '{"max_stpes": 3}']])
def test_trainer_typo(args: list[str], capsys: pytest.CaptureFixture) -> None:
    _, lines = _fail(args, capsys)
    assert lines[-1] == "config error: trainer.max_stpes is not an option (did you mean max_steps?)"


def test_negative_lr_names_the_option(capsys: pytest.CaptureFixture) -> None:
    """Optimization refuses it while jsonargparse builds the task: the path comes from the build."""
    _, lines = _fail(["--model.init_args.optim.lr=-0.001"], capsys)
    assert lines[-1] == "config error: model.init_args.optim.lr: need lr > 0, got -0.001"


def test_other_mistakes_name_their_option(capsys: pytest.CaptureFixture) -> None:
    cases = {
        "--model.init_args.optim.lr=abc":
            "config error: model.init_args.optim.lr: Expected a <class 'float'>. Got value: abc",
        "--model.init_args.max_txt_length=3":
            "config error: model.init_args.max_txt_length is not an option (did you mean max_text_length?)",
        "--model.init_args.model.init_args.qformr.init_args.x=1":
            "config error: model.init_args.model.init_args.qformr is not an option (did you mean qformer?)",
        "--model.class_path=qformer_lightning.tasks.stage1.Stag1":
            "config error: model.class_path: module 'qformer_lightning.tasks.stage1' has no attribute 'Stag1'",
        "--model.init_args.optim.min_lr=0.5":
            "config error: model.init_args.optim.min_lr: need 0 <= min_lr <= lr, got min_lr=0.5, lr=0.001",
    }
    for arg, expected in cases.items():
        assert _fail([arg], capsys)[1][-1] == expected


def test_a_task_error_names_the_task_option(capsys: pytest.CaptureFixture) -> None:
    """A task's own message that starts with one of its fields names that field's option."""
    _, lines = _fail(["--model.init_args.frozen=[model.nothing]"], capsys)
    assert lines[-1].startswith("config error: model.init_args.frozen: frozen entry 'model.nothing' names no module")


@pytest.mark.parametrize("args", [["--optimizer", "torch.optim.SGD"], ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"]])
def test_lightning_optimizer_options_are_refused(args: list[str], capsys: pytest.CaptureFixture) -> None:
    _, lines = _fail(args, capsys)
    name = args[0].removeprefix("--")
    assert lines[-1].startswith(f"config error: {name} is not an option of this CLI: ")
    assert lines[-1].endswith("is set in model.init_args.optim")


def test_optimizer_in_yaml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fragment = tmp_path / "sgd.yaml"
    fragment.write_text("optimizer:\n  class_path: torch.optim.SGD\n  init_args:\n    lr: 0.1\n")
    _, lines = _fail(["--config", str(fragment)], capsys)
    assert "optimizer is not an option of this CLI" in lines[-1] and "model.init_args.optim" in lines[-1]


def test_print_config_has_no_optimizer_section(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", sys.argv[:1]):
        Blip2CLI(args=["fit", "--config", DEMO, "--print_config"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "    optim:" in out and "warmup_steps: 30" in out
    assert "\noptimizer:" not in out and "\nlr_scheduler:" not in out


def test_debug_env_prints_the_full_report(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "1")
    _, lines = _fail(["--model.init_args.optim.warmup_stpes=5"], capsys, max_lines=100)
    assert any("Option 'warmup_stpes' is not accepted" in line for line in lines)
    assert lines[-1] == TYPO_LINE


def test_python_dash_m_ends_in_one_line() -> None:
    """The real entry point: exit status 2, no traceback, the error as the last line of stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "qformer_lightning", "fit", "--config", DEMO, "--model.init_args.optim.warmup_stpes=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) < MAX_LINES, out.stderr
    assert lines[-1] == TYPO_LINE and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- the pieces
def test_unknown_option_messages_of_jsonargparse() -> None:
    assert unknown_option_key("Option 'warmup_stpes' is not accepted") == "warmup_stpes"
    assert unknown_option_key("Group 'trainer' does not accept option 'max_stpes'") == "trainer.max_stpes"
    assert unknown_option_key("Subcommand 'fit' does not accept option 'modle.x'") == "modle.x"
    assert unknown_option_key("unrecognized arguments: --trainer.max_stpes=3 --a 1") == "trainer.max_stpes"
    assert unknown_option_key("Expected a <class 'float'>. Got value: abc") is None


def test_locate_unknown_splits_at_the_wrong_part() -> None:
    known = ["trainer.max_steps", "trainer.max_epochs", "model", "seed_everything"]
    assert locate_unknown("trainer.max_stpes", known) == ("trainer.max_stpes", ["max_epochs", "max_steps"])
    assert locate_unknown("modle.x", known) == ("modle", ["model", "seed_everything", "trainer"])
    assert suggest("max_stpes", ["max_epochs", "max_steps"]) == "max_steps"
    assert suggest("zzz", ["max_epochs", "max_steps"]) is None


class Part:
    """A class for jsonargparse to build: refuses a negative ``x`` (a config mistake) or ``x=13`` (a bug)."""

    def __init__(self, x: int = 1) -> None:
        if x < 0:
            raise ValueError(f"x: need x >= 0, got {x}")
        if x == 13:
            raise RuntimeError("an internal bug")
        self.x = x


def _build(x: int) -> tuple[Exception, object]:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--part", type=Part | None)
    config = parser.parse_args(["--part", f'{{"class_path": "{__name__}.Part", "init_args": {{"x": {x}}}}}'])
    with pytest.raises(Exception) as info:
        parser.instantiate_classes(config)
    return info.value, config


def test_instantiation_error_of_a_class_names_its_field() -> None:
    err, config = _build(-1)
    assert instantiation_error_line(err, config) == "part.init_args.x: need x >= 0, got -1"


def test_a_bug_while_building_keeps_its_traceback() -> None:
    err, config = _build(13)
    assert instantiation_error_line(err, config) is None
