"""``predict`` counts and names what it skips, once per file: an unreadable image is warned about once
and counted once however many requests name it and however many loader workers read them; the files
of an image folder that are not images are listed in the final report by reason."""

from __future__ import annotations

import json
import logging

import pytest
from predict_tiny import read_jsonl, run_predict, stage1_config, write_config, write_images

from qformer_lightning.callbacks import JsonlPredictionWriter
from qformer_lightning.callbacks.prediction_writer import UnreadableImages, merge_parts, skip_report
from qformer_lightning.data.predict import NOT_AN_IMAGE, SUB_FOLDER, scan_images, summarize_skips

TEXTS = ["a dog", "a red boat", "two circles"]  # 3 requests per image, over batches of 2: split across workers


def _folder(tmp_path):
    """3 good images, 1 corrupt JPEG, 1 text file."""
    photos = tmp_path / "photos"
    good = write_images(photos, 3)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a truncated jpeg")
    (photos / "notes.txt").write_text("not a picture")
    return photos, good


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_corrupt_jpeg_and_one_text_file_are_each_reported_once(tmp_path, caplog, num_workers: int) -> None:
    photos, good = _folder(tmp_path)
    config = write_config(tmp_path / "s1.yaml", stage1_config())
    out = tmp_path / "scores.jsonl"
    with caplog.at_level(logging.INFO):
        cli = run_predict(config, "--data.images", str(photos), "--data.texts", json.dumps(TEXTS), "--data.batch_size", "2",
                          "--data.num_workers", str(num_workers), "--trainer.callbacks.init_args.output", str(out))

    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "qformer_lightning.data.predict"]
    broken, notes = str(photos / "broken.jpg"), str(photos / "notes.txt")
    assert [w for w in warnings if broken in w] == [f"skipping image {broken}: bad_image: OSError: Truncated File Read "
                                                    "(its requests get an output line with 'error')"]
    assert [w for w in warnings if notes in w] == [
        f"not predicting for these entries of the image folders: not an image: 1 ({notes})"]
    assert len(warnings) == 2

    lines = read_jsonl(out)
    answered = [line for line in lines if "error" not in line]
    assert [(line["image"], line["text"]) for line in answered] == [(str(p), t) for p in sorted(good) for t in TEXTS]
    assert all("itc" in line for line in answered)
    assert [(line["image"], line["text"]) for line in lines if "error" in line] == [(broken, t) for t in TEXTS]
    assert not any(line["image"] == notes for line in lines)

    writer = next(c for c in cli.trainer.callbacks if isinstance(c, JsonlPredictionWriter))
    expected = (f"wrote 12 prediction line(s) to {out}, 3 of them with 'error' (requests on unreadable images); "
                f"skipped 2 file(s): unreadable image: 1 ({broken}); not an image: 1 ({notes})")
    assert writer.report == expected
    assert expected in caplog.text


def test_folder_listing_keeps_what_it_leaves_out(tmp_path) -> None:
    photos, good = _folder(tmp_path)
    (photos / "sub").mkdir()
    write_images(photos / "sub", 1)
    for i in range(4):
        (photos / f"extra{i}.csv").write_text("x")
    listing = scan_images(str(photos))
    assert listing.images == sorted([str(photos / "broken.jpg"), *map(str, good)])
    assert listing.skipped == {NOT_AN_IMAGE: sorted(str(photos / n) for n in ["notes.txt", *(f"extra{i}.csv" for i in range(4))]),
                               SUB_FOLDER: [str(photos / "sub")]}
    assert summarize_skips(listing.skipped, examples=2) == (
        f"not an image: 5 ({photos}/extra0.csv, {photos}/extra1.csv, ...); sub-folder (recursive: false): 1 ({photos}/sub)")
    recursive = scan_images(str(photos), recursive=True)
    assert str(photos / "sub" / "img0.png") in recursive.images and SUB_FOLDER not in recursive.skipped


def test_unreadable_images_are_counted_by_file_across_rank_parts(tmp_path) -> None:
    """Under DDP rank 0 counts from the merged file: a padding repeat is dropped, each image counted once per reason."""
    def line(index: int, image: str, error: str | None = None) -> str:
        return json.dumps({"index": index, "image": image, **({"error": error} if error else {"output": "x"})}) + "\n"

    (tmp_path / "p.rank0").write_text(line(0, "a.jpg", "bad_image: truncated") + line(2, "b.png"))
    (tmp_path / "p.rank1").write_text(line(1, "a.jpg", "bad_image: truncated") + line(3, "c.png", "missing_image: gone")
                                      + line(0, "a.jpg", "bad_image: truncated"))  # 0: the sampler's padding repeat
    merge_parts([tmp_path / "p.rank0", tmp_path / "p.rank1"], tmp_path / "p")
    tally = UnreadableImages.from_jsonl(tmp_path / "p")
    assert tally.num_lines == 3 and tally.files() == {"bad_image": ["a.jpg"], "missing_image": ["c.png"]}
    assert skip_report(tally, {NOT_AN_IMAGE: ["n.txt"]}) == (
        ", 3 of them with 'error' (requests on unreadable images); "
        "skipped 3 file(s): unreadable image: 1 (a.jpg); missing image: 1 (c.png); not an image: 1 (n.txt)")
    assert skip_report(UnreadableImages(), {}) == ""
