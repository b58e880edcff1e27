"""Benchmark the streaming pipeline against a bare PIL decode + RandomResizedCrop loop.

    python tools/benchmark_data.py [--num-images 256 --image-size 224 --batch-size 32 --repeats 3]

Generates COCO-like 640x480 JPEGs (smooth random content plus noise, quality 90) into a temporary
folder and into img2dataset-layout shards, then measures, in one process:

- bare: for each JPEG file, ``PIL.Image.open(path).convert("RGB")`` and torchvision's
  ``RandomResizedCrop(S, scale=(0.5, 1.0), bicubic)`` on the PIL image; nothing else.
- pipeline, per worker: the full ShardDataModule training loader with ``num_workers=0`` (read
  from tar, caption choice and cleanup, decode, crop, flip, uint8 stack, normalise), and with
  ``num_workers=1`` (the same in one worker process plus the transfer of the float batch).

Prints images/s of each (best of ``--repeats`` passes after a warm-up) and the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.shards import write_shard


def coco_like_jpeg(rng: np.random.Generator) -> bytes:
    """A 640x480 JPEG with photo-like statistics (low-frequency colour fields + noise)."""
    low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((640, 480), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (480, 640, 3), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_data(root: str, num_images: int, shard_size: int) -> tuple[list[str], str]:
    rng = np.random.default_rng(0)
    files, shard_dir = [], os.path.join(root, "shards")
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(shard_dir)

    def samples(lo: int, hi: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        for i in range(lo, hi):
            data = coco_like_jpeg(rng)
            path = os.path.join(root, "images", f"{i:06d}.jpg")
            with open(path, "wb") as f:
                f.write(data)
            files.append(path)
            meta = json.dumps({"captions": [f"A photo number {i}.", f"Image {i} of a scene."]}).encode()
            yield f"{i:06d}", {"jpg": data, "txt": b"a photo", "json": meta}

    for lo in range(0, num_images, shard_size):
        name = os.path.join(shard_dir, f"{lo // shard_size:05d}.tar")
        write_shard(name, samples(lo, min(lo + shard_size, num_images)))
    return files, os.path.join(shard_dir, "*.tar")


def bare_loop(files: list[str], size: int) -> float:
    crop = RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC)
    start = time.perf_counter()
    for path in files:
        crop(Image.open(path).convert("RGB"))
    return len(files) / (time.perf_counter() - start)


def pipeline(urls: str, size: int, batch_size: int, workers: int, seed: int) -> float:
    dm = ShardDataModule(sources=[ShardSource(urls)], batch_size=batch_size, num_workers=workers,
                         image_size=size, seed=seed, pin_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per measured loop, as in a data-loader worker
    with tempfile.TemporaryDirectory() as root:
        files, urls = write_data(root, args.num_images, args.shard_size)
        mean_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1024
        print(f"{len(files)} JPEGs 640x480 (mean {mean_kb:.0f} KB), output {args.image_size} px, "
              f"batch {args.batch_size}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        bare_loop(files, args.image_size)  # warm-up (page cache)
        pipeline(urls, args.image_size, args.batch_size, 0, 0)
        results = {"bare PIL decode + RandomResizedCrop": [], "pipeline, num_workers=0": [],
                   "pipeline, num_workers=1": []}
        for r in range(args.repeats):  # interleaved, so load changes hit all three alike
            results["bare PIL decode + RandomResizedCrop"].append(bare_loop(files, args.image_size))
            results["pipeline, num_workers=0"].append(pipeline(urls, args.image_size, args.batch_size, 0, r))
            results["pipeline, num_workers=1"].append(pipeline(urls, args.image_size, args.batch_size, 1, r))
        bare = max(results["bare PIL decode + RandomResizedCrop"])
        for name, values in results.items():
            best = max(values)
            print(f"{name:40s} {best:8.1f} images/s  ({best / bare:.2f}x bare)  passes: "
                  + ", ".join(f"{v:.1f}" for v in values))


if __name__ == "__main__":
    main()
