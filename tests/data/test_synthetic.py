"""The synthetic corpus: deterministic, consistent across its formats, captions match scenes."""

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer_lightning.data.synthetic import COLOURS, make_synthetic_corpus


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_and_reused(tmp_path: Path) -> None:
    a = make_synthetic_corpus(tmp_path / "a", num_train=30, num_val=6, num_test=6, image_size=32, shard_size=10)
    b = make_synthetic_corpus(tmp_path / "b", num_train=30, num_val=6, num_test=6, image_size=32, shard_size=10)
    assert _digest(a.root) == _digest(b.root)
    again = make_synthetic_corpus(tmp_path / "a", num_train=30, num_val=6, num_test=6, image_size=32, shard_size=10)
    assert again.root == a.root
    with pytest.raises(FileExistsError, match="not a synthetic corpus"):
        make_synthetic_corpus(tmp_path / "a", num_train=31, image_size=32)


def test_formats_agree(corpus) -> None:
    karpathy = json.loads(corpus.karpathy_json.read_text())["images"]
    assert [sum(im["split"] == s for im in karpathy) for s in ("train", "val", "test")] == [120, 24, 16]
    assert all(len(im["sentences"]) == 5 for im in karpathy)
    test_list = json.loads(corpus.karpathy_split_json("test").read_text())
    by_path = {f"{im['filepath']}/{im['filename']}": im for im in karpathy}
    assert all(entry["caption"] == [s["raw"] for s in by_path[entry["image"]]["sentences"]] for entry in test_list)
    questions = json.loads(corpus.vqa_questions("val").read_text())
    annotations = json.loads(corpus.vqa_annotations("val").read_text())
    assert questions["data_subtype"] == "val" and len(questions["questions"]) == len(annotations["annotations"])
    assert all(len(a["answers"]) == 10 for a in annotations["annotations"])
    shard = Path(corpus.shards("train")).parent / "00000.tar"
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[2]).read())
    assert names[:3] == [f"{meta['key']}.jpg", f"{meta['key']}.txt", f"{meta['key']}.json"]
    # all five caption templates, as in the Karpathy split (the test split uses all five)
    assert meta["captions"] == [s["raw"] for s in next(im for im in karpathy if im["cocoid"] == meta["image_id"])["sentences"]]
    stats = json.loads((shard.parent / "00000_stats.json").read_text())
    assert stats["successes"] == 20


def test_captions_and_answers_describe_the_pixels(corpus) -> None:
    """The colour named by the first caption is the dominant non-background colour."""
    karpathy = json.loads(corpus.karpathy_json.read_text())["images"][:30]
    for im in karpathy:
        pixels = np.asarray(Image.open(corpus.image_root / im["filepath"] / im["filename"]).convert("RGB"), dtype=float)
        saturated = pixels[(pixels.max(-1) - pixels.min(-1)) > 80]  # shape pixels (background is grey)
        mean = saturated.mean(0)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - mean).sum())
        assert nearest in im["sentences"][0]["raw"].lower()
    annotations = json.loads(corpus.vqa_annotations("train").read_text())["annotations"]
    questions = {q["question_id"]: q for q in json.loads(corpus.vqa_questions("train").read_text())["questions"]}
    by_id = {im["cocoid"]: im for im in json.loads(corpus.karpathy_json.read_text())["images"]}
    for a in annotations[:50]:
        q = questions[a["question_id"]]["question"]
        caption = by_id[a["image_id"]]["sentences"][0]["raw"].lower()
        if q.startswith("What color"):
            assert a["multiple_choice_answer"] in caption
        if q.startswith("How many"):
            words = {"1": "a ", "2": "two", "3": "three"}
            assert caption.startswith(words[a["multiple_choice_answer"]])
