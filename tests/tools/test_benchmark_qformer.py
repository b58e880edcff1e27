"""tools/benchmark_qformer.py at a tiny size: the two models it times compute the same thing, and
its FLOP counts equal hand computations (so the FLOP ratio it prints is the real work ratio)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import benchmark_qformer as bq  # noqa: E402

TINY = bq.Size(
    num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, num_query_tokens=4,
    cross_attention_freq=2, vision_width=96, image_tokens=33,
)
BATCH = 3


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    ref = bq.build_reference(TINY)
    ours = bq.build_ours(TINY)
    bq.copy_weights(ours, ref)
    image = torch.randn(BATCH, TINY.image_tokens, TINY.vision_width)
    return ours, ref, image


def _dense_flops(size: bq.Size) -> tuple[int, int]:
    """(forward, backward) FLOPs per sample of everything both implementations share: the
    self-attention (projections and the two attention products), the query FFN and the
    cross-attention's query and output projections. Every product's backward computes the
    gradients of both operands (the layer-0 input comes from the trainable queries)."""
    q, d, f = size.num_query_tokens, size.hidden_size, size.intermediate_size
    cross_layers = len(range(0, size.num_layers, size.cross_attention_freq))
    forward = size.num_layers * (2 * q * d * 4 * d + 2 * 2 * q * q * d + 2 * 2 * q * d * f) + cross_layers * 2 * 2 * q * d * d
    return forward, 2 * forward


def reference_flops(size: bq.Size) -> int:
    """Train-mode FLOPs of transformers' query pass: keys and values of all N image tokens are
    projected (backward: weight gradients only, the image features need none), then attended
    with explicit products (dropout on, so PyTorch's CPU SDPA takes its matmul path)."""
    q, n, d, dv = size.num_query_tokens, size.image_tokens, size.hidden_size, size.vision_width
    cross_layers = len(range(0, size.num_layers, size.cross_attention_freq))
    forward, backward = _dense_flops(size)
    projection = 2 * n * dv * 2 * d  # keys and values
    attention = 2 * 2 * q * n * d
    return BATCH * (forward + backward + cross_layers * (2 * projection + 3 * attention))


def ours_flops(size: bq.Size) -> int:
    """Train-mode FLOPs of ours: cross-attention in the absorbed order. Per head, queries are
    moved into the image-feature space (Q x Dh x Dv), scored against and mixed with the N
    tokens (Q x N x Dv each), and mixed rows projected back (Q x Dv x Dh). Backward: both
    operand gradients for the two weight products, only the non-image operand for the two
    products with the image features."""
    q, n, d, dv, h = size.num_query_tokens, size.image_tokens, size.hidden_size, size.vision_width, size.num_heads
    cross_layers = len(range(0, size.num_layers, size.cross_attention_freq))
    forward, backward = _dense_flops(size)
    weight_products = 2 * 2 * q * d * dv  # in and out of the image-feature space, all heads
    image_products = 2 * 2 * h * q * n * dv  # scores and mixing
    return BATCH * (forward + backward + cross_layers * (3 * weight_products + 2 * image_products))


def test_tiny_size_takes_the_absorbed_order(models) -> None:
    ours, _, _ = models
    cross = ours.layers[0].cross_attn
    assert cross._absorbed_is_cheaper(TINY.num_query_tokens, TINY.image_tokens, TINY.vision_width)


def test_copied_models_give_the_same_outputs(models) -> None:
    ours, ref, image = models
    ours.eval(), ref.eval()
    with torch.no_grad():
        mine = bq.ours_step(ours, image)
        theirs = bq.reference_step(ref, ours.query_tokens, image)
    assert mine.shape == (BATCH, TINY.num_query_tokens, TINY.hidden_size)
    assert (mine - theirs).abs().max().item() <= 1e-5


def test_flop_counts_equal_hand_computation(models) -> None:
    ours, ref, image = models
    ours.train(), ref.train()
    counted_ref = bq.count_flops(ref, lambda: bq.reference_step(ref, ours.query_tokens, image))
    counted_ours = bq.count_flops(ours, lambda: bq.ours_step(ours, image))
    assert counted_ref == reference_flops(TINY)
    assert counted_ours == ours_flops(TINY)
    assert counted_ours < counted_ref
    assert all(p.grad is None for p in ours.parameters())  # counting leaves no gradients behind


def test_cpu_attention_kernels_are_counted(models) -> None:
    """In eval mode both take PyTorch's CPU flash-attention kernel, which torch's counter has no
    formula for; the tool's mapping counts it like the CUDA kernels (backward recomputes the scores)."""
    ours, ref, image = models
    ours.eval(), ref.eval()
    q, n, d = TINY.num_query_tokens, TINY.image_tokens, TINY.hidden_size
    cross_layers = len(range(0, TINY.num_layers, TINY.cross_attention_freq))
    self_attention = 2 * 2 * q * q * d
    cross_attention = 2 * 2 * q * n * d
    dense_forward, dense_backward = _dense_flops(TINY)
    projection = 2 * n * TINY.vision_width * 2 * d
    expected = BATCH * (
        dense_forward - TINY.num_layers * self_attention + dense_backward - TINY.num_layers * 2 * self_attention
        + TINY.num_layers * self_attention * 7 // 2  # forward 2 products, backward 5
        + cross_layers * (2 * projection + cross_attention * 7 // 2)
    )
    counted = bq.count_flops(ref, lambda: bq.reference_step(ref, ours.query_tokens, image))
    assert counted == expected


def test_per_layer_runs_compare_the_same_layers(models) -> None:
    """--per-layer times layer 0 (cross-attention) and layer 1 (none) of each on the same input."""
    ours, ref, image = models
    runs = bq.layer_runs(ours, ref, image, TINY)
    assert runs["ours cross"][0] is ours.layers[0] and ours.layers[0].cross_attn is not None
    assert runs["ours plain"][0] is ours.layers[1] and ours.layers[1].cross_attn is None
    for model, _ in runs.values():
        model.eval()
    with torch.no_grad():
        for kind in ("cross", "plain"):
            mine, theirs = runs[f"ours {kind}"][1](), runs[f"reference {kind}"][1]()
            assert mine.shape == (BATCH, TINY.num_query_tokens, TINY.hidden_size)
            assert (mine - theirs).abs().max().item() <= 1e-5, kind
