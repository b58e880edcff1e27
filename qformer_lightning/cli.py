"""Command-line entry: ``python -m qformer_lightning {fit,validate,test,predict} --config FILE.yaml``.

The model (a :class:`~qformer_lightning.tasks.base.Blip2Task` subclass) and the data module are
chosen in YAML by ``class_path``; configs compose left to right
(``--config configs/stage2_flant5xxl.yaml --config configs/strategy/fsdp.yaml``).
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from qformer_lightning.tasks.base import Blip2Task


class Blip2CLI(LightningCLI):
    """LightningCLI with qformer_lightning's tasks and data modules in subclass mode."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=Blip2Task,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``args=None`` reads the command line)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Blip2CLI(args=args)


if __name__ == "__main__":
    main()
