"""tools/benchmark_data_scale.py: the hard-linked corpus streams back with its stats counts, and the
process-tree monitor sees a child's memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import benchmark_data_scale as bds  # noqa: E402

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource  # noqa: E402


def test_linked_shards_stream_back(tmp_path: Path) -> None:
    base = tmp_path / "base" / "base.tar"
    base.parent.mkdir()
    bds.write_base_shard(base, 30, pool=4, side=32)
    bds.link_shards(base, tmp_path / "shards", 3)
    assert (tmp_path / "shards" / "00002.tar").stat().st_ino == base.stat().st_ino  # a link, not a copy
    dm = ShardDataModule(sources=[ShardSource(str(tmp_path / "shards" / "{00000..00002}.tar"))], batch_size=10,
                         num_workers=0, image_size=16)
    keys = [k for batch in dm.train_dataloader() for k in batch["key"]]
    assert len(keys) == 90 and len(set(keys)) == 90 and dm.num_batches_per_epoch() == 9


def test_tree_monitor_sees_a_grandchild_allocating() -> None:
    """A grandchild holds 80 MiB (touched) until its stdin closes; the monitor must see it."""
    code = "import sys; block = bytearray(80 * 2**20); block[::4096] = b'x' * len(block[::4096]); sys.stdin.read()"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdin=subprocess.PIPE)
    with bds.TreeMonitor(proc.pid, interval=0.05) as monitor:
        deadline = time.monotonic() + 120  # a bound for a stuck machine, not a timing check
        while max(monitor.child_private_kib.values(), default=0) <= 80 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.stdin.close()
        proc.wait()
    assert max(monitor.child_private_kib.values(), default=0) > 80 * 1024
    assert monitor.tree_peak_kib > 80 * 1024 and monitor.tree_pss_peak_kib > 80 * 1024
