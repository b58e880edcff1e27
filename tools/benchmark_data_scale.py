"""Corpus-scale shard streaming: start-up time and memory against the number of shards.

    python tools/benchmark_data_scale.py [--shards 1000 5000 13000] [--samples-per-shard 10000]
        [--workers 2 8] [--batches 3] [--demo-fit 13000] [--root DIR]

Writes one real img2dataset-layout shard (``--samples-per-shard`` samples: small JPEGs drawn from a
pool of 64, a CapFilt-style ``.json`` caption list and a ``.txt``) with its ``_stats.json``, then
hard-links it ``max(--shards)`` times (``00000.tar`` ... with their stats files; no extra disk).
For each shard count and worker count a fresh child process builds the ``ShardDataModule`` of
``configs/stage1_vitg.yaml``'s data settings (batch 105, 224 px, interleave 4, shuffle_block 1000,
seed 42) over the first N shards and reads ``--batches`` training batches. Printed per run:

- setup: ``datamodule.setup("fit")`` (stats files) plus building the loader, seconds;
- first batch: from ``iter()`` to the first batch (workers start, plan, tar seek), seconds;
- main RSS: the main process's resident memory after setup and its peak (``VmHWM``);
- worker added: the peak, over workers, of each worker's private memory (``Private_Clean`` +
  ``Private_Dirty`` of ``/proc/PID/smaps_rollup``: what the worker adds to the pages it shares
  with the main process), sampled every 50 ms;
- tree peak: the peaks of the summed RSS (shared pages counted once per process) and of the
  summed PSS (shared pages split: the real footprint) of the main process and its workers,
  sampled every 50 ms.

``--demo-fit N`` also runs the demo stage-1 fit (``configs/demo/stage1.yaml``, 3 steps, 2 workers,
no validation, a randomly initialised ViT instead of the demo's pretrained one) on N shards and prints its wall time and process-tree peak RSS. Linux only (reads
``/proc``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_base_shard(path: Path, samples: int, pool: int = 64, side: int = 96) -> None:
    """``path`` (a ``.tar``) with ``samples`` samples and its ``_stats.json``."""
    from PIL import Image

    from qformer_lightning.data.shards import write_shard

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(pool):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out, format="JPEG", quality=85)
        jpegs.append(out.getvalue())

    def sample(i: int) -> tuple[str, dict[str, bytes]]:
        meta = json.dumps({"captions": [f"a photo number {i}", f"image {i} of a scene"]}).encode()
        return f"{i:09d}", {"jpg": jpegs[i % pool], "txt": b"a photo", "json": meta}

    write_shard(path, (sample(i) for i in range(samples)))


def link_shards(base: Path, out: Path, count: int) -> None:
    """Hard links ``out/00000.tar`` ... (and their stats files) to ``base``."""
    out.mkdir(parents=True, exist_ok=True)
    stats = base.with_name(base.stem + "_stats.json")
    for i in range(count):
        for src, name in ((base, f"{i:05d}.tar"), (stats, f"{i:05d}_stats.json")):
            if not (out / name).exists():
                os.link(src, out / name)


def _proc_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from ``/proc/*/stat``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _kib(path: str, fields: tuple[str, ...]) -> int:
    """Sum of the ``fields`` (kB lines) of a ``/proc`` status-like file; 0 if it is gone."""
    total = 0
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in fields:
                    total += int(rest.split()[0])
    except (OSError, ValueError):
        return 0
    return total


class TreeMonitor:
    """Samples a process tree every ``interval`` s: the peaks of its summed RSS (pages shared by
    several processes counted in each) and summed PSS (shared pages split between the processes
    sharing them: the tree's real footprint), and each child's peak private memory."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.tree_peak_kib = 0
        self.tree_pss_peak_kib = 0
        self.child_private_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = pss = 0
            for p in _proc_tree(self.pid):
                total += _kib(f"/proc/{p}/status", ("VmRSS",))
                pss += _kib(f"/proc/{p}/smaps_rollup", ("Pss",))
                if p != self.pid:
                    private = _kib(f"/proc/{p}/smaps_rollup", ("Private_Clean", "Private_Dirty"))
                    self.child_private_kib[p] = max(self.child_private_kib.get(p, 0), private)
            self.tree_peak_kib = max(self.tree_peak_kib, total)
            self.tree_pss_peak_kib = max(self.tree_pss_peak_kib, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(urls: str, workers: int, batches: int) -> None:
    """One measured run in this process (``--child``): prints a JSON line."""
    import torch

    from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource

    torch.set_num_threads(1)
    start = time.perf_counter()
    dm = ShardDataModule(sources=[ShardSource(urls, name="scale")], batch_size=105, num_workers=workers, seed=42,
                         image_size=224, interleave=4, shuffle_block=1000, pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    setup = time.perf_counter() - start
    main_after_setup = _kib("/proc/self/status", ("VmRSS",))
    with TreeMonitor(os.getpid()) as monitor:
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - start
        for _ in range(batches - 1):
            next(it)
        time.sleep(0.2)  # one more sample of the workers before they are stopped
    del it
    print(json.dumps({
        "setup_s": setup, "first_batch_s": first, "main_after_setup_kib": main_after_setup,
        "main_peak_kib": _kib("/proc/self/status", ("VmHWM",)),
        "worker_added_kib": max(monitor.child_private_kib.values(), default=0),
        "tree_peak_kib": monitor.tree_peak_kib, "tree_pss_peak_kib": monitor.tree_pss_peak_kib,
        "samples": len(loader) * 105,
    }))


def measure(urls: str, workers: int, batches: int) -> dict:
    """Run :func:`child` in a fresh interpreter."""
    out = subprocess.run([sys.executable, __file__, "--child", urls, "--workers", str(workers), "--batches",
                          str(batches)], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo_fit(shard_dir: Path, count: int, run: Path) -> tuple[float, TreeMonitor]:
    """The demo stage-1 fit, 3 steps on ``count`` shards: (wall seconds, its process tree's monitor)."""
    args = [
        sys.executable, "-m", "qformer_lightning", "fit", "--config", str(ROOT / "configs/demo/stage1.yaml"),
        f"--data.init_args.sources=[{{urls: '{shard_dir}/{{00000..{count - 1:05d}}}.tar', name: scale}}]",
        "--data.init_args.val_sources=null", "--data.init_args.synthetic=null", "--data.init_args.num_workers=2",
        "--trainer.max_steps=3", "--trainer.logger=false", f"--trainer.default_root_dir={run}",
        f"--trainer.callbacks.dirpath={run}/ckpt", "--trainer.enable_progress_bar=false",
        "--model.init_args.model.init_args.vision.init_args.checkpoint_path=null",  # the ViT's weights do not matter here
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMonitor(proc.pid, interval=0.1) as monitor:
        output, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the demo fit failed ({proc.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - start, monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="*", default=[1000, 5000, 13000],
                        help="shard counts to measure (none: only --demo-fit)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--batches", type=int, default=3, help="batches read per run")
    parser.add_argument("--demo-fit", type=int, default=0, metavar="N", help="also run the demo fit on N shards")
    parser.add_argument("--root", type=Path, default=None, help="where the shards go (default: a temporary folder)")
    parser.add_argument("--child", metavar="URLS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workers[0], args.batches)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        base = root / "base" / "base.tar"
        if not base.exists():
            base.parent.mkdir(parents=True, exist_ok=True)
            write_base_shard(base, args.samples_per_shard)
        shard_dir = root / "shards"
        link_shards(base, shard_dir, max(args.shards + [args.demo_fit]))
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; shards of {args.samples_per_shard} samples "
              f"({base.stat().st_size / 2**20:.0f} MiB, hard-linked)")
        print(f"{'shards':>7} {'workers':>7} {'setup s':>8} {'1st batch s':>11} {'main RSS MiB':>14} "
              f"{'worker added MiB':>16} {'tree peak RSS / PSS MiB':>23}")
        for count in args.shards:
            urls = f"{shard_dir}/{{00000..{count - 1:05d}}}.tar"
            for workers in args.workers:
                r = measure(urls, workers, args.batches)
                print(f"{count:>7} {workers:>7} {r['setup_s']:>8.2f} {r['first_batch_s']:>11.2f} "
                      f"{r['main_after_setup_kib'] / 1024:>6.0f} ({r['main_peak_kib'] / 1024:>4.0f} pk) "
                      f"{r['worker_added_kib'] / 1024:>16.0f} {r['tree_peak_kib'] / 1024:>13.0f} / "
                      f"{r['tree_pss_peak_kib'] / 1024:.0f}", flush=True)
        if args.demo_fit:
            seconds, monitor = demo_fit(shard_dir, args.demo_fit, Path(tmp) / "demo_run")
            print(f"demo stage-1 fit, 3 steps, 2 workers, {args.demo_fit} shards: {seconds:.1f} s, "
                  f"process-tree peak RSS {monitor.tree_peak_kib / 1024:.0f} MiB, PSS "
                  f"{monitor.tree_pss_peak_kib / 1024:.0f} MiB, worker added "
                  f"{max(monitor.child_private_kib.values(), default=0) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
