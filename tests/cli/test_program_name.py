"""``--help`` names the program as it is run: ``python -m qformer_lightning`` (issue 15.6), not ``__main__.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from qformer_lightning.cli import PROG, SCRIPT, Blip2CLI, program_name

ROOT = Path(__file__).resolve().parents[2]


def _help(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info, mock.patch.object(sys, "argv", sys.argv[:1]):
        Blip2CLI(args=args)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_root_and_subcommand_usage_name_python_dash_m(capsys: pytest.CaptureFixture) -> None:
    assert _help(["--help"], capsys).startswith(f"usage: {PROG} [-c CONFIG]")
    for subcommand in ("fit", "validate", "test", "predict"):
        out = _help([subcommand, "--help"], capsys)
        assert out.startswith(f"usage: {PROG} [options] {subcommand}") and "__main__.py" not in out


def test_console_script_keeps_its_own_name() -> None:
    with mock.patch.object(sys, "argv", ["/venv/bin/qformer-lightning", "fit"]):
        assert program_name() == SCRIPT
    with mock.patch.object(sys, "argv", [str(ROOT / "qformer_lightning" / "__main__.py"), "fit"]):
        assert program_name() == PROG


def test_python_dash_m_help() -> None:
    out = subprocess.run([sys.executable, "-m", "qformer_lightning", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {PROG} [-c CONFIG]") and "__main__.py" not in out.stdout
