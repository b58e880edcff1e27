"""Reading a shard keeps no per-member state: memory does not grow with the samples per shard."""

import tracemalloc
from pathlib import Path

import pytest

from qformer_lightning.data.shards import iter_tar_samples, write_shard


def _tar(path: Path, samples: int) -> None:
    write_shard(path, ((f"{i:09d}", dict.fromkeys(("jpg", "txt", "json"), b"x")) for i in range(samples)))


@pytest.mark.parametrize("seekable", [True, False])
def test_reading_a_shard_keeps_no_member_list(tmp_path: Path, seekable: bool) -> None:
    path = tmp_path / "big.tar"
    _tar(path, 3000)  # 9000 members: ~3.9 MB of TarInfo if tarfile kept them all
    tracemalloc.start()
    with open(path, "rb") as f:
        samples = iter_tar_samples(f, start=1000, seekable=seekable)
        assert next(samples)[0] == 1000
        count = 1 + sum(1 for _ in samples)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 2000
    assert peak < 2**20, f"{peak / 2**20:.1f} MiB"
