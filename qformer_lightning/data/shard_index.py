"""A per-run index of shard sample counts, so that start-up reads each stats file once.

Reading 13,000 ``_stats.json`` files is 13,000 requests on remote storage. The first start-up
reads them concurrently (a thread pool) and writes their counts to an index
file (JSON, ``{"version": 1, "shards": {url: {"num_samples": n, ...}}}``); later start-ups take
every shard found in the index from it and read only the others, so a second start-up over fsspec
makes no stats request at all (a remote glob still lists its directory once).

A local shard's entry also records its stats file's size and modification time, and is read again
when they changed. A remote entry is trusted: after rewriting remote shards in place under the same
names, delete the index (or point ``shard_index`` elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from qformer_lightning.data.shards import Shard, _is_remote, _local_path, expand_urls, read_shard_stats, stats_url

log = logging.getLogger(__name__)

INDEX_VERSION = 1


def _local_signature(url: str) -> list[int] | None:
    """(size, mtime_ns) of a local shard's stats file; ``None`` for remote and ``pipe:`` shards or a missing file."""
    if url.startswith("pipe:") or _is_remote(url):
        return None
    try:
        st = os.stat(_local_path(stats_url(url)))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def load_index(path: str) -> dict[str, dict]:
    """The index's entries (``{}`` when the file does not exist); a corrupt index is ignored with a warning."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("shard index %s is unreadable (%s); the stats files are read instead", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION or not isinstance(data.get("shards"), dict):
        log.warning("shard index %s has another format (version %r); the stats files are read instead", path,
                    data.get("version") if isinstance(data, dict) else None)
        return {}
    return data["shards"]


def write_index(path: str, entries: dict[str, dict]) -> None:
    """Write the index atomically (a temporary file renamed over it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shard_index.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": INDEX_VERSION, "shards": entries}, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cached(entry: dict | None, url: str) -> Shard | None:
    """The shard from its index entry, if the entry is valid and (for local files) still current."""
    if not isinstance(entry, dict) or not isinstance(entry.get("num_samples"), int) or entry["num_samples"] < 0:
        return None
    signature = _local_signature(url)
    if signature is not None and entry.get("stats") != signature:
        return None
    return Shard(url, entry["num_samples"])


def read_shards_indexed(
    urls: str | Sequence[str], index: str | None, write: bool = True, threads: int = 16
) -> list[Shard]:
    """Expand ``urls`` and get every shard's sample count, from ``index`` where it holds it.

    Stats files not in the index (or changed, for local files) are read concurrently with
    ``threads`` threads; with ``write`` the index is then updated with them (entries of other
    shards are kept, so one index serves several sources). ``index=None`` reads every stats file.
    """
    expanded = expand_urls(urls)
    entries = load_index(index) if index else {}
    shards: list[Shard | None] = [_cached(entries.get(url), url) for url in expanded]
    missing = [i for i, shard in enumerate(shards) if shard is None]
    if missing:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(missing)))) as pool:
            for i, shard in zip(missing, pool.map(read_shard_stats, [expanded[i] for i in missing])):
                shards[i] = shard
        if index and write:
            for i in missing:
                entries[expanded[i]] = {"num_samples": shards[i].num_samples, "stats": _local_signature(expanded[i])}
            write_index(index, entries)
    if index:
        log.info("shard index %s: %d of %d shard counts cached, %d stats files read", index,
                 len(expanded) - len(missing), len(expanded), len(missing))
    return shards  # type: ignore[return-value]
