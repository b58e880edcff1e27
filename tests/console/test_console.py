"""What a person sees: details go to the log file, the console keeps its own lines; progress bars
read right for step-bounded runs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from qformer_lightning.callbacks.progress import (
    StepBoundedRichProgressBar,
    StepBoundedTQDMProgressBar,
    step_bounded_progress_bar,
    train_description,
)
from qformer_lightning.console import details_to_file, remove_unused_log_dirs


def test_details_go_to_the_file_not_the_console(tmp_path: Path, capsys) -> None:
    log_file = tmp_path / "run.log"
    with details_to_file(log_file):
        logging.getLogger("lightning.pytorch").info("GPU available: False")
        logging.getLogger("qformer_lightning.convert.report").warning("275 tensors keep their initial values")
        warnings.warn("Found 51 module(s) in eval mode", UserWarning)
        logging.getLogger("qformer_lightning.callbacks.grounding").warning("soft prompt ignores the image")
        print("step line")
    captured = capsys.readouterr()
    text = log_file.read_text()
    for detail in ("GPU available", "275 tensors", "eval mode", "soft prompt ignores"):
        assert detail in text
    assert "GPU available" not in captured.out + captured.err
    assert "275 tensors" not in captured.out + captured.err
    assert "eval mode" not in captured.out + captured.err
    assert "soft prompt ignores the image" in captured.err  # a collapse warning is for the person watching
    assert captured.out == "step line\n"


def test_details_to_file_appends_and_restores(tmp_path: Path) -> None:
    log_file = tmp_path / "run.log"
    lightning_logger = logging.getLogger("lightning.pytorch")
    before = (lightning_logger.handlers[:], lightning_logger.propagate)
    with details_to_file(log_file):
        logging.getLogger("qformer_lightning").info("first step")
    with details_to_file(log_file, append=True):
        logging.getLogger("qformer_lightning").info("second step")
    text = log_file.read_text()
    assert "first step" in text and "second step" in text
    assert (lightning_logger.handlers, lightning_logger.propagate) == before


def test_unused_log_dir_is_removed_only_before_the_first_step(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="stage2")
    Path(logger.log_dir).mkdir(parents=True)
    assert remove_unused_log_dirs([logger], global_step=3) == []
    assert Path(logger.log_dir).is_dir()
    assert remove_unused_log_dirs([logger], global_step=0) == [Path(logger.log_dir)]
    assert not Path(logger.log_dir).exists()


def test_step_bounded_bars() -> None:
    trainer = pl.Trainer(max_steps=300, logger=False, enable_checkpointing=False, callbacks=[RichProgressBar()])
    assert train_description(trainer) == "Epoch 0 (to step 300)"
    assert isinstance(step_bounded_progress_bar(trainer), StepBoundedRichProgressBar)
    assert isinstance(trainer.progress_bar_callback, StepBoundedRichProgressBar)
    trainer = pl.Trainer(max_steps=300, logger=False, enable_checkpointing=False, callbacks=[TQDMProgressBar()])
    assert isinstance(step_bounded_progress_bar(trainer), StepBoundedTQDMProgressBar)
    trainer = pl.Trainer(max_epochs=5, logger=False, enable_checkpointing=False)
    assert train_description(trainer) == "Epoch 0/4"
    custom = StepBoundedTQDMProgressBar(refresh_rate=7)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, callbacks=[custom])
    assert step_bounded_progress_bar(trainer) is None and trainer.progress_bar_callback is custom


def test_cli_trainer_gets_the_step_bounded_bar() -> None:
    from qformer_lightning.cli import Blip2CLI

    root = Path(__file__).resolve().parents[2]
    cli = Blip2CLI(args=["--config", str(root / "configs/stage1_vitl.yaml"), "--config", str(root / "tests/configs/tiny_stage1.yaml"), "--trainer.max_steps=3"], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, (StepBoundedRichProgressBar, StepBoundedTQDMProgressBar))


def test_child_process_stderr_goes_to_the_log(tmp_path: Path, capfd) -> None:
    import subprocess
    import sys

    from qformer_lightning.console import subprocess_stderr_to_log

    log_file = tmp_path / "run.log"
    with details_to_file(log_file):
        with subprocess_stderr_to_log(logging.getLogger("qformer_lightning.metrics")):
            subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('PTBTokenizer tokenized 305 tokens')"], check=True)
    assert "PTBTokenizer tokenized 305 tokens" in log_file.read_text()
    assert "PTBTokenizer" not in capfd.readouterr().err

