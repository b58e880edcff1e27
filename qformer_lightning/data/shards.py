"""Shard locations, sample counts, tar reading and writing for img2dataset-layout webdataset shards.

Layout (img2dataset): ``00000.tar`` holds ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` per sample and
sits beside ``00000_stats.json``, whose ``successes`` field is the number of samples in the tar.
Epoch lengths come from these stats files, never from scanning tars.

URLs may be local paths, globs (``/data/cc3m/*.tar``), brace ranges (``{00000..01023}.tar``),
fsspec URLs (``s3://``, ``gs://``, ``https://``; the matching fsspec backend must be installed)
or ``pipe:COMMAND`` (the command writes the tar to stdout, e.g. ``pipe:aws s3 cp s3://b/0.tar -``).
The stats file of a shard is found by replacing the last ``.tar`` in its URL (or command) by
``_stats.json``.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import braceexpand
import fsspec

log = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")
_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path up to the basename's first dot


@dataclass(frozen=True)
class Shard:
    """One tar shard and its sample count (from its ``_stats.json``)."""

    url: str
    num_samples: int


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand brace ranges and globs into a list of shard URLs (globs sorted).

    Raises:
        FileNotFoundError: a local shard or its directory does not exist, or a glob matches nothing.
        PermissionError: a local shard directory cannot be read.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise ValueError("no shard URLs given")
    out: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if url.startswith("pipe:"):
                out.append(url)
            elif _is_remote(url):
                if _GLOB_CHARS.search(url):
                    fs, _, _ = fsspec.get_fs_token_paths(url)
                    protocol = url.split("://", 1)[0]
                    found = sorted(fs.glob(url))
                    if not found:
                        raise FileNotFoundError(f"shard glob {url!r} matches no file")
                    out.extend(p if "://" in p else f"{protocol}://{p}" for p in found)
                else:
                    out.append(url)
            else:
                path = _local_path(url)
                _check_local_dir(path, pattern)
                if _GLOB_CHARS.search(path):
                    found = sorted(glob.glob(path))
                    if not found:
                        raise FileNotFoundError(f"shard glob {path!r} (from {pattern!r}) matches no file")
                    out.extend(found)
                else:
                    if not os.path.isfile(path):
                        missing.append(path)
                    out.append(path)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} shard(s) from {pattern!r} do not exist: {shown}")
    return out


def _check_local_dir(path: str, pattern: str) -> None:
    """Name the first missing or unreadable directory above ``path`` (glob parts excluded)."""
    directory = os.path.dirname(path) or "."
    while _GLOB_CHARS.search(directory):
        directory = os.path.dirname(directory) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"shard directory {directory!r} (from {pattern!r}) does not exist")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise PermissionError(f"shard directory {directory!r} (from {pattern!r}) is not readable")


def stats_url(url: str) -> str:
    """The ``_stats.json`` URL of a shard URL (last ``.tar`` replaced)."""
    index = url.rfind(".tar")
    if index < 0:
        raise ValueError(f"shard URL {url!r} has no '.tar'; cannot locate its _stats.json")
    return url[:index] + "_stats.json" + url[index + len(".tar") :]


def read_shard_stats(url: str) -> Shard:
    """Read a shard's sample count from its ``_stats.json`` (field ``successes``)."""
    path = stats_url(url)
    try:
        with open_url(path) as f:
            raw = f.read()
        if isinstance(f, _PipeReader) and f.returncode:
            raise OSError(f"command exited with status {f.returncode}")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot read the stats file {path!r} of shard {url!r}: {err}") from err
    try:
        stats = json.loads(raw)
        count = int(stats["successes"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"stats file {path!r} has no integer 'successes' field: {err}") from err
    if count < 0:
        raise ValueError(f"stats file {path!r} has a negative sample count {count}")
    return Shard(url, count)


def read_shards(urls: str | Sequence[str], threads: int = 16) -> list[Shard]:
    """Expand ``urls`` and read every shard's sample count (stats files read in parallel)."""
    expanded = expand_urls(urls)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(expanded)))) as pool:
        return list(pool.map(read_shard_stats, expanded))


class _PipeReader:
    """Binary stdout of a ``pipe:`` command; ``returncode`` is set on close."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        self.returncode: int | None = None

    def read(self, size: int = -1) -> bytes:
        return self._proc.stdout.read(size)

    def close(self) -> None:
        if self.returncode is None:
            self._proc.stdout.close()
            self.returncode = self._proc.wait()
            if self.returncode:
                log.warning("command %r exited with status %d", self.command, self.returncode)

    def __enter__(self) -> _PipeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_url(url: str, retries: int = 3) -> IO[bytes]:
    """Open a local path, fsspec URL or ``pipe:`` command for binary reading (retries remote opens)."""
    if url.startswith("pipe:"):
        return _PipeReader(url[len("pipe:") :])
    if not _is_remote(url):
        return open(_local_path(url), "rb", buffering=1 << 20)
    for attempt in range(retries):
        try:
            return fsspec.open(url, "rb").open()
        except ImportError as err:
            raise ImportError(f"reading {url!r} needs the fsspec backend for its protocol: {err}") from err
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == retries - 1:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TruncatedAt:
    """End marker: the shard broke or ended before ``ordinal`` could be read."""

    ordinal: int
    detail: str


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``); ``None`` for names without extension."""
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def iter_tar_samples(
    fileobj: IO[bytes], start: int = 0, seekable: bool = False, expected: int | None = None, url: str = "<tar>"
) -> Iterator[tuple[int, str, dict[str, bytes]] | TruncatedAt]:
    """Yield ``(ordinal, key, {ext: bytes})`` for the samples of a tar, from ordinal ``start``.

    Consecutive members sharing a key form one sample; samples before ``start`` are passed over
    without reading their data. If the tar breaks, yields one :class:`TruncatedAt` (the sample in
    progress is lost) and stops. A tar that simply ends early just stops (the caller compares the
    count with the stats file).

    Args:
        fileobj: the tar, opened for binary reading.
        start: the first ordinal to yield.
        seekable: ``fileobj`` can seek (members are then skipped without reading them).
        expected: the shard's sample count per its stats file. A tar holding more samples yields
            only the first ``expected``; the rest are counted (headers only) before the last
            expected sample is yielded and reported once per shard (:func:`report_uncounted`).
        url: the shard, for that report.
    """
    ordinal, key, members = -1, None, {}
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|")
        infos = _members(tar)
        for info in infos:
            parts = split_name(info.name) if info.isfile() else None
            if parts is None:
                continue
            if parts[0] != key:
                if expected is not None and ordinal + 1 == expected and key is not None:
                    report_uncounted(url, expected, expected + 1 + _count_samples(infos, parts[0]))
                    if ordinal >= start:
                        yield ordinal, key, members
                    return
                if key is not None and ordinal >= start:
                    yield ordinal, key, members
                ordinal, key, members = ordinal + 1, parts[0], {}
            if ordinal >= start:
                members[parts[1]] = tar.extractfile(info).read()
        if key is not None and ordinal >= start:
            yield ordinal, key, members
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        yield TruncatedAt(max(ordinal, 0), f"{type(err).__name__}: {err}")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's members in order, without keeping them: a ``TarFile`` lists every member it has
    read (about 0.4 KB each: 13 MB for a shard of 10,000 samples, per open reader)."""
    while (info := tar.next()) is not None:
        tar.members = []
        yield info


def _count_samples(infos: Iterator[tarfile.TarInfo], key: str) -> int:
    """Samples among the remaining members ``infos`` of a tar, after the one of ``key`` (headers only;
    a tar that breaks ends the count)."""
    count = 0
    try:
        for info in infos:
            parts = split_name(info.name) if info.isfile() else None
            if parts is not None and parts[0] != key:
                count, key = count + 1, parts[0]
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass
    return count


_REPORTED_UNCOUNTED: set[str] = set()


def report_uncounted(url: str, stats_count: int, tar_count: int) -> None:
    """Warn, once per shard and process, that a tar holds more samples than its stats file says
    (the extra ones are never read: an epoch is planned from the stats files)."""
    if url in _REPORTED_UNCOUNTED:
        return
    _REPORTED_UNCOUNTED.add(url)
    log.warning(
        "shard %s holds %d samples but its stats file %s says %d: the %d samples after the first %d are "
        "skipped (correct the stats file's 'successes' to read them)",
        url, tar_count, stats_url(url) if ".tar" in url else "(none)", stats_count, tar_count - stats_count, stats_count,
    )


# ----------------------------------------------------------------------------- writing


def add_sample(tar: tarfile.TarFile, key: str, members: Mapping[str, bytes], mtime: int = 0) -> None:
    """Append one sample to a tar open for writing: a member ``KEY.ext`` (mode 0644) for each
    ``ext -> bytes``, in the mapping's order."""
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), mtime, 0o644
        tar.addfile(info, io.BytesIO(data))


def write_shard(
    path: str | Path,
    samples: Iterable[tuple[str, Mapping[str, bytes]]],
    stats: Mapping[str, Any] | None = None,
    mtime: int = 0,
) -> int:
    """Write one shard: the tar ``path`` and its ``_stats.json`` beside it (:func:`stats_url`).

    Args:
        path: the ``.tar`` to write (missing parent folders are made).
        samples: ``(key, {ext: bytes})`` per sample, in order (:func:`add_sample`).
        stats: further ``_stats.json`` fields (``count``, ``failed_to_download``, ...), read once
            the samples are written, so a generator of ``samples`` may fill them in; ``successes``
            is the number of samples written unless ``stats`` gives it.
        mtime: the members' modification time.

    Returns:
        The number of samples written.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            add_sample(tar, key, members, mtime)
            written += 1
    with open(stats_url(str(path)), "w") as f:
        json.dump({"successes": written, **(stats or {})}, f)
    return written
