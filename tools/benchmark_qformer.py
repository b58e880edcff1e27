"""Benchmark the Q-Former query pass (forward + backward) against transformers' ``Blip2QFormerModel``.

Both models get the SAME weights (copied from the transformers model into ours), the same random
image features (B, N, Dv) that do not require grad (as from a frozen image encoder), the same mode,
the same thread count and the same loss (sum of the (B, Q, D) outputs). They run alternately in one
process (A B A B ...) after warm-up iterations; the script prints every timed iteration and the
median time ratio ours / reference, in eval mode (no dropout) and in train mode (dropout as in
training). The headline is train mode: that is the pass a training step runs.

Before timing, the eval-mode outputs of the two models are compared (max abs difference printed;
the run stops if it exceeds ``--tolerance``), and the floating-point operations of one train-mode
forward + backward of each are counted with ``torch.utils.flop_counter`` (matrix products and
attention; elementwise work is not counted). Their ratio is the time ratio two passes would have
if they ran their matrix products equally fast: ours needs fewer because the cross-attention is
computed in the absorbed order (:mod:`qformer_lightning.nn.attention`). After timing, the achieved
GFLOP/s of each is printed, which shows how fast each one ran its share.

Example (the figures reported for the 2-core CPU sandbox)::

    python tools/benchmark_qformer.py --batch 8 --iters 10 --warmup 2 --threads 2

Glossary: B batch, Q queries, N image tokens, D width, Dv image-feature width.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.flop_counter as flop_counter
from torch import Tensor, nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a checkout
from qformer_lightning.convert.hf import load_hf_state_dict  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402


@dataclass(frozen=True)
class Size:
    """Q-Former size (BLIP-2: BERT-base with 32 queries, cross-attention every 2nd layer)."""

    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    vision_width: int = 1408
    image_tokens: int = 257


def build_reference(size: Size) -> nn.Module:
    """transformers' ``Blip2QFormerModel`` of ``size`` (queries only, SDPA attention, BERT init)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = Blip2QFormerConfig(
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        cross_attention_frequency=size.cross_attention_freq,
        encoder_hidden_size=size.vision_width,
        use_qformer_text_input=False,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        attn_implementation="sdpa",
    )
    return Blip2QFormerModel(config)


def build_ours(size: Size) -> QFormer:
    """Our Q-Former of ``size`` without text parts (the reference has none either)."""
    return QFormer(
        num_layers=size.num_layers,
        hidden_size=size.hidden_size,
        num_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        num_query_tokens=size.num_query_tokens,
        cross_attention_freq=size.cross_attention_freq,
        vision_width=size.vision_width,
        text_ffn=False,
    )


@torch.no_grad()
def copy_weights(ours: QFormer, ref: nn.Module) -> None:
    """Copy every weight of the transformers Q-Former into ours through the project's converter
    (:func:`qformer_lightning.convert.hf.load_hf_state_dict`, strict: nothing missing but the
    query tokens, which the reference does not own, nothing left over, shapes checked)."""
    load_hf_state_dict(ours, ref.state_dict(), source="benchmark reference", strict=True)


def ours_step(model: QFormer, image: Tensor) -> Tensor:
    """Our query pass. (B, N, Dv) -> (B, Q, D)."""
    return model.encode_queries(image).hidden


def reference_step(model: nn.Module, query_tokens: Tensor, image: Tensor) -> Tensor:
    """The reference query pass on the same learned queries. (B, N, Dv) -> (B, Q, D)."""
    queries = query_tokens.expand(image.shape[0], -1, -1)  # (B, Q, D)
    return model(query_embeds=queries, encoder_hidden_states=image).last_hidden_state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_cpu_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args, **kwargs) -> int:
    """FLOPs of PyTorch's CPU flash-attention kernel (forward), counted as the CUDA kernels are."""
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(
    grad_out: torch.Size, query: torch.Size, key: torch.Size, value: torch.Size, *args, **kwargs
) -> int:
    """FLOPs of the CPU flash-attention backward (scores recomputed), counted as the CUDA kernels are."""
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}
"""The CPU attention kernels that ``torch.utils.flop_counter`` has no formula for."""


def count_flops(model: nn.Module, forward: Callable[[], Tensor]) -> int:
    """Floating-point operations of one forward + backward (``forward().sum().backward()``),
    counted by ``torch.utils.flop_counter`` (matrix products and attention kernels)."""
    model.zero_grad(set_to_none=True)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        forward().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def layer_runs(ours: QFormer, ref: nn.Module, image: Tensor, size: Size) -> dict[str, tuple[nn.Module, Callable[[], Tensor]]]:
    """Forward functions of layer 0 (with cross-attention) and layer 1 (without) of both models on
    the same query states (B, Q, D) that require grad, as inside the full pass."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(image.shape[0], size.num_query_tokens, size.hidden_size, generator=generator)
    hidden = hidden.to(device=image.device, dtype=image.dtype).requires_grad_()
    q = size.num_query_tokens
    theirs = ref.encoder.layer
    return {
        "ours cross": (ours.layers[0], lambda: ours.layers[0](hidden, q, None, image)[0]),
        "reference cross": (theirs[0], lambda: theirs[0](hidden, encoder_hidden_states=image, query_length=q)),
        "ours plain": (ours.layers[1], lambda: ours.layers[1](hidden, q, None, None)[0]),
        "reference plain": (theirs[1], lambda: theirs[1](hidden, query_length=q)),
    }


def time_train_step(model: nn.Module, forward: Callable[[], Tensor], device: torch.device) -> float:
    """Seconds for zero_grad + forward + sum + backward."""
    _sync(device)
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    forward().sum().backward()
    _sync(device)
    return time.perf_counter() - start


def alternate(
    runs: dict[str, tuple[nn.Module, Callable[[], Tensor]]], warmup: int, iters: int, device: torch.device
) -> dict[str, list[float]]:
    """Run the entries of ``runs`` in turn (A B A B ...): ``warmup`` untimed rounds, then ``iters`` timed."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + iters):
        for name, (model, forward) in runs.items():
            seconds = time_train_step(model, forward, device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per model and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per model and mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train, eval")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max abs output difference allowed (default: 1e-4 for fp32, 0.2 for 16-bit types)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also time one layer with cross-attention and one without, of each (train mode)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    size = Size()
    print(
        f"torch {torch.__version__} | device {device} | dtype {args.dtype} | threads {torch.get_num_threads()} | "
        f"batch {args.batch} | size {size}"
    )

    torch.manual_seed(args.seed)
    ref = build_reference(size)
    ours = build_ours(size)
    copy_weights(ours, ref)
    ref.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    print(f"reference attention implementation: {ref.config._attn_implementation}")
    generator = torch.Generator().manual_seed(args.seed + 1)
    image = torch.randn(args.batch, size.image_tokens, size.vision_width, generator=generator)
    image = image.to(device=device, dtype=dtype)  # (B, N, Dv), no grad: a frozen encoder's output
    query_tokens = ours.query_tokens  # the reference has no query parameter of its own; both use ours

    with torch.no_grad():
        ref.eval(), ours.eval()
        diff = (ours_step(ours, image) - reference_step(ref, query_tokens, image)).abs().max().item()
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 0.2)
    print(f"eval-mode outputs: max abs difference ours vs reference = {diff:.3e}")
    if diff > tolerance:
        raise SystemExit(f"outputs differ by {diff:.3e} > tolerance {tolerance}: the comparison is void")

    runs: dict[str, tuple[nn.Module, Callable[[], Tensor]]] = {
        "ours": (ours, lambda: ours_step(ours, image)),
        "reference": (ref, lambda: reference_step(ref, query_tokens, image)),
    }
    flops = {}
    for name, (model, forward) in runs.items():
        model.train()
        flops[name] = count_flops(model, forward)
    print(
        f"FLOPs per forward+backward (train mode): ours {flops['ours'] / 1e9:.2f} G, reference "
        f"{flops['reference'] / 1e9:.2f} G, ratio {flops['ours'] / flops['reference']:.3f} (the time ratio if "
        "both ran their matrix products equally fast)"
    )
    if args.compile:
        compiled = torch.compile(lambda features: ours_step(ours, features))
        for mode in args.modes.split(","):  # one graph per mode: compile both before timing
            ours.train(mode == "train")
            start = time.perf_counter()
            time_train_step(ours, lambda: compiled(image), device)
            print(f"torch.compile ({mode} mode): first (compiling) step took {time.perf_counter() - start:.1f} s")
        runs["ours_compiled"] = (ours, lambda: compiled(image))

    for mode in args.modes.split(","):
        if mode not in ("train", "eval"):
            raise SystemExit(f"unknown mode {mode!r}: use train and/or eval")
        for model, _ in runs.values():
            model.train(mode == "train")
        times = alternate(runs, args.warmup, args.iters, device)
        print(f"\n[{mode} mode] forward+backward seconds per iteration ({args.iters} timed, {args.warmup} warm-up)")
        for name, values in times.items():
            print(f"  {name:14s} " + " ".join(f"{t:.3f}" for t in values) + f"  median {statistics.median(values):.3f}")
        if mode == "train":
            for name in ("ours", "reference"):
                rate = flops[name] / statistics.median(times[name]) / 1e9
                print(f"  {name:14s} achieved {rate:.1f} GFLOP/s (counted FLOPs / median time)")
        base = statistics.median(times["reference"])
        for name, values in times.items():
            if name != "reference":
                pairs = [a / b for a, b in zip(values, times["reference"])]
                print(
                    f"  {name} / reference: ratio of medians {statistics.median(values) / base:.3f}, "
                    f"median of per-round ratios {statistics.median(pairs):.3f}"
                )

    if args.per_layer:
        runs = layer_runs(ours, ref, image, size)
        for model, _ in runs.values():
            model.train()
        times = alternate(runs, args.warmup, args.iters, device)
        print(f"\n[train mode, one layer] forward+backward milliseconds ({args.iters} timed, {args.warmup} warm-up)")
        for kind in ("cross", "plain"):
            mine, theirs = statistics.median(times[f"ours {kind}"]), statistics.median(times[f"reference {kind}"])
            label = "with cross-attention" if kind == "cross" else "without cross-attention"
            print(f"  layer {label:24s} ours {1e3 * mine:7.1f}  reference {1e3 * theirs:7.1f}  ratio {mine / theirs:.3f}")


if __name__ == "__main__":
    main()
