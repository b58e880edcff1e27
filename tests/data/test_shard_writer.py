"""write_shard: the one shard writer of tools and tests writes what the reader reads back."""

import json
from pathlib import Path

from qformer_lightning.data.shards import iter_tar_samples, read_shard_stats, write_shard


def test_a_written_shard_reads_back_with_its_stats(tmp_path: Path) -> None:
    samples = [(f"{i:04d}", {"jpg": bytes([i]), "txt": f"caption {i}".encode()}) for i in range(3)]
    path = tmp_path / "sub" / "00000.tar"
    stats = {"count": 4}
    assert write_shard(path, iter(samples), stats) == 3
    assert json.loads((tmp_path / "sub" / "00000_stats.json").read_text()) == {"successes": 3, "count": 4}
    assert read_shard_stats(str(path)).num_samples == 3
    with open(path, "rb") as f:
        assert [(key, members) for _, key, members in iter_tar_samples(f)] == samples
    write_shard(path, samples, {"successes": 5})  # a stats file may claim another count (bad-input tests)
    assert read_shard_stats(str(path)).num_samples == 5
