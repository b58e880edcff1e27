"""A tar holding more samples than its `_stats.json` says: the epoch reads the counted ones, and the
extra ones are counted and reported in one warning per shard (naming it, the stats count and the
tar count), instead of being skipped silently."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from test_bad_input import _dm, _good, _write_shard

from qformer_lightning.data.shards import iter_tar_samples

LOGGER = "qformer_lightning.data.shards"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("seekable", [True, False])
def test_reader_stops_at_the_stats_count_and_reports_the_rest_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, seekable: bool
) -> None:
    shard = tmp_path / f"0000{int(seekable)}.tar"
    _write_shard(shard, [_good(i) for i in range(20)], claimed=12)
    url = str(shard)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        read = [item[0] for item in iter_tar_samples(io.BytesIO(shard.read_bytes()), 5, seekable, expected=12, url=url)]
        assert read == list(range(5, 12))
        (message,) = _warnings(caplog)
        assert f"shard {url} holds 20 samples" in message and "says 12" in message and "the 8 samples" in message
        list(iter_tar_samples(io.BytesIO(shard.read_bytes()), 0, seekable, expected=12, url=url))
        assert len(_warnings(caplog)) == 1  # once per shard
        assert len(list(iter_tar_samples(io.BytesIO(shard.read_bytes()), 0, seekable))) == 20  # no count given
        assert len(list(iter_tar_samples(io.BytesIO(shard.read_bytes()), 0, seekable, expected=20, url="x"))) == 20
        assert len(list(iter_tar_samples(io.BytesIO(shard.read_bytes()), 0, seekable, expected=25, url="y"))) == 20
    assert len(_warnings(caplog)) == 1  # an exact or an over-count (a short tar, replaced as truncated) is not this


def test_an_epoch_over_an_undercounted_shard_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_shard(tmp_path / "00000.tar", [_good(i) for i in range(20)])
    _write_shard(tmp_path / "00001.tar", [_good(100 + i) for i in range(20)], claimed=12)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dm = _dm(str(tmp_path / "{00000..00001}.tar"), batch_size=4)
        for loader in (dm.train_dataloader(), dm.train_dataloader(), dm.val_dataloader()):
            batches = list(loader)
            assert len(batches) == 8 and all(b["num_replaced"] == 0 for b in batches)
            keys = {k.split("#")[1] for b in batches for k in b["key"]}
            assert keys == {f"{i:04d}" for i in range(20)} | {f"{100 + i:04d}" for i in range(12)}
    (message,) = _warnings(caplog)
    assert f"shard {tmp_path}/00001.tar holds 20 samples" in message
    assert f"stats file {tmp_path}/00001_stats.json says 12" in message
