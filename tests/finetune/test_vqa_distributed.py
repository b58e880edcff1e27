"""Two CPU processes (gloo): VQA evaluation gathers the answers of both ranks, drops the duplicate a
padding sampler would add, writes one results JSON and computes the same accuracy on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from finetune_tiny import tiny_model

from qformer_lightning.tasks.vqa import VQA

WORLD = 2
# (question_id, prediction, human answers) per rank; question 1 comes back on rank 1 (padding) with
# another prediction that must not count. By hand: q1 1, q2 0, q3 (2 x 1/3 + 8 x 2/3) / 10 = 0.6,
# q4 1, q5 (3 x 2/3 + 7 x 1) / 10 = 0.9 -> 100 * 3.5 / 5 = 70.
RECORDS = {
    0: [(1, "yes", ["yes"] * 10), (2, "no", ["yes"] * 10), (3, "red", ["red"] * 2 + ["blue"] * 8)],
    1: [(4, "cat", ["cat"] * 10), (5, "dog", ["dog"] * 3 + ["cat"] * 7), (1, "no", ["yes"] * 10)],
}


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        task = VQA(tiny_model("t5"), question_to_qformer=False, results_dir=out_dir)
        task._records["test"] = [{"question_id": q, "answer": p, "answers": a} for q, p, a in RECORDS[rank]]
        accuracy = task.finish_evaluation("test")
        torch.save({"accuracy": accuracy}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_vqa_evaluation(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    accuracies = [torch.load(tmp_path / f"rank{r}.pt")["accuracy"] for r in range(WORLD)]
    assert all(abs(a - 70.0) < 1e-9 for a in accuracies), accuracies  # without the dedupe: 350 / 6
    results = json.loads((tmp_path / "vqa_test_step0.json").read_text())
    assert results == [
        {"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}, {"question_id": 3, "answer": "red"},
        {"question_id": 4, "answer": "cat"}, {"question_id": 5, "answer": "dog"},
    ]
