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
   (read concurrently, so each batch mixes several shards and sources; the first ``P mod lanes``
   lanes are one sample longer) taken round-robin, then permuted within consecutive blocks of
   ``shuffle_block`` samples, each block by its own generator seeded with (seed, epoch, piece
   start, block index). A reader needs at most one block of read-ahead, and within a lane it only
   ever reads forward.

Memory and start-up are O(tasks + lanes), never O(samples): a worker keeps the tasks' cumulative
sizes and computes one block at a time (:meth:`WorkerPlan.block_at`), also when resuming mid-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qformer_lightning.data.shards import Shard
from qformer_lightning.seeding import mix_rng


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


def epoch_tasks(
    sources: list[list[Shard]], quotas: list[int], seed: int, epoch: int, shuffle: bool
) -> list[Task]:
    """The epoch's tasks in reading order (step 1 of the module docstring)."""
    tasks: list[Task] = []
    for index, (shards, quota) in enumerate(zip(sources, quotas)):
        counts = [s.num_samples for s in shards]
        if quota > 0 and sum(counts) == 0:
            raise ValueError(f"source {index} has a quota of {quota} samples but its shards hold none")
        rng = mix_rng(seed, epoch, index, 1)
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
        perm = mix_rng(seed, epoch, 2).permutation(len(tasks))
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


def _full_batches_sum(js: range, share: int, batch_size: int) -> int:
    """Samples in the rank's batches ``js`` (indices below the rank's batch count; all batches are
    full but the rank's last, which may be short)."""
    n_batches = num_batches(share, batch_size)
    total = len(js) * batch_size
    if (n_batches - 1) in js:
        total -= n_batches * batch_size - share
    return total


@dataclass(frozen=True)
class Block:
    """One shuffle block of a worker's plan: items in emission order (all (n,) int64).

    Attributes:
        index: emission index of the block's first item within the worker's epoch.
        positions: global positions.
        lanes: lane of each item (a reader stream is one (lane, task) pair).
        tasks: task index of each item.
        ordinals: tar ordinal of each item within its task's shard.
        stream_ends: whether the item is the last one its (lane, task) stream ever yields.
    """

    index: int
    positions: np.ndarray
    lanes: np.ndarray
    tasks: np.ndarray
    ordinals: np.ndarray
    stream_ends: np.ndarray


@dataclass(frozen=True)
class WorkerPlan:
    """What one logical worker produces in one epoch, in O(tasks + lanes) memory.

    The worker's piece is the global positions ``[start, start + count)``, cut into ``lanes``
    contiguous lanes (lane l: ``lane_starts[l] .. lane_starts[l+1]`` as offsets in the piece; the
    first ``count mod lanes`` lanes are one longer). Emission index k (round-robin over lanes: k
    runs over the lanes for each offset within a lane) is permuted within consecutive blocks of
    ``block`` items by a generator seeded with (seed, epoch, start, block index), drawn only when
    the block is opened (:meth:`block_at`).

    Attributes:
        start, count: the worker's piece of global positions.
        lane_starts: (lanes + 1,) int64 offsets of the lanes in the piece.
        block: items per shuffle block.
        shuffle: permute within blocks.
        seed, epoch: the permutation seeds.
        task_starts: (T + 1,) int64 first global position of each task (and the epoch's length).
        task_first: (T,) int64 first tar ordinal of each task.
        batch_indices: the rank's batches this worker makes (``j mod W == worker``).
        share, batch_size: samples per rank and batch (batch j has ``min(B, share - j * B)`` samples).
    """

    start: int
    count: int
    lane_starts: np.ndarray
    block: int
    shuffle: bool
    seed: int
    epoch: int
    task_starts: np.ndarray
    task_first: np.ndarray
    batch_indices: range
    share: int
    batch_size: int

    @property
    def num_lanes(self) -> int:
        return len(self.lane_starts) - 1

    def batch_sizes(self, done: int = 0) -> Iterator[int]:
        """Sizes of the worker's batches after its first ``done``."""
        for j in self.batch_indices[done:]:
            yield min(self.batch_size, self.share - j * self.batch_size)

    def items_before(self, done: int) -> int:
        """Items in the worker's first ``done`` batches."""
        return _full_batches_sum(self.batch_indices[:done], self.share, self.batch_size)

    def _offsets(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Emission indices (n,) -> (offset in the piece, lane), both (n,) int64."""
        lanes_n = self.num_lanes
        short = self.count // lanes_n  # every lane has short or short + 1 items
        within = np.where(k < lanes_n * short, k // lanes_n, short)
        lane = np.where(k < lanes_n * short, k % lanes_n, k - lanes_n * short)
        return self.lane_starts[lane] + within, lane

    def block_at(self, index: int) -> Block:
        """The block holding emission index ``index`` (``0 <= index < count``)."""
        lo = (index // self.block) * self.block
        hi = min(lo + self.block, self.count)
        offsets, lanes = self._offsets(np.arange(lo, hi, dtype=np.int64))  # (n,), (n,)
        if self.shuffle and self.block > 1:
            perm = mix_rng(self.seed, self.epoch, self.start, 3, lo // self.block).permutation(hi - lo)
            offsets, lanes = offsets[perm], lanes[perm]
        positions = self.start + offsets
        tasks = np.searchsorted(self.task_starts, positions, side="right") - 1  # (n,)
        ordinals = self.task_first[tasks] + positions - self.task_starts[tasks]
        stream_end = np.minimum(self.task_starts[tasks + 1], self.start + self.lane_starts[lanes + 1])
        return Block(lo, positions, lanes, tasks, ordinals, positions == stream_end - 1)


def worker_plan(
    tasks: list[Task],
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
    sizes = np.array([t.size for t in tasks], dtype=np.int64)
    task_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (T+1,)
    total = int(task_starts[-1])
    share = rank_share(total, world_size, batch_size, drop_last)
    n_batches = num_batches(share, batch_size)
    mine = range(worker, n_batches, num_workers)
    before = sum(  # samples of the rank's batches made by the logical workers before this one
        _full_batches_sum(range(w, n_batches, num_workers), share, batch_size) for w in range(worker)
    )
    count = _full_batches_sum(mine, share, batch_size)
    lanes_n = max(1, min(interleave, count)) if shuffle else 1
    short, extra = divmod(count, lanes_n)
    lane_starts = np.array([lane * short + min(lane, extra) for lane in range(lanes_n + 1)], dtype=np.int64)
    return WorkerPlan(
        start=rank * share + before, count=count, lane_starts=lane_starts,
        block=max(1, shuffle_block), shuffle=shuffle, seed=seed, epoch=epoch, task_starts=task_starts,
        task_first=np.array([t.start for t in tasks], dtype=np.int64), batch_indices=mine, share=share,
        batch_size=batch_size,
    )
