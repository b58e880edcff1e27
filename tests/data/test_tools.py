"""tools/build_shards.py: shards from an image folder + caption JSON stream back the same data."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.text import pre_caption

ROOT = Path(__file__).resolve().parents[2]


def _build(images: Path, captions: Path, out: Path, shard_size: int) -> str:
    cmd = [sys.executable, str(ROOT / "tools/build_shards.py"), "--images", str(images),
           "--captions", str(captions), "--out", str(out), "--shard-size", str(shard_size)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout


def test_build_shards_from_folder_and_caption_json(corpus, tmp_path: Path) -> None:
    rows = json.loads(corpus.karpathy_split_json("train").read_text())[:40]  # 8 images x 5 captions
    rows.append({"image": "train/absent.jpg", "caption": "gone"})
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(rows))
    out = tmp_path / "shards"
    stdout = _build(corpus.image_root, captions, out, 4)
    assert "3 shards, 8 samples" in stdout and "1 images not found" in stdout
    stats = [json.loads((out / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in stats] == [4, 4, 0] and stats[2]["failed_to_download"] == 1

    dm = ShardDataModule(sources=[ShardSource(str(out / "*.tar"))], batch_size=8, num_workers=0, image_size=8,
                         caption_top_k=5)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    by_image: dict[str, list[str]] = {}
    for r in rows[:40]:
        by_image.setdefault(r["image"], []).append(pre_caption(r["caption"]))
    images = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(info).read())
                    images[f"{shard}#{meta['key']}"] = meta["image"]
    assert sorted(images.values()) == sorted(by_image)
    for key, text in zip(batch["key"], batch["text"]):
        assert text in by_image[images[key]]  # one of that image's own captions


def test_url_rows_are_found_by_file_name(corpus, tmp_path: Path) -> None:
    flat = tmp_path / "downloaded"
    flat.mkdir()
    (flat / "COCO_val_000000000121.jpg").write_bytes((corpus.image_root / "val/COCO_val_000000000121.jpg").read_bytes())
    captions = tmp_path / "capfilt.json"
    captions.write_text(json.dumps([
        {"url": "http://example.com/x/COCO_val_000000000121.jpg?size=l", "caption": ["best", "second", "third"]}]))
    stdout = _build(flat, captions, tmp_path / "out", 10)
    assert "1 shards, 1 samples" in stdout
    with tarfile.open(tmp_path / "out/00000.tar") as tar:
        meta = json.loads(tar.extractfile(tar.getmember("000000000.json")).read())
    assert meta["captions"] == ["best", "second", "third"] and meta["url"].startswith("http://")
