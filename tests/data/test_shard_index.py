"""Start-up over remote storage: stats files are read concurrently, once; later start-ups take the
sample counts from the shard index (fsspec's memory filesystem counts the requests)."""

import json
import os
import threading
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from qformer_lightning.data import shard_index
from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.shard_index import read_shards_indexed

NUM_SHARDS = 40


@pytest.fixture
def remote(monkeypatch) -> tuple[str, Counter]:
    """``memory://bucket{N}/{00000..00039}.tar`` stats files (3 + i samples each) and a counter of opens by path."""
    fs = fsspec.filesystem("memory")
    bucket = f"/bucket{os.getpid()}_{id(fs)}"
    for i in range(NUM_SHARDS):
        fs.pipe(f"{bucket}/{i:05d}_stats.json", json.dumps({"successes": 3 + i}).encode())
    opens: Counter = Counter()
    original = MemoryFileSystem._open

    def counting_open(self, path, *args, **kwargs):
        opens[path] += 1
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "_open", counting_open)
    yield f"memory://{bucket}/{{00000..{NUM_SHARDS - 1:05d}}}.tar", opens
    fs.rm(bucket, recursive=True)


def test_second_start_up_makes_no_stats_request(remote, tmp_path: Path) -> None:
    urls, opens = remote
    index = str(tmp_path / "run" / "shard_index.json")
    first = read_shards_indexed(urls, index)
    assert sum(opens.values()) == NUM_SHARDS and set(opens.values()) == {1}
    assert [s.num_samples for s in first] == [3 + i for i in range(NUM_SHARDS)]
    opens.clear()
    second = read_shards_indexed(urls, index)
    assert sum(opens.values()) == 0 and second == first


def test_only_shards_missing_from_the_index_are_read(remote, tmp_path: Path) -> None:
    urls, opens = remote
    index = str(tmp_path / "shard_index.json")
    few = urls.replace(f"{NUM_SHARDS - 1:05d}}}", "00009}")
    read_shards_indexed(few, index)
    opens.clear()
    shards = read_shards_indexed(urls, index)
    assert sum(opens.values()) == NUM_SHARDS - 10 and len(shards) == NUM_SHARDS
    assert len(json.loads(Path(index).read_text())["shards"]) == NUM_SHARDS


def test_stats_files_are_read_concurrently(remote, monkeypatch) -> None:
    """Four reads must be in flight together to pass the barrier (a sequential reader breaks it)."""
    urls, _ = remote
    barrier = threading.Barrier(4, timeout=60)
    read = shard_index.read_shard_stats

    def meeting_read(url: str):
        if int(url.rsplit("/", 1)[1][:5]) < 4:
            barrier.wait()
        return read(url)

    monkeypatch.setattr(shard_index, "read_shard_stats", meeting_read)
    assert len(read_shards_indexed(urls, None, threads=8)) == NUM_SHARDS


def test_data_module_writes_the_index_beside_the_checkpoints(remote, tmp_path: Path) -> None:
    import lightning.pytorch as pl

    urls, opens = remote
    for _ in range(2):
        dm = ShardDataModule(sources=[ShardSource(urls, name="remote")], batch_size=4, num_workers=0)
        dm.trainer = pl.Trainer(default_root_dir=tmp_path / "run", logger=False, accelerator="cpu", devices=1)
        dm.setup("fit")
        assert dm.num_batches_per_epoch(1) == sum(3 + i for i in range(NUM_SHARDS)) // 4
    assert sum(opens.values()) == NUM_SHARDS  # all of them by the first start-up, none by the second
    assert dm.shard_index_path() == str(tmp_path / "run" / "shard_index.json")
    assert ShardDataModule(sources=[ShardSource(urls)], shard_index=False).shard_index_path() is None


def test_a_changed_local_stats_file_is_read_again(corpus, tmp_path: Path) -> None:
    index = str(tmp_path / "shard_index.json")
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (shard_dir / name).write_bytes(b"")
        (shard_dir / name.replace(".tar", "_stats.json")).write_text(json.dumps({"successes": 20}))
    urls = str(shard_dir / "*.tar")
    assert [s.num_samples for s in read_shards_indexed(urls, index)] == [20, 20]
    (shard_dir / "00001_stats.json").write_text(json.dumps({"successes": 7}))
    assert [s.num_samples for s in read_shards_indexed(urls, index)] == [20, 7]


def test_a_corrupt_index_is_ignored_with_a_warning(remote, tmp_path: Path, caplog) -> None:
    urls, opens = remote
    index = tmp_path / "shard_index.json"
    index.write_text("{not json")
    assert len(read_shards_indexed(urls, str(index))) == NUM_SHARDS
    assert "unreadable" in caplog.text and sum(opens.values()) == NUM_SHARDS
    assert json.loads(index.read_text())["version"] == 1  # rewritten
