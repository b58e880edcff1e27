"""Two gloo processes: VQAAccuracy sums and CaptionMetric byte-encoded captions sync across ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from qformer_lightning.metrics.caption import CaptionMetric
from qformer_lightning.metrics.vqa import VQAAccuracy

ANNOTATION = {"annotations": [{"image_id": i, "caption": f"reference {i}"} for i in range(1, 6)]}
# Rank 0 gets two batches, rank 1 none: the empty-rank case must still sync.
CAPTIONS_BY_RANK = {
    0: [([1, 2], ["a dog", "naïve café ☕"]), ([5], ["a much longer caption than the others"])],
    1: [],
}
VQA_BY_RANK = {
    0: [(["cat"], [["cat"] * 3 + ["dog"] * 7])],  # 0.9
    1: [(["2", "no"], [["two"] * 10, ["no"] * 10])],  # 0.0 (answers not number-mapped), 1.0
}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        vqa = VQAAccuracy()
        for predictions, answers in VQA_BY_RANK[rank]:
            vqa.update(predictions, answers)
        accuracy = vqa.compute().item()

        captions = CaptionMetric(ANNOTATION, use_spice=False)
        for image_ids, texts in CAPTIONS_BY_RANK[rank]:
            captions.update(image_ids, texts)
        captions.sync()
        gathered = captions.predictions()
        captions.unsync()
        local = captions.predictions()
        result = {"accuracy": accuracy, "gathered": gathered, "local": local}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or os.name != "posix", reason="needs torch.distributed and fork")
def test_two_rank_sync(tmp_path: Path) -> None:
    # fork: the children reuse the parent's imports (spawn would re-import torch per rank).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected_captions = [
        {"image_id": 1, "caption": "a dog"},
        {"image_id": 2, "caption": "naïve café ☕"},
        {"image_id": 5, "caption": "a much longer caption than the others"},
    ]
    for rank, result in enumerate(results):
        assert result["accuracy"] == pytest.approx(100 * (0.9 + 0.0 + 1.0) / 3, abs=1e-9)
        assert result["gathered"] == expected_captions
        assert len(result["local"]) == (3 if rank == 0 else 0)  # unsync restores the local state
