"""Annotation formats and the caption / VQA data modules."""

import json
from pathlib import Path

import pytest
import torch

from qformer_lightning.data.annotations import id_from_filename, load_captions, load_vqa
from qformer_lightning.data.caption_datamodule import CaptionDataModule, CaptionSplit
from qformer_lightning.data.vqa_datamodule import VQADataModule, VQAFiles


def _write(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_karpathy_original_format_selects_splits(tmp_path: Path) -> None:
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "cocoid": 391895,
         "sentences": [{"raw": "A man."}, {"raw": "A bike."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "restval", "cocoid": 9,
         "sentences": [{"raw": "Food."}]},
        {"filename": "1000092795.jpg", "split": "train", "imgid": 0, "sentences": [{"raw": "Two men."}]},
    ]}
    path = _write(tmp_path / "dataset.json", data)
    test = load_captions(path, ["test"])
    assert [(r.image, r.image_id, r.captions) for r in test] == [
        ("val2014/COCO_val2014_000000391895.jpg", 391895, ["A man.", "A bike."])]
    train = load_captions(path, ["train", "restval"])
    assert [(r.image, r.image_id) for r in train] == [
        ("train2014/COCO_train2014_000000000009.jpg", 9), ("1000092795.jpg", 1000092795)]
    with pytest.raises(ValueError, match="no image with split"):
        load_captions(path, ["nope"])


def test_lavis_and_coco_formats(tmp_path: Path) -> None:
    lavis_train = _write(tmp_path / "train.json", [
        {"caption": "a b", "image": "val2014/COCO_val2014_000000000042.jpg", "image_id": "coco_42"},
        {"caption": "c d", "image": "val2014/COCO_val2014_000000000042.jpg", "image_id": "coco_42"},
        {"caption": "e", "image": "flickr/77.jpg", "image_id": 5},
    ])
    records = load_captions(lavis_train)
    assert [(r.image_id, r.captions) for r in records] == [(42, ["a b", "c d"]), (5, ["e"])]
    lavis_test = _write(tmp_path / "test.json", [{"image": "val/0013ea2087020901.jpg", "caption": ["x", "y"]}])
    (record,) = load_captions(lavis_test)
    assert record.captions == ["x", "y"] and record.image_id == id_from_filename("val/0013ea2087020901.jpg")
    nocaps = _write(tmp_path / "nocaps.json", {
        "images": [{"id": 0, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "b1", "id": 0}, {"image_id": 0, "caption": "a1", "id": 1},
                        {"image_id": 1, "caption": "b2", "id": 2}],
    })
    assert [(r.image, r.image_id, r.captions) for r in load_captions(nocaps)] == [
        ("a.jpg", 0, ["a1"]), ("b.jpg", 1, ["b1", "b2"])]


def test_vqa_formats(tmp_path: Path) -> None:
    questions = _write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What is it?", "question_id": 420}]})
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["cat"] * 9 + ["dog"])]
    annotations = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers, "multiple_choice_answer": "cat"}]})
    (q,) = load_vqa(questions, annotations)
    assert (q.question_id, q.image, q.image_id, q.answers) == (
        420, "val2014/COCO_val2014_000000000042.jpg", 42, ["cat"] * 9 + ["dog"])
    (test,) = load_vqa(questions)
    assert test.answers == []
    gqa = _write(tmp_path / "gqa.json", {"201307251": {"imageId": "n336443", "question": "Is it red?", "answer": "no"},
                                         "05451384": {"imageId": "2354786", "question": "Who?", "answer": "man"}})
    records = load_vqa(gqa, format="gqa")
    assert [(r.question_id, r.image, r.answers) for r in records] == [
        (201307251, "n336443.jpg", ["no"]), (5451384, "2354786.jpg", ["man"])]
    assert records[1].image_id == 2354786
    vg = _write(tmp_path / "vg.json", [{"dataset": "vg", "image": "VG_100K/10.jpg", "question": "What?", "answer": ["tree"]}])
    (r,) = load_vqa(vg, format="blip")
    assert r.answers == ["tree"] and r.image_id == 10
    with pytest.raises(ValueError, match="not a VQAv2 annotations"):
        load_vqa(questions, questions)


def test_caption_datamodule_on_the_synthetic_corpus(corpus) -> None:
    root = str(corpus.image_root)
    dm = CaptionDataModule(
        train=CaptionSplit(str(corpus.karpathy_json), root, ["train"]),
        test=CaptionSplit(str(corpus.karpathy_split_json("test")), root),
        batch_size=8, eval_batch_size=5, num_workers=0, image_size=16,
    )
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 120 * 5 // 8 and train[0]["image"].shape == (8, 3, 16, 16)
    test_set = dm.eval_dataset("test")
    assert len(test_set) == 16 and len(test_set.texts) == 80
    assert test_set.img2txt[3] == [15, 16, 17, 18, 19] and test_set.txt2img[17] == 3
    batches = list(dm.test_dataloader())
    assert [len(b["key"]) for b in batches] == [5, 5, 5, 1]
    ids = torch.cat([b["image_id"] for b in batches]).tolist()
    assert ids == test_set.image_ids == list(range(145, 161))  # COCO-style ids of the test images
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(16))
    assert test_set.references[0][0].endswith(".")  # raw references for the caption metrics


def test_missing_image_root_is_an_error_at_setup(corpus, tmp_path: Path) -> None:
    dm = CaptionDataModule(test=CaptionSplit(str(corpus.karpathy_split_json("test")), str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.setup("test")
    dm = CaptionDataModule(test=CaptionSplit(str(corpus.karpathy_split_json("test")), str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="16 of 16 images are missing"):
        dm.setup("test")


def test_vqa_datamodule_on_the_synthetic_corpus(corpus) -> None:
    root = str(corpus.image_root)
    train = [VQAFiles(str(corpus.vqa_questions("train")), root, str(corpus.vqa_annotations("train")))]
    val = VQAFiles(str(corpus.vqa_questions("val")), root, str(corpus.vqa_annotations("val")))
    dm = VQADataModule(train=train, val=val, batch_size=6, num_workers=0, image_size=16)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    raw = json.loads(corpus.vqa_questions("val").read_text())["questions"][:6]
    assert batch["question_id"].tolist() == [q["question_id"] for q in raw]
    assert batch["text"][0] == raw[0]["question"].lower()
    assert all(len(a) == 10 for a in batch["answers"])
    assert batch["image_id"].tolist() == [q["image_id"] for q in raw]
    assert len(list(dm.train_dataloader())) == len(dm.eval_dataset("train")) // 6
