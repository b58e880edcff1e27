"""The block-wise epoch plan: every rank/worker piece is covered exactly once, lanes read forward,
each (lane, task) stream ends once, blocks are reproducible on their own (resume), and a worker's
plan of a corpus-scale epoch takes O(tasks) memory, not O(samples)."""

import tracemalloc

import numpy as np
import pytest

from qformer_lightning.data.plan import Task, epoch_tasks, num_batches, rank_share, worker_plan
from qformer_lightning.data.shards import Shard


def _tasks(counts: list[int], seed: int = 0, epoch: int = 0) -> list[Task]:
    shards = [Shard(f"s{i}.tar", c) for i, c in enumerate(counts)]
    return epoch_tasks([shards], [sum(counts)], seed, epoch, shuffle=True)


def _all_items(plan) -> list:
    blocks, index = [], 0
    while index < plan.count:
        blocks.append(plan.block_at(index))
        index = blocks[-1].index + len(blocks[-1].positions)
    return blocks


@pytest.mark.parametrize("world_size,workers,interleave,block", [(1, 1, 1, 1), (1, 3, 4, 7), (2, 2, 3, 10), (3, 2, 5, 64)])
def test_pieces_cover_each_rank_share_once(world_size: int, workers: int, interleave: int, block: int) -> None:
    tasks = _tasks([13, 20, 7, 31, 9])  # 80 samples
    batch = 4
    share = rank_share(80, world_size, batch, True)
    for rank in range(world_size):
        seen = []
        for worker in range(workers):
            plan = worker_plan(tasks, rank, world_size, worker, workers, batch, True, True, interleave, block, 0, 0)
            assert plan.count == sum(plan.batch_sizes())
            blocks = _all_items(plan)
            positions = np.concatenate([b.positions for b in blocks]) if blocks else np.zeros(0, np.int64)
            seen.extend(positions.tolist())
            for b in blocks:  # task and ordinal located correctly
                assert (b.ordinals >= 0).all() and (b.ordinals < [tasks[t].stop for t in b.tasks]).all()
            lanes = np.concatenate([b.lanes for b in blocks]) if blocks else np.zeros(0, np.int64)
            for lane in range(plan.num_lanes):  # within a lane, each block moves forward
                per_block = [b.positions[b.lanes == lane] for b in blocks]
                per_block = [p for p in per_block if len(p)]
                assert all(x.max() < y.min() for x, y in zip(per_block, per_block[1:]))
            ends = [(int(l), int(t)) for b in blocks for l, t in zip(b.lanes[b.stream_ends], b.tasks[b.stream_ends])]
            streams = {(int(l), int(t)) for b in blocks for l, t in zip(b.lanes, b.tasks)}
            assert sorted(ends) == sorted(streams)  # every stream ends exactly once
            assert len(lanes) == plan.count
        assert sorted(seen) == list(range(rank * share, (rank + 1) * share))


def test_batches_are_dealt_round_robin_with_a_short_last_one() -> None:
    tasks = _tasks([10, 11])  # 21 samples, batch 4, no drop_last: 5 full batches and one of 1
    sizes = [list(worker_plan(tasks, 0, 1, w, 2, 4, False, False, 1, 8, 0, 0).batch_sizes()) for w in range(2)]
    assert sizes == [[4, 4, 4], [4, 4, 1]]
    plan = worker_plan(tasks, 0, 1, 1, 2, 4, False, False, 1, 8, 0, 0)
    assert plan.start == 12 and plan.items_before(2) == 8 and list(plan.batch_sizes(2)) == [1]
    in_order = np.concatenate([b.positions for b in _all_items(plan)])
    assert in_order.tolist() == list(range(12, 21))  # no shuffle: file order


def test_a_block_is_drawn_the_same_alone_and_in_sequence() -> None:
    tasks = _tasks([50, 50, 50])
    args = (tasks, 0, 1, 0, 1, 10, True, True, 3, 16, 4, 2)
    sequence = _all_items(worker_plan(*args))
    alone = worker_plan(*args).block_at(5 * 16 + 3)  # as a resume inside block 5 computes it
    assert alone.index == 80 and np.array_equal(alone.positions, sequence[5].positions)
    other_epoch = worker_plan(*args[:-1], 3).block_at(80)
    assert not np.array_equal(other_epoch.positions, alone.positions)


def test_corpus_scale_plan_is_o_of_shards() -> None:
    """13,000 shards x 10,000 samples (130M), 2 workers: the plan and one block allocate a few MB."""
    shards = [Shard(f"s{i}.tar", 10_000) for i in range(13_000)]
    tracemalloc.start()
    tasks = epoch_tasks([shards], [130_000_000], 0, 0, shuffle=True)
    plan = worker_plan(tasks, 0, 1, 1, 2, 100, True, True, 4, 1000, 0, 0)
    block = plan.block_at(plan.count // 2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert plan.count == 65_000_000 and len(block.positions) == 1000
    assert num_batches(rank_share(130_000_000, 1, 100, True), 100) == 1_300_000
    assert peak < 20 * 2**20, f"{peak / 2**20:.1f} MiB"  # the old per-sample plan took ~4 GB here
