"""Output shards of a CapFilt run: names, the "done" test, and an all-or-nothing writer.

An output shard ``NAME.tar`` + ``NAME_stats.json`` (img2dataset layout, as
``qformer_lightning.data.shards`` reads it) is written to temporary files and moved into place
with ``os.replace``: first the tar, then the stats file. A shard is done when its stats file
exists and carries the ``capfilt`` entry, so a run killed at any point leaves either a finished
shard or one that the next run writes again, never half a shard that counts as done.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Sequence

from qformer_lightning.data.shards import add_sample

_TMP = ".tmp-"


def output_name(url: str) -> str:
    """The output shard name of an input URL: the file name before its last ``.tar``.

    ``/data/cc3m/00012.tar`` -> ``00012``; ``pipe:aws s3 cp s3://b/00012.tar -`` -> ``00012``.
    """
    index = url.rfind(".tar")
    if index < 0:
        raise ValueError(f"shard URL {url!r} has no '.tar'; cannot name its output shard")
    head = re.split(r"[\s/]", url[:index])[-1]
    if not head:
        raise ValueError(f"shard URL {url!r} has an empty file name before '.tar'")
    return head


def output_names(urls: Sequence[str]) -> list[str]:
    """Output names of all input shards; raises ``ValueError`` if two inputs map to one output."""
    names = [output_name(u) for u in urls]
    first: dict[str, str] = {}
    for url, name in zip(urls, names):
        if name in first:
            raise ValueError(
                f"input shards {first[name]!r} and {url!r} would both write {name}.tar; "
                "run CapFilt on each source into its own output directory"
            )
        first[name] = url
    return names


def tar_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{name}.tar")


def stats_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"{name}_stats.json")


def is_done(out_dir: str, name: str) -> bool:
    """Whether ``name`` was completely written by CapFilt (its stats file exists with ``capfilt``)."""
    try:
        with open(stats_path(out_dir, name), encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and "capfilt" in stats and os.path.isfile(tar_path(out_dir, name))


def remove_stale(out_dir: str, name: str) -> list[str]:
    """Delete temporary files of ``name`` left by a killed run; returns the paths removed."""
    removed = []
    for pattern in (tar_path(out_dir, name), stats_path(out_dir, name)):
        for path in glob.glob(glob.escape(pattern) + _TMP + "*"):
            os.remove(path)
            removed.append(path)
    return removed


class ShardWriter:
    """Writes one output shard sample by sample into a temporary tar; :meth:`commit` publishes it.

    Members are written with mtime 0 and mode 0644, so the same samples give identical bytes.
    """

    def __init__(self, out_dir: str, name: str) -> None:
        self.out_dir, self.name = out_dir, name
        self.count = 0
        self._tmp = f"{tar_path(out_dir, name)}{_TMP}{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: ``KEY.ext`` for each ``ext -> bytes`` (in the dict's order)."""
        add_sample(self._tar, key, members)
        self.count += 1

    def commit(self, stats: dict) -> None:
        """Close the tar, move it into place, then write ``stats`` (``successes`` set to the count)."""
        self._tar.close()
        os.replace(self._tmp, tar_path(self.out_dir, self.name))
        final = stats_path(self.out_dir, self.name)
        tmp = f"{final}{_TMP}{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**stats, "successes": self.count}, f, indent=1)
        os.replace(tmp, final)

    def abort(self) -> None:
        """Drop the temporary tar (after an error)."""
        self._tar.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)
