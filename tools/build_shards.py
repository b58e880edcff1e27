"""Build img2dataset-layout webdataset shards from an image folder and caption JSON files.

    python tools/build_shards.py --images /data/coco/images --captions coco_karpathy_train.json \
        --out /data/shards/coco --shard-size 10000 [--max-side 512]

Caption JSON: a list of ``{"image": relative/path.jpg, "caption": str | [str]}`` (BLIP's COCO /
VG / SBU files) or ``{"url": ..., "caption": ...}`` (BLIP's released CapFilt files; the image is
looked up in ``--images`` by the URL's file name, e.g. after downloading with wget; for web-scale
sets use img2dataset instead, see docs/data.md). Rows of one image are merged into one sample whose
``.json`` holds ``captions`` (all of its captions, in file order: put CapFilt's top-2 first) and
whose ``.txt`` holds the first. Each ``NNNNN.tar`` gets a ``NNNNN_stats.json`` with ``successes``
(samples written) and ``failed_to_download`` (images not found), as img2dataset writes.

    python tools/build_shards.py --write-stats /data/shards/old/*.tar

scans existing tars (without stats files) once and writes their ``_stats.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from urllib.parse import urlparse

from PIL import Image
from tqdm.auto import tqdm


def read_rows(paths: list[str]) -> list[tuple[str, str, list[str]]]:
    """(field, image path or url, captions) per distinct image, in first-appearance order."""
    merged: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of {{'image'|'url', 'caption'}} rows")
        for row in rows:
            field = "image" if "image" in row else "url" if "url" in row else None
            if field is None or "caption" not in row:
                raise ValueError(f"{path}: row without 'image'/'url' and 'caption': {row}")
            captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            merged.setdefault((field, row[field]), []).extend(captions)
    return [(field, where, caps) for (field, where), caps in merged.items()]


def local_file(images: str, field: str, where: str) -> str:
    """The file of a row: ``images/where`` for "image", ``images/<url file name>`` for "url"."""
    return os.path.join(images, where if field == "image" else os.path.basename(urlparse(where).path))


def encode(path: str, max_side: int | None) -> bytes:
    """The file's bytes, or a JPEG (quality 95) with the longer side cut to ``max_side``."""
    with open(path, "rb") as f:
        data = f.read()
    if max_side is None:
        return data
    img = Image.open(io.BytesIO(data))
    if max(img.size) <= max_side and img.format == "JPEG":
        return data
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()


def shard_samples(
    images: str, rows: list[tuple[str, str, list[str]]], shard: int, digits: int, max_side: int | None,
    stats: dict[str, int], bar: tqdm,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of one shard's rows; images missing or unreadable are counted into
    ``stats`` (``failed_to_download``, ``failed_to_resize``) and left out."""
    for index, (field, where, caps) in enumerate(rows):
        bar.update(1)
        path = local_file(images, field, where)
        if not os.path.isfile(path):
            stats["failed_to_download"] += 1
            continue
        try:
            data = encode(path, max_side)
        except OSError:
            stats["failed_to_resize"] += 1
            continue
        key = f"{shard:05d}{index:0{digits}d}"
        ext = "jpg" if data[:3] == b"\xff\xd8\xff" else os.path.splitext(path)[1].lstrip(".").lower() or "jpg"
        meta = {"key": key, field: where, "captions": caps, "caption": caps[0], "status": "success"}
        yield key, {ext: data, "txt": caps[0].encode("utf-8"), "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def build(images: str, captions: list[str], out: str, shard_size: int, max_side: int | None) -> dict[str, int]:
    """Write the shards; returns totals (samples written, images missing, unreadable)."""
    from qformer_lightning.data.shards import write_shard

    rows = read_rows(captions)
    os.makedirs(out, exist_ok=True)
    digits = max(4, len(str(shard_size - 1)))
    totals = {"shards": 0, "samples": 0, "missing": 0, "unreadable": 0}
    bar = tqdm(total=len(rows), desc="building shards", unit="img", disable=None)  # a terminal only
    for shard, lo in enumerate(range(0, len(rows), shard_size)):
        chunk = rows[lo : lo + shard_size]
        stats = {"count": len(chunk), "failed_to_download": 0, "failed_to_resize": 0}  # filled while writing
        samples = shard_samples(images, chunk, shard, digits, max_side, stats, bar)
        written = write_shard(os.path.join(out, f"{shard:05d}.tar"), samples, stats, mtime=int(time.time()))
        totals["shards"] += 1
        totals["samples"] += written
        totals["missing"] += stats["failed_to_download"]
        totals["unreadable"] += stats["failed_to_resize"]
    bar.close()
    return totals


def write_stats(tars: list[str]) -> None:
    """Count the samples (distinct keys) of existing tars and write their ``_stats.json``."""
    from qformer_lightning.data.shards import split_name, stats_url

    for path in tars:
        keys = set()
        with tarfile.open(path) as tar:
            for info in tar:
                parts = split_name(info.name) if info.isfile() else None
                if parts is not None:
                    keys.add(parts[0])
        with open(stats_url(path), "w") as f:
            json.dump({"count": len(keys), "successes": len(keys)}, f)
        print(f"{stats_url(path)}: {len(keys)} samples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="image folder the JSON paths are relative to")
    parser.add_argument("--captions", nargs="+", help="caption JSON file(s)")
    parser.add_argument("--out", help="output directory for NNNNN.tar + NNNNN_stats.json")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--max-side", type=int, default=None, help="re-encode images larger than this")
    parser.add_argument("--write-stats", nargs="+", metavar="TAR", help="only write stats files for these tars")
    args = parser.parse_args()
    if args.write_stats:
        write_stats(args.write_stats)
        return
    if not (args.images and args.captions and args.out):
        parser.error("--images, --captions and --out are required (or use --write-stats)")
    if not os.path.isdir(args.images):
        parser.error(f"image folder {args.images!r} does not exist")
    totals = build(args.images, args.captions, args.out, args.shard_size, args.max_side)
    print(f"{totals['shards']} shards, {totals['samples']} samples in {args.out}; "
          f"{totals['missing']} images not found, {totals['unreadable']} unreadable")


if __name__ == "__main__":
    main()
