"""Two CPU processes (gloo) give the retrieval evaluation of one process.

Each rank embeds the images a DistributedSampler gives it (the last one padded with a repeat of
image 0, which rank 0 also holds), scores the candidate pairs of the images it owns, with an
ITM batch size that leaves the ranks with different numbers of pairs; all ranks then hold the
same score matrices and metrics, equal to the single-process ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrieval_tiny import feed, tiny_retrieval, tiny_split

WORLD = 2
NUM_IMAGES = 5


def sampler_indices(rank: int) -> list[int]:
    """What torch's DistributedSampler(shuffle=False) gives ``rank`` (padding by repeating from the start)."""
    total = math.ceil(NUM_IMAGES / WORLD) * WORLD
    padded = list(range(NUM_IMAGES)) + list(range(total - NUM_IMAGES))
    return padded[rank:total:WORLD]


def _evaluate(index: list[int]) -> dict:
    task = tiny_retrieval(k=3, itm_batch_size=4)
    images, texts, txt2img, img2txt = tiny_split(num_images=NUM_IMAGES, captions_per_image=3)
    feed(task, images, index, batch_size=2)
    result = task.evaluate(texts, txt2img, img2txt)
    return {"metrics": result.metrics, "i2t": result.scores.i2t, "t2i": result.scores.t2i, "sim": result.sim,
            "num_pairs": result.scores.num_pairs}


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.save(_evaluate(sampler_indices(rank)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_result(tmp_path: Path) -> None:
    assert sampler_indices(0) == [0, 2, 4] and sampler_indices(1) == [1, 3, 0]
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    single = _evaluate(list(range(NUM_IMAGES)))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["metrics"] == single["metrics"], rank
        assert got["num_pairs"] == single["num_pairs"]
        torch.testing.assert_close(got["sim"], single["sim"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["i2t"], single["i2t"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["t2i"], single["t2i"], atol=1e-5, rtol=0)
