"""Command lines and subprocess helpers for the tiny stage-1 runs of the scale tests."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qformer_lightning.cli import Blip2CLI

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LOSS_COLUMNS = ("train/loss", "train/itc", "train/itm", "train/itg", "train/lr")


def stage1_args(corpus: Path, run: Path, max_steps: int, every: int = 4, extra: list[str] | None = None) -> list[str]:
    """``fit`` on configs/demo/stage1.yaml shrunk: 32 px images, batch 8, 2 workers, a step
    checkpoint every ``every`` steps (+ last.ckpt), per-step losses in ``{run}/log/version_*/metrics.csv``."""
    return [
        "fit", "--config", "configs/demo/stage1.yaml",
        f"--data.init_args.sources=[{{urls: {corpus}/shards/train/*.tar, name: synthetic}}]",
        f"--data.init_args.val_sources=[{{urls: {corpus}/shards/val/*.tar, name: synthetic_val}}]",
        "--data.init_args.synthetic=null", "--data.init_args.batch_size=8", "--data.init_args.num_workers=2",
        "--data.init_args.image_size=32", "--data.init_args.shuffle_block=16",
        "--model.init_args.model.init_args.vision.init_args.image_size=32",
        "--model.init_args.model.init_args.vision.init_args.checkpoint_path=null",  # a random frozen ViT
        f"--trainer.max_steps={max_steps}", "--trainer.val_check_interval=5", f"--trainer.default_root_dir={run}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run}",
        "--trainer.logger.name=log", "--trainer.logger.flush_logs_every_n_steps=1", "--trainer.log_every_n_steps=1",
        f"--trainer.callbacks.dirpath={run}/ckpt", f"--trainer.callbacks.every_n_train_steps={every}",
        "--trainer.enable_progress_bar=false",
        *(extra or []),
    ]


def stage1_cli(corpus: Path, run: Path, vit: Path | None = None, seed: int = 0, max_steps: int = 2,
               extra: list[str] | None = None) -> "Blip2CLI":
    """The same shrunk demo stage 1, built in this process (``run=False``; no logger, 0 workers);
    ``vit``: a local timm checkpoint as the frozen ViT's weight source."""
    from qformer_lightning.cli import Blip2CLI

    vision = "--model.init_args.model.init_args.vision.init_args"
    args = [
        "--config", str(ROOT / "configs/demo/stage1.yaml"), f"--seed_everything={seed}",
        f"--data.init_args.sources=[{{urls: {corpus}/shards/train/*.tar, name: synthetic}}]",
        "--data.init_args.val_sources=null", "--data.init_args.synthetic=null", "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0", "--data.init_args.image_size=32", "--data.init_args.shuffle_block=16",
        f"{vision}.image_size=32", f"{vision}.checkpoint_path={vit if vit else 'null'}",
        f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={run}", "--trainer.logger=false",
        f"--trainer.callbacks.dirpath={run}/ckpt", "--trainer.enable_progress_bar=false", *(extra or []),
    ]
    return Blip2CLI(args=args, run=False)


def callback_arg(class_path: str, **init_args) -> str:
    """``--trainer.callbacks+=`` one more callback."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def env(**extra: str) -> dict[str, str]:
    """The subprocess environment: one thread (fixed float order), offline hubs, tests/scale importable."""
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(HERE), out.get("PYTHONPATH", "")]))
    out.update(extra)
    return out


def start(args: list[str], log: Path, **env_extra: str) -> subprocess.Popen:
    """Start ``python -m qformer_lightning ARGS`` in its own process group, output to ``log``."""
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "qformer_lightning", *args], cwd=ROOT, env=env(**env_extra),
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def run(args: list[str], log: Path, timeout: float = 120, **env_extra: str) -> int:
    """Run to completion; the exit status (the log is in ``log``)."""
    proc = start(args, log, **env_extra)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll until ``path`` exists; fail with the run's log if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            raise AssertionError(f"{path} never appeared (exit {proc.poll()}); log:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def step_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step training values logged by every CSVLogger version under ``{run}/log`` (later versions win)."""
    rows: dict[int, dict[str, float]] = {}
    for metrics in sorted((run_dir / "log").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(metrics) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    rows[int(row["step"])] = {k: float(row[k]) for k in LOSS_COLUMNS}
    return rows


def val_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """Per-step validation values (``val/*``) logged under ``{run}/log``."""
    rows: dict[int, dict[str, float]] = {}
    for metrics in sorted((run_dir / "log").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(metrics) as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
                if values:
                    rows.setdefault(int(row["step"]), {}).update(values)
    return rows
