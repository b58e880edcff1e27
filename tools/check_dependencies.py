"""Check that every third-party module the package needs at run time is a declared dependency.

    python tools/check_dependencies.py     # prints each problem; exit 1 if there is any

A missing runtime dependency goes unnoticed wherever the packages of earlier installs stay around
(``gguf`` sat in the ``[dev]`` extra, and only a fresh virtual environment showed it). This finds
one without a fresh environment:

1. :func:`collect_uses`: walk ``qformer_lightning/`` with :mod:`ast` for every top-level module
   imported, at the top of a file or inside a function (lazy), or loaded by name
   (``importlib.import_module("x")``, ``find_spec("x")``); add the modules needed indirectly
   (:data:`INDIRECT_NEEDS`: a ``gguf_file`` is read by transformers with the ``gguf`` package) and
   those the shipped configs name (a ``class_path``'s top-level module, ``package:NAME`` sources).
   The standard library and the package itself are left out.
2. :func:`undeclared`: map each module to its distribution
   (:func:`importlib.metadata.packages_distributions`) and report those missing from
   ``pyproject.toml`` ``[project] dependencies``, naming the module and the file:line that needs
   it. The weight-only packages (:data:`qformer_lightning.preflight.WEIGHT_PACKAGES`, installed
   with ``--no-deps``) are allowed optional sources.
3. :func:`requirements_problems`: ``requirements.txt`` pins (``==``) every runtime dependency and
   nothing else. :func:`dev_extra_problems`: the ``[dev]`` extra holds only test tools (nothing the
   package imports).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qformer_lightning.preflight import WEIGHT_PACKAGES, normalize  # noqa: E402


@dataclass(frozen=True)
class Use:
    """One place that needs a top-level module.

    Args:
        module: the top-level import name (``PIL``).
        where: ``path:line``, the path relative to the package's parent.
        how: ``import``, ``lazy import`` (inside a function), ``by name`` or the indirect reason.
    """

    module: str
    where: str
    how: str


@dataclass(frozen=True)
class IndirectNeed:
    """A module a library loads only when a feature is used: ``pattern`` in a source line needs ``module``."""

    pattern: str
    module: str
    reason: str


INDIRECT_NEEDS: tuple[IndirectNeed, ...] = (
    IndirectNeed(r"\bgguf_file\b", "gguf", "transformers reads a gguf_file with the gguf package"),
    IndirectNeed(r"\bTensorBoardLogger\b", "tensorboard", "Lightning's TensorBoardLogger writes with tensorboard"),
)
"""Needs no import statement shows (searched in the package's sources and the configs)."""

OPTIONAL_SOURCES: dict[str, str] = {
    package.module: f"{package.distribution}: weight-only package installed with --no-deps ({package.contents})"
    for package in WEIGHT_PACKAGES
}
"""Modules allowed outside the dependencies, with the reason (also when the package is not installed)."""

LOADERS = {"import_module", "find_spec", "__import__"}
"""Functions whose first argument, a string literal, names a module to load."""


# ----------------------------------------------------------------------------- collecting
def collect_uses(package_dir: Path, config_dir: Path | None = None) -> list[Use]:
    """Every third-party top-level module the package (and its configs) need, with where.

    Args:
        package_dir: the package's source directory (its name is the package's own module).
        config_dir: YAML configs shipped with it, or None.

    Raises:
        SyntaxError: a source file does not parse (its path is in the message).
    """
    base = package_dir.parent
    uses = []
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        uses += _imports(ast.parse(text, filename=str(path)), str(path.relative_to(base)))
        uses += _indirect(text, str(path.relative_to(base)))
    if config_dir is not None:
        for path in sorted(config_dir.rglob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            where = str(path.relative_to(config_dir.parent))
            uses += _indirect(text, where) + _config_modules(text, where)
    return [use for use in uses if use.module not in sys.stdlib_module_names and use.module != package_dir.name]


def _imports(tree: ast.AST, where: str) -> list[Use]:
    """``import x``, ``from x import y`` (absolute only) and loads by name, marked lazy inside a function."""
    uses = []

    def visit(node: ast.AST, lazy: bool) -> None:
        how = "lazy import" if lazy else "import"
        if isinstance(node, ast.Import):
            uses.extend(Use(alias.name.split(".")[0], f"{where}:{node.lineno}", how) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            uses.append(Use(node.module.split(".")[0], f"{where}:{node.lineno}", how))
        elif isinstance(node, ast.Call) and _loaded_name(node):
            uses.append(Use(_loaded_name(node).split(".")[0], f"{where}:{node.lineno}", "by name"))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return uses


def _loaded_name(call: ast.Call) -> str | None:
    """The module a loader call names by a string literal (``importlib.import_module("gguf")``), else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in LOADERS or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def _indirect(text: str, where: str) -> list[Use]:
    """The :data:`INDIRECT_NEEDS` whose pattern occurs in ``text``, one use per line."""
    return [
        Use(need.module, f"{where}:{number}", need.reason)
        for number, line in enumerate(text.splitlines(), start=1)
        for need in INDIRECT_NEEDS
        if re.search(need.pattern, line)
    ]


def _config_modules(text: str, where: str) -> list[Use]:
    """The top-level modules of a YAML's ``class_path`` values and ``package:NAME`` sources."""
    uses = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in re.finditer(r"class_path:\s*([A-Za-z_]\w*)", line):
            uses.append(Use(match.group(1), f"{where}:{number}", "class_path"))
        for match in re.finditer(r"\bpackage:([A-Za-z_]\w*)", line):
            uses.append(Use(match.group(1), f"{where}:{number}", "package: source (found with find_spec)"))
    return uses


# ----------------------------------------------------------------------------- declared names
def requirement_name(spec: str, origin: str) -> str:
    """The normalised distribution name of a requirement (``jsonargparse[signatures]>=4`` -> ``jsonargparse``).

    Raises:
        ValueError: no name, with ``origin`` (file and entry) in the message.
    """
    match = re.match(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)", spec)
    if match is None:
        raise ValueError(f"{origin}: cannot read a distribution name from {spec!r}")
    return normalize(match.group(1))


def read_pyproject(path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``[project] dependencies`` and ``optional-dependencies`` as {normalised name: requirement}.

    Raises:
        ValueError: no ``[project] dependencies`` list, or an entry without a name.
    """
    with path.open("rb") as handle:
        project = tomllib.load(handle).get("project", {})
    if not isinstance(project.get("dependencies"), list):
        raise ValueError(f"{path}: no [project] dependencies list")
    runtime = {requirement_name(spec, f"{path} dependencies"): spec for spec in project["dependencies"]}
    extras = {
        extra: {requirement_name(spec, f"{path} [{extra}]"): spec for spec in specs}
        for extra, specs in project.get("optional-dependencies", {}).items()
    }
    return runtime, extras


def read_requirements(path: Path) -> dict[str, str]:
    """A requirements file as {normalised name: requirement}; comments, blanks and ``-`` options skipped."""
    found = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        spec = line.partition("#")[0].strip()
        if spec and not spec.startswith("-"):
            found[requirement_name(spec, f"{path}:{number}")] = spec
    return found


# ----------------------------------------------------------------------------- checks
def distributions_of(module: str, mapping: Mapping[str, Sequence[str]]) -> list[str]:
    """The normalised distributions that install ``module`` (several may: namespace packages)."""
    return [normalize(name) for name in mapping.get(module, ())]


def undeclared(
    uses: Iterable[Use],
    runtime: Iterable[str],
    mapping: Mapping[str, Sequence[str]],
    optional: Mapping[str, str] = OPTIONAL_SOURCES,
) -> list[str]:
    """One message per module whose distribution is not a runtime dependency (or that nothing installs).

    Args:
        uses: from :func:`collect_uses`.
        runtime: the declared runtime distribution names (normalised).
        mapping: module -> distributions (:func:`importlib.metadata.packages_distributions`).
        optional: modules allowed outside the dependencies, with the reason.
    """
    declared = set(runtime)
    by_module: dict[str, list[Use]] = {}
    for use in uses:
        if use.module not in optional:
            by_module.setdefault(use.module, []).append(use)
    problems = []
    for module, places in sorted(by_module.items()):
        dists = distributions_of(module, mapping)
        if declared.intersection(dists):
            continue
        what = f"distribution {dists[0]!r}" if dists else "a distribution that is not installed here"
        problems.append(
            f"module {module!r} ({what}) is needed at {_places(places)} "
            "but missing from pyproject.toml [project] dependencies"
        )
    return problems


def dev_extra_problems(
    uses: Iterable[Use], dev: Iterable[str], mapping: Mapping[str, Sequence[str]]
) -> list[str]:
    """Messages for each ``[dev]`` distribution the package needs at run time (it belongs in dependencies)."""
    dev_names = set(dev)
    problems = []
    by_dist: dict[str, list[Use]] = {}
    for use in uses:
        for dist in dev_names.intersection(distributions_of(use.module, mapping)):
            by_dist.setdefault(dist, []).append(use)
    for dist, places in sorted(by_dist.items()):
        problems.append(f"[dev] extra holds {dist!r}, which the package needs at {_places(places)}: "
                        "move it to [project] dependencies (the [dev] extra is for test tools only)")
    return problems


def requirements_problems(runtime: Mapping[str, str], requirements: Mapping[str, str]) -> list[str]:
    """``requirements.txt`` must pin (``==``) exactly the runtime dependencies of pyproject."""
    problems = [f"requirements.txt does not pin runtime dependency {name!r} ({runtime[name]!r} in pyproject.toml)"
                for name in sorted(set(runtime) - set(requirements))]
    problems += [f"requirements.txt entry {requirements[name]!r} is not a pyproject.toml runtime dependency"
                 for name in sorted(set(requirements) - set(runtime))]
    problems += [f"requirements.txt entry {spec!r} is not pinned with =="
                 for name, spec in sorted(requirements.items()) if name in runtime and "==" not in spec]
    return problems


def check_project(root: Path = ROOT) -> list[str]:
    """Every problem of the project at ``root`` (package ``qformer_lightning``, ``configs/``)."""
    uses = collect_uses(root / "qformer_lightning", root / "configs")
    runtime, extras = read_pyproject(root / "pyproject.toml")
    mapping = importlib.metadata.packages_distributions()
    return (
        undeclared(uses, runtime, mapping)
        + dev_extra_problems(uses, extras.get("dev", {}), mapping)
        + requirements_problems(runtime, read_requirements(root / "requirements.txt"))
    )


def _places(uses: Sequence[Use], shown: int = 3) -> str:
    """``a.py:3 (import), b.py:9 (lazy import) and 4 more``."""
    text = ", ".join(f"{use.where} ({use.how})" for use in uses[:shown])
    return text + (f" and {len(uses) - shown} more" if len(uses) > shown else "")


def main() -> None:
    """Print every problem; exit 1 if there is any."""
    problems = check_project()
    for problem in problems:
        print(problem)
    if problems:
        raise SystemExit(1)
    print("every runtime module is a declared dependency; requirements.txt pins them; [dev] holds test tools only")


if __name__ == "__main__":
    main()
