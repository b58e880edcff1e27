"""A tar holding more samples than its `_stats.json` says: the epoch reads the counted ones, and the
extra ones are counted and reported in one warning per shard (naming it, the stats count and the
tar count), instead of being skipped silently."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from test_bad_input import _good, _write_shard

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
