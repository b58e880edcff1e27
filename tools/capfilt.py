"""CapFilt: re-caption img2dataset shards with a captioner and CLIP ranking (BLIP-2 pretraining data).

    python tools/capfilt.py --shards '/data/laion/{00000..09999}.tar' --out /data/laion_capfilt \\
        --devices 8 --batch-size 64 --num-workers 8

For every image: sample ``--num-captions`` captions (default BLIP-large, nucleus sampling as
BLIP), rank them and the web caption by CLIP ViT-L/14 similarity, keep the top ``--keep`` as the
sample's ``captions`` (what ShardDataModule trains on). Output shards keep the input names, keys
and members. Shards are split across all ranks (``--devices`` x ``--num-nodes``; Lightning
Fabric launches the processes, or picks up torchrun / SLURM); a shard already done in ``--out``
is skipped, so rerunning the same command resumes an interrupted run. See docs/capfilt.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qformer_lightning.capfilt import DEFAULT_CAPTIONER, DEFAULT_CLIP, SamplingConfig

    s = SamplingConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True, help="input shard URLs: paths, globs, brace ranges, fsspec, pipe:")
    p.add_argument("--out", required=True, help="output directory (local or a shared mount)")
    p.add_argument("--captioner", default=DEFAULT_CAPTIONER, help="transformers image-to-text model: hub id or directory")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="transformers CLIPModel: hub id or directory")
    p.add_argument("--num-captions", type=int, default=s.num_captions)
    p.add_argument("--keep", type=int, default=2, help="top captions kept for training")
    p.add_argument("--top-p", type=float, default=s.top_p)
    p.add_argument("--top-k", type=int, default=s.top_k)
    p.add_argument("--max-length", type=int, default=s.max_length)
    p.add_argument("--min-length", type=int, default=s.min_length)
    p.add_argument("--repetition-penalty", type=float, default=s.repetition_penalty)
    p.add_argument("--prompt", default=s.prompt, help="captioner text prefix ('' for models without one)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cuda, cpu")
    p.add_argument("--devices", default="1", help="devices per node ('auto' or a count)")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Run CapFilt; returns the counts summed over all ranks."""
    from lightning.fabric import Fabric

    from qformer_lightning.capfilt import CapFilt, SamplingConfig

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    devices = args.devices if args.devices == "auto" else int(args.devices)
    multi = args.num_nodes > 1 or devices == "auto" or devices > 1
    fabric = Fabric(
        accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
        strategy="ddp" if multi else "auto",
    )
    fabric.launch()
    on_gpu = fabric.device.type == "cuda"
    dtype = (torch.bfloat16 if on_gpu else torch.float32) if args.dtype == "auto" else DTYPES[args.dtype]
    sampling = SamplingConfig(
        num_captions=args.num_captions, top_p=args.top_p, top_k=args.top_k, max_length=args.max_length,
        min_length=args.min_length, repetition_penalty=args.repetition_penalty, prompt=args.prompt,
    )
    capfilt = CapFilt.from_pretrained(
        args.captioner, args.clip, sampling, dtype, fabric.device,
        keep=args.keep, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
    )
    summary = capfilt.run(
        args.shards, args.out, fabric.global_rank, fabric.world_size,
        progress=not args.no_progress and fabric.global_rank == 0,
    )
    counts = torch.tensor(
        [summary.shards_written, summary.shards_skipped, summary.images, summary.unreadable, summary.truncated_shards],
        device=fabric.device,
    )
    counts = fabric.all_reduce(counts, reduce_op="sum")
    names = ("shards_written", "shards_skipped", "images", "unreadable", "truncated_shards")
    total = dict(zip(names, (int(c) for c in counts.tolist())))
    if fabric.global_rank == 0:
        print(
            f"capfilt: {total['shards_written']} shards written, {total['shards_skipped']} already done, "
            f"{total['images']} images, {total['unreadable']} unreadable images passed through with their web "
            f"caption, {total['truncated_shards']} truncated input shards (over {fabric.world_size} ranks) -> {args.out}"
        )
    return total


if __name__ == "__main__":
    main(sys.argv[1:])
