"""Command-line entry: ``python -m qformer_lightning {fit,validate,test,predict} --config FILE.yaml``.

The model (a :class:`~qformer_lightning.tasks.base.Blip2Task` subclass) and the data module are
chosen in YAML by ``class_path``; configs compose left to right
(``--config configs/stage2_flant5xxl.yaml --config configs/strategy/fsdp.yaml``).

Fault tolerance by default (docs/fault_tolerance.md): checkpoints are written atomically
(:class:`~qformer_lightning.scale.checkpointing.AtomicCheckpointIO`), SIGTERM saves ``last.ckpt``
at the next batch boundary and exits cleanly (the ``preemption:`` section,
:class:`~qformer_lightning.scale.signals.PreemptionCheckpoint`), and every checkpoint carries
the resolved config of the run (``checkpoint["qformer_lightning"]["config"]``).

A config mistake (a typo in a key, a bad value, a value a class refuses) ends in one line,
``config error: <option path> ...`` with exit status 2 (:mod:`qformer_lightning.config_errors`);
``QFORMER_LIGHTNING_DEBUG=1`` prints the full report above it. The task's ``optim`` owns the
optimiser and schedule: LightningCLI's ``--optimizer``/``--lr_scheduler`` are not offered.
"""

from __future__ import annotations

import logging
import os
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qformer_lightning.config_errors import config_error, full_report, instantiation_error_line, parse_error_line
from qformer_lightning.callbacks.progress import step_bounded_progress_bar
from qformer_lightning.errors import check_checkpoint_task
from qformer_lightning.scale.checkpointing import AtomicCheckpointIO
from qformer_lightning.scale.signals import PreemptionCheckpoint
from qformer_lightning.tasks.base import Blip2Task

log = logging.getLogger(__name__)

PROG = "python -m qformer_lightning"
"""The program name in ``--help`` and usage lines (not ``__main__.py``)."""
SCRIPT = "qformer-lightning"
"""The console script pyproject.toml installs; its own name is kept when it is the one run."""


def program_name() -> str:
    """``qformer-lightning`` when run as the console script, else ``python -m qformer_lightning``."""
    return SCRIPT if Path(sys.argv[0]).name == SCRIPT else PROG


NULL_WORDS = ("null", "None", "~")
"""What YAML (and so jsonargparse) reads as ``None`` on the command line."""


def null_overrides(args: list[str]) -> list[str]:
    """The option keys set to null on the command line (``--key=null`` or ``--key null``)."""
    keys = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        if value in NULL_WORDS:
            keys.append(key)
    return keys


def restore_nulls(config: Namespace, keys: list[str], prefix: str = "") -> list[str]:
    """Set back to ``None`` the ``keys`` that the parser turned into the string ``"None"``.

    jsonargparse (4.53) reads ``--model.init_args.model.init_args.llm.init_args.gguf_file=null`` (an
    option of a class nested inside another class's ``init_args``) as the string ``"None"``, where
    one level up (``--model.init_args.pretrained=null``) gives ``None``. A null the user asked for is
    never meant as that string.

    Returns:
        the keys that were set back.
    """
    fixed = []
    for key in keys:
        path = f"{prefix}{key}"
        try:
            value = config[path]
        except KeyError:
            continue
        if value == "None":
            config[path] = None
            fixed.append(path)
    return fixed


def use_atomic_checkpoint_io(trainer: Trainer) -> bool:
    """Make the trainer write checkpoints atomically unless a custom ``CheckpointIO`` was configured.

    Returns:
        whether the plain ``TorchCheckpointIO`` was replaced.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True


class Blip2CLI(LightningCLI):
    """LightningCLI with qformer_lightning's tasks and data modules in subclass mode.

    Without ``--optimizer``/``--lr_scheduler`` (``auto_configure_optimizers=False``): each task's
    ``optim`` (``model.init_args.optim``) configures its optimiser and schedule, and LightningCLI's
    options would silently replace them. Config mistakes raise :class:`~qformer_lightning.config_errors.ConfigError`
    (a ``SystemExit`` with status 2) after printing one ``config error: ...`` line.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        self._args = args
        super().__init__(
            model_class=Blip2Task,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        """LightningCLI's parser named ``python -m qformer_lightning``, raising its errors (read by
        :meth:`parse_arguments`) instead of printing usage and the nested report."""
        kwargs.setdefault("prog", program_name())
        kwargs["exit_on_error"] = False
        return super().init_parser(**kwargs)

    def _error_parser(self, args: ArgsType) -> LightningArgumentParser:
        """The parser whose options a parse error's unnested keys belong to: the subcommand's, if any."""
        words = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        parsers = getattr(self, "_subcommand_parsers", {})
        return next((parsers[w] for w in words if isinstance(w, str) and w in parsers), self.parser)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``preemption:``: the always-present SIGTERM checkpoint callback (``signals: []`` disables it)."""
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's parsing, then the nulls of the command line put back (:func:`restore_nulls`).

        Raises:
            ConfigError: one ``config error: <option path> ...`` line for a typo or a bad value.
        """
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            log.debug("config parse error:\n%s", err)
            raise config_error(parse_error_line(err, self._error_parser(args)), str(err)) from None
        if isinstance(args, dict) or (args is not None and not isinstance(args, list)):
            return
        words = list(sys.argv[1:] if args is None else args)
        subcommand = self.config.get("subcommand")
        for path in restore_nulls(self.config, null_overrides(words), f"{subcommand}." if subcommand else ""):
            log.debug("%s: null from the command line restored (the parser had made it the string 'None')", path)

    def _parse_ckpt_path(self) -> None:
        """Refuse a checkpoint of another task before LightningCLI merges its hyperparameters into the
        config (that merge would otherwise fail first, with a message about missing arguments)."""
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            check_checkpoint_task(self.config[subcommand].ckpt_path, self.config[subcommand].model.class_path)
        try:
            super()._parse_ckpt_path()
        except ArgumentError as err:
            line = parse_error_line(err, self._error_parser(self._args))
            raise config_error(f"the hyperparameters in ckpt_path do not fit this config: {line}", str(err)) from None

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; then atomic checkpoint writes and the config for checkpoints.

        Raises:
            ConfigError: one ``config error: <option path>: <message>`` line when a class refuses its
                settings (a ``ValueError``/``OSError`` from its constructor); other errors keep their traceback.
        """
        try:
            super().instantiate_classes()
        except Exception as err:
            config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
            line = instantiation_error_line(err, config)
            if line is None:
                raise
            log.debug("config instantiation error:\n%s", full_report(err))
            raise config_error(line, full_report(err)) from None
        use_atomic_checkpoint_io(self.trainer)
        step_bounded_progress_bar(self.trainer)  # 'Epoch 4 (to step 300)', not Lightning's 'Epoch 4/-2'
        if isinstance(self.model, Blip2Task):
            self.model.run_config = self.resolved_config()

    def resolved_config(self) -> str:
        """The run's full resolved config as YAML (what ``--print_config`` shows)."""
        parser = self._parser(self.subcommand)
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        return parser.dump(config, skip_none=False)


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``args=None`` reads the command line)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Blip2CLI(args=args)


if __name__ == "__main__":
    main()
