"""The deterministic order of an epoch over shards, ranks and data-loader workers.

Pure functions of (shard counts, source quotas, seed, epoch, world size, rank, workers, batch
size): nothing here reads data, so every rank and worker computes its own share, and a resumed
run recomputes exactly the order of the uninterrupted one.

An epoch is built in four steps:

1. Tasks: each source visits its shards (in a seeded random order, a new one per pass) until its
   quota ``round(weight * samples)`` is reached; the last task of a source may cover only the
   first samples of its shard. All sources' tasks are shuffled together. Concatenated, the tasks
   define the epoch's global sample sequence, positions ``0 .. L-1``.
2. Ranks: rank r takes the contiguous positions ``[r * n, (r + 1) * n)``; with ``drop_last``
   ``n = floor(L / (R * B)) * B`` (all ranks get the same number of full batches; fewer than
   R * B samples of the epoch are left out, a different set each epoch), otherwise
   ``n = floor(L / R)`` with a shorter last batch (evaluation).
3. Workers: the rank's batch j is produced by logical worker ``j mod W`` (PyTorch's round-robin);
   each logical worker's batches are a contiguous piece of the rank's positions.
4. Order within a worker: with ``shuffle``, the piece is cut into ``interleave`` contiguous lanes
   (read concurrently, so each batch mixes several shards and sources) taken round-robin, then
   permuted within consecutive blocks of ``shuffle_block`` samples. A reader needs at most one
   block of read-ahead, and within a lane it only ever reads forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qformer_lightning.data.shards import Shard


@dataclass(frozen=True)
class Task:
    """Samples ``[start, stop)`` (tar ordinals) of shard ``shard`` of source ``source``."""

    source: int
    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def source_quota(shards: list[Shard], weight: float) -> int:
    """Samples a source contributes per epoch: ``round(weight * total)``."""
    if weight < 0:
        raise ValueError(f"source weight must be >= 0, got {weight}")
    return int(round(weight * sum(s.num_samples for s in shards)))


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([p & 0xFFFFFFFF for p in parts] + [p >> 32 & 0xFFFFFFFF for p in parts])


def epoch_tasks(
    sources: list[list[Shard]], quotas: list[int], seed: int, epoch: int, shuffle: bool
) -> list[Task]:
    """The epoch's tasks in reading order (step 1 of the module docstring)."""
    tasks: list[Task] = []
    for index, (shards, quota) in enumerate(zip(sources, quotas)):
        counts = [s.num_samples for s in shards]
        if quota > 0 and sum(counts) == 0:
            raise ValueError(f"source {index} has a quota of {quota} samples but its shards hold none")
        rng = _rng(seed, epoch, index, 1)
        left = quota
        while left > 0:
            order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
            for shard in order.tolist():
                take = min(counts[shard], left)
                if take > 0:
                    tasks.append(Task(index, shard, 0, take))
                    left -= take
                if left == 0:
                    break
    if shuffle:
        perm = _rng(seed, epoch, 2).permutation(len(tasks))
        tasks = [tasks[i] for i in perm.tolist()]
    return tasks


def rank_share(total: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Samples per rank per epoch (step 2)."""
    if drop_last:
        return (total // (world_size * batch_size)) * batch_size
    return total // world_size


def num_batches(share: int, batch_size: int) -> int:
    """Batches per rank per epoch for a rank share of ``share`` samples."""
    return math.ceil(share / batch_size)


@dataclass(frozen=True)
class WorkerPlan:
    """What one logical worker produces in one epoch.

    Attributes:
        positions: (P,) int64 global positions in emission order.
        batch_sizes: sizes of the worker's batches, in order (they sum to P).
        lanes: (P,) int64 lane of each position (a reader stream is one (lane, task) pair).
    """

    positions: np.ndarray
    batch_sizes: list[int]
    lanes: np.ndarray


def worker_plan(
    total: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    drop_last: bool,
    shuffle: bool,
    interleave: int,
    shuffle_block: int,
    seed: int,
    epoch: int,
) -> WorkerPlan:
    """Steps 2-4 of the module docstring for logical worker ``worker`` of rank ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} outside {num_workers} workers")
    share = rank_share(total, world_size, batch_size, drop_last)
    n_batches = num_batches(share, batch_size)
    sizes = [min(batch_size, share - j * batch_size) for j in range(n_batches)]
    mine = [sizes[j] for j in range(worker, n_batches, num_workers)]
    before = sum(sizes[j] for j in range(n_batches) if j % num_workers < worker)
    start = rank * share + before
    count = sum(mine)
    lanes_n = max(1, min(interleave, count)) if shuffle else 1
    bounds = np.linspace(0, count, lanes_n + 1).round().astype(np.int64)  # (lanes+1,)
    offsets = np.arange(count, dtype=np.int64)
    lane = np.searchsorted(bounds, offsets, side="right") - 1  # (P,)
    within = offsets - bounds[lane]
    order = np.lexsort((lane, within))  # round-robin over lanes
    positions = start + offsets[order]
    lanes = lane[order]
    if shuffle and shuffle_block > 1:
        rng = _rng(seed, epoch, start, 3)
        for lo in range(0, count, shuffle_block):
            perm = lo + rng.permutation(min(shuffle_block, count - lo))
            positions[lo : lo + len(perm)] = positions[perm]
            lanes[lo : lo + len(perm)] = lanes[perm]
    return WorkerPlan(positions, mine, lanes)


def locate(tasks: list[Task], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global positions -> (task index, tar ordinal), both (P,) int64."""
    sizes = np.array([t.size for t in tasks], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])  # (T+1,)
    task = np.searchsorted(starts, positions, side="right") - 1
    first = np.array([t.start for t in tasks], dtype=np.int64)
    return task, first[task] + positions - starts[task]
