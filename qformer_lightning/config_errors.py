"""One clear line for a config mistake, instead of jsonargparse's nested report.

A typo or a bad value in the YAML or on the command line ends the CLI with one last line that names
the option path and, for a typo, the closest option::

    config error: model.init_args.optim.warmup_stpes is not an option (did you mean warmup_steps?)
    config error: model.init_args.optim.lr: need lr > 0, got -0.001

Two kinds of failure are read:

- parse errors (:func:`parse_error_line`): jsonargparse (4.53) raises one exception per nesting level,
  each chained to the next (``__cause__``); their first lines say ``Parser key "optim"`` or ``Problem
  with given class_path 'qformer_lightning.tasks.stage1.Stage1'``, and the innermost says what is
  wrong (``Option 'warmup_stpes' is not accepted``, ``unrecognized arguments: --trainer.max_stpes=3``,
  ``Expected a <class 'float'>``).
- errors raised by a class while it is built (:func:`instantiation_error_line`): jsonargparse wraps
  them in Union messages that name no option, so the path is read from its
  ``ActionTypeHint.instantiate_classes`` frames (their ``dest``) in the tracebacks, and the class's
  own message is used. A message that starts with one of the class's fields (``lr: need lr > 0``)
  extends the path to that field.

The full report stays available: ``QFORMER_LIGHTNING_DEBUG=1`` prints it above the line, and it is
logged at DEBUG level.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import jsonargparse
from jsonargparse import ArgumentParser, Namespace

DEBUG_ENV = "QFORMER_LIGHTNING_DEBUG"
"""Set to 1 to print jsonargparse's full report (or the traceback) above the one-line message."""

HINT = f"hint: {DEBUG_ENV}=1 prints the full report; --help lists the options"

REFUSED_OPTIONS = {
    "optimizer": "the optimiser (AdamW, lr, betas, weight_decay) is set in model.init_args.optim",
    "lr_scheduler": "the schedule (warmup_steps, warmup_lr, min_lr, total_steps) is set in model.init_args.optim",
}
"""LightningCLI options this CLI does not offer: a task's ``optim`` owns its optimiser and schedule."""

_UNKNOWN_OPTION = (
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
    re.compile(r"Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"unrecognized arguments: --(?P<key>[^\s=]+)"),
)
_PARSER_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
_CLASS_PATH = re.compile(r"Problem with given class_path '(?P<class_path>[^']+)'")
_JSONARGPARSE_DIR = str(Path(jsonargparse.__file__).parent) + os.sep


class ConfigError(SystemExit):
    """A mistake in the config. ``str(err)`` is the one line shown; the exit status is 2, as argparse's."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def debug_enabled() -> bool:
    """Whether ``QFORMER_LIGHTNING_DEBUG`` asks for the full report."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def one_line(message: str) -> str:
    """``message`` with its lines joined and runs of spaces collapsed."""
    return " ".join(message.split())


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), or ``None`` when none is close."""
    matches = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def import_class(class_path: str) -> type | None:
    """The class named by a dotted ``class_path``, or ``None`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def class_option_keys(class_path: str) -> list[str]:
    """The option keys jsonargparse accepts in the ``init_args`` of ``class_path`` (dotted for groups)."""
    cls = import_class(class_path)
    if cls is None:
        return []
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False)
        return list(parser.get_defaults().keys())
    except Exception:  # a class jsonargparse cannot describe: no suggestion rather than a second error
        return []


def parser_option_keys(parser: ArgumentParser) -> list[str]:
    """The option keys of ``parser`` (``trainer.max_steps``, ``model``, ...)."""
    try:
        return list(parser.get_defaults().keys())
    except Exception:  # defaults that do not resolve: no suggestion rather than a second error
        return []


def locate_unknown(key: str, known: Iterable[str]) -> tuple[str, list[str]]:
    """Split an unknown dotted ``key`` at its first part that is not an option.

    Example: ``trainer.max_stpes`` among ``trainer.max_steps, ...`` gives ``("trainer.max_stpes",
    ["max_steps", ...])``: the key up to the wrong part, and the options accepted in its place.
    """
    known = list(known)
    parts = key.split(".")
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        below = [k[len(prefix) + 1:] if prefix else k for k in known if not prefix or k.startswith(prefix + ".")]
        names = {k.split(".")[0] for k in below}
        if parts[depth] not in names or depth == len(parts) - 1:
            return ".".join(parts[: depth + 1]), sorted(names)
    return key, []


def unknown_option_key(message: str) -> str | None:
    """The option (relative to its parser) that a jsonargparse message says is not accepted."""
    for pattern in _UNKNOWN_OPTION:
        match = pattern.search(message)
        if match:
            group = match.groupdict().get("group")
            return f"{group}.{match['key']}" if group else match["key"]
    return None


def unknown_option_line(path: list[str], key: str, known: Iterable[str]) -> str:
    """``<path>.<key> is not an option (did you mean X?)``, or the reason for a refused option."""
    wrong, names = locate_unknown(key, known)
    if not path and wrong in REFUSED_OPTIONS:
        return f"{wrong} is not an option of this CLI: {REFUSED_OPTIONS[wrong]}"
    full = ".".join([*path, wrong])
    guess = suggest(wrong.rsplit(".", 1)[-1], names)
    return f"{full} is not an option" + (f" (did you mean {guess}?)" if guess else "")


def option_nesting(chain: list[BaseException]) -> tuple[list[str], str | None]:
    """The option path that jsonargparse's chained messages walk down, and the innermost class_path.

    ``init_args`` follows each class (not a dataclass: its fields are written directly); a
    class_path that cannot be imported ends the path with ``class_path``.
    """
    path: list[str] = []
    class_path: str | None = None
    previous = None
    for exc in chain:
        text = str(exc)
        if text == previous:  # jsonargparse re-raises the same message as another type
            continue
        previous = text
        first = text.split("\n", 1)[0]
        if match := _PARSER_KEY.match(first):
            path.append(match["key"])
        elif match := _CLASS_PATH.match(first):
            class_path = match["class_path"]
            cls = import_class(class_path)
            if cls is None:
                return [*path, "class_path"], class_path
            if not dataclasses.is_dataclass(cls):
                path.append("init_args")
    return path, class_path


def parse_error_line(err: BaseException, root: ArgumentParser) -> str:
    """The one line for a parse error of jsonargparse, read from its chain of nested errors.

    Args:
        err: the ``ArgumentError`` jsonargparse raised (with ``exit_on_error=False``).
        root: the parser the unnested option keys belong to (the subcommand's, when there is one).
    """
    chain = exception_chain(err)
    path, class_path = option_nesting(chain)
    leaf = str(chain[-1])
    key = unknown_option_key(leaf.split("\n", 1)[0])
    if key is not None and path[-1:] != ["class_path"]:
        known = class_option_keys(class_path) if class_path else parser_option_keys(root)
        return unknown_option_line(path, key, known)
    detail = one_line(leaf)
    return f"{'.'.join(path)}: {detail}" if path else detail


def _frames(tb: TracebackType | None) -> Iterable[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def instantiation_keys(err: BaseException) -> list[tuple[str, int | None]]:
    """The option keys (with a list index, for list options) jsonargparse was building when ``err`` rose.

    Read from the frames of ``ActionTypeHint.instantiate_classes`` (``self.dest``, and ``num`` when
    the option is a list) and of jsonargparse's class-group instantiation (``group.dest``), outermost
    first, across the chain of exceptions.
    """
    keys: list[tuple[str, int | None]] = []
    for exc in exception_chain(err):
        for tb in _frames(exc.__traceback__):
            code, local = tb.tb_frame.f_code, tb.tb_frame.f_locals
            if not code.co_filename.startswith(_JSONARGPARSE_DIR):
                continue
            action = local.get("self")
            if code.co_name == "instantiate_classes" and isinstance(action, argparse.Action):
                keys.append((action.dest, local.get("num") if local.get("islist") else None))
            elif code.co_name == "group_instantiate_class" and hasattr(local.get("group"), "dest"):
                keys.append((local["group"].dest, None))
    return keys


def raised_by_user_code(err: BaseException) -> BaseException:
    """The outermost exception of the chain raised outside jsonargparse (a class's own error)."""
    for exc in exception_chain(err):
        last = None
        for tb in _frames(exc.__traceback__):
            last = tb
        if last is not None and not last.tb_frame.f_code.co_filename.startswith(_JSONARGPARSE_DIR):
            return exc
    return exception_chain(err)[-1]


def config_path(config: Namespace, keys: list[tuple[str, int | None]]) -> tuple[str, object]:
    """The option path of ``keys`` in ``config`` (``init_args`` after each class), and the node it names."""
    parts: list[str] = []
    node: object = config
    for dest, index in keys:
        node = node.get(dest) if isinstance(node, Namespace) else None
        parts.append(dest if index is None else f"{dest}[{index}]")
        if index is not None:
            node = node[index] if isinstance(node, list) and index < len(node) else None
        if isinstance(node, Namespace) and "class_path" in node:
            parts.append("init_args")
            node = node.get("init_args")
    return ".".join(parts), node


def instantiation_error_line(err: BaseException, config: Namespace) -> str | None:
    """The one line for a ``ValueError``/``OSError`` a class raised while jsonargparse built it.

    ``None`` when the option cannot be located or the error is of another kind (a bug, not a config
    mistake: its traceback stays).
    """
    keys = instantiation_keys(err)
    cause = raised_by_user_code(err)
    if not keys or not isinstance(cause, (ValueError, OSError)):
        return None
    path, node = config_path(config, keys)
    message = one_line(str(cause))
    match = re.match(r"(?P<field>\w+)(?P<sep>:\s*|\s)(?P<rest>.*)", message)
    if match and isinstance(node, Namespace) and match["field"] in node:
        return f"{path}.{match['field']}: " + (match["rest"] if match["sep"].startswith(":") else message)
    return f"{path.removesuffix('.init_args')}: {message}"


def config_error(line: str, detail: str) -> ConfigError:
    """Print the config error (after the full ``detail`` when debugging) and return the exit to raise."""
    sys.stderr.write(f"{detail.rstrip()}\n" if debug_enabled() else f"{HINT}\n")
    sys.stderr.write(f"config error: {line}\n")
    sys.stderr.flush()
    return ConfigError(f"config error: {line}")


def full_report(err: BaseException) -> str:
    """The traceback of ``err`` with its chain, as Python prints it."""
    return "".join(traceback.format_exception(err))
