"""Progress bars that read right for step-bounded runs.

Lightning's bars print ``Epoch 4/-2`` when a run is bounded by ``max_steps`` only (``max_epochs``
is then -1, "no limit"). :class:`StepBoundedRichProgressBar` and :class:`StepBoundedTQDMProgressBar`
show ``Epoch 4 (to step 300)`` instead; :func:`step_bounded_progress_bar` picks the one matching
the bar Lightning chose (Rich when ``rich`` is installed).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def train_description(trainer: pl.Trainer) -> str:
    """``Epoch E/N`` when epochs bound the run, else ``Epoch E (to step max_steps)`` (or ``Epoch E``)."""
    epoch = trainer.current_epoch
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        return f"Epoch {epoch}/{trainer.max_epochs - 1}"
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return f"Epoch {epoch} (to step {trainer.max_steps})"
    return f"Epoch {epoch}"


class StepBoundedRichProgressBar(RichProgressBar):
    """Lightning's Rich bar with :func:`train_description`."""

    def _get_train_description(self, current_epoch: int) -> str:
        return train_description(self.trainer)


class StepBoundedTQDMProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with :func:`train_description`."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: object) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(train_description(trainer))


def step_bounded_progress_bar(trainer: pl.Trainer) -> ProgressBar | None:
    """Replace Lightning's default progress bar (exactly its class, i.e. not configured by the user)
    with the step-bounded one of the same kind, keeping its settings. Returns the new bar or None."""
    bar = trainer.progress_bar_callback
    if type(bar) is RichProgressBar:
        new: ProgressBar = StepBoundedRichProgressBar(
            refresh_rate=bar.refresh_rate, leave=bar._leave, theme=bar.theme, console_kwargs=bar._console_kwargs
        )
    elif type(bar) is TQDMProgressBar:
        new = StepBoundedTQDMProgressBar(refresh_rate=bar.refresh_rate, leave=bar._leave)
    else:
        return None
    trainer.callbacks[trainer.callbacks.index(bar)] = new
    return new
