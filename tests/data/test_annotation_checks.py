"""Every entry of an annotation file is checked when the data module sets up: a bad entry is an
error naming the file, the entry (position and id) and the field, before any batch is drawn."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from qformer_lightning.data.annotations import AnnotationError, load_captions, load_vqa
from qformer_lightning.data.caption_datamodule import CaptionDataModule, CaptionSplit
from qformer_lightning.data.vqa_datamodule import VQADataModule, VQAFiles

KARPATHY = {"images": [  # COCO (cocoid) and Flickr (imgid only) entries
    {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "train", "cocoid": 42,
     "imgid": 0, "sentences": [{"raw": "A cat."}, {"raw": "A dog."}]},
    {"filename": "1000092795.jpg", "split": "train", "imgid": 1, "sentences": [{"raw": "Two men."}]},
]}
LAVIS = [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "A cat.", "image_id": "coco_42"},
         {"image": "flickr/7.jpg", "caption": ["One.", "Two."]}]
COCO = {"images": [{"id": 0, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],  # NoCaps val layout
        "annotations": [{"image_id": 0, "caption": "a", "id": 10}, {"image_id": 1, "caption": "b", "id": 11}]}
QUESTIONS = {"data_subtype": "train2014", "questions": [
    {"image_id": 42, "question": "What is it?", "question_id": 420},
    {"image_id": 43, "question": "Is it red?", "question_id": 430}]}
ANSWERS = {"annotations": [
    {"question_id": 420, "answers": [{"answer": "cat", "answer_id": i + 1} for i in range(10)]},
    {"question_id": 430, "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)]}]}
GQA = {"201307251": {"imageId": "n336443", "question": "Is it red?", "answer": "no"},
       "05451384": {"imageId": "2354786", "question": "Who?", "answer": "man"}}
BLIP = [{"question_id": 5, "image": "val2014/COCO_val2014_000000000042.jpg", "question": "What?", "answer": ["cat", "cat"]},
        {"image": "VG_100K/10.jpg", "question": "Where?", "answer": "tree"}]


def _write(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _edit(obj: object, edit) -> object:
    out = copy.deepcopy(obj)
    edit(out)
    return out


def _raises(call, *fragments: str) -> None:
    with pytest.raises(AnnotationError) as err:
        call()
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_the_good_files_read(tmp_path: Path) -> None:
    assert [r.image_id for r in load_captions(_write(tmp_path / "k.json", KARPATHY), ["train"])] == [42, 1000092795]
    assert [r.captions for r in load_captions(_write(tmp_path / "l.json", LAVIS))] == [["A cat."], ["One.", "Two."]]
    assert [r.captions for r in load_captions(_write(tmp_path / "c.json", COCO))] == [["a"], ["b"]]
    q, a = _write(tmp_path / "q.json", QUESTIONS), _write(tmp_path / "a.json", ANSWERS)
    assert [len(r.answers) for r in load_vqa(q, a, require_answers=True)] == [10, 10]
    assert [r.answers for r in load_vqa(_write(tmp_path / "g.json", GQA), format="gqa")] == [["no"], ["man"]]
    assert [r.answers for r in load_vqa(_write(tmp_path / "b.json", BLIP), format="blip")] == [["cat", "cat"], ["tree"]]


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d["images"][1]["sentences"][0].update(raw=None),
         ["images[1] (id 1)", "'sentences[0].raw' is null, expected a non-empty string"]),
        (lambda d: d["images"][0]["sentences"][1].pop("raw"), ["images[0] (id 42)", "'sentences[1].raw' is missing"]),
        (lambda d: d["images"][1].pop("sentences"), ["images[1] (id 1)", "'sentences' is missing"]),
        (lambda d: d["images"][0].update(sentences=[]), ["images[0] (id 42)", "'sentences' is an empty list"]),
        (lambda d: d["images"][0]["sentences"][0].update(raw="  "), ["'sentences[0].raw' is an empty string"]),
        (lambda d: d["images"][0].update(cocoid="forty-two"), ["images[0] (id 'forty-two')", "'cocoid'", "expected an integer id"]),
        (lambda d: d["images"][1].pop("filename"), ["images[1] (id 1)", "'filename' is missing"]),
        (lambda d: d["images"][1].pop("split"), ["images[1] (id 1)", "'split' is missing"]),
        (lambda d: d["images"].append("x.jpg"), ["images[2]: is the string 'x.jpg', expected an object"]),
    ],
)
def test_karpathy_coco_and_flickr_entries(tmp_path: Path, edit, fragments: list[str]) -> None:
    path = _write(tmp_path / "dataset_coco.json", _edit(KARPATHY, edit))
    _raises(lambda: load_captions(path, ["train"]), repr(path), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d[1].pop("caption"), ["entry 1 (id 'flickr/7.jpg')", "'caption' is missing"]),
        (lambda d: d[0].update(caption=""), ["entry 0 (id 'coco_42')", "'caption' is an empty string"]),
        (lambda d: d[1].update(caption=["One.", None]), ["entry 1", "'caption[1]' is null"]),
        (lambda d: d[1].update(caption=[]), ["entry 1", "'caption' is an empty list"]),
        (lambda d: d[0].update(image=5), ["entry 0", "'image' is the number 5"]),
        (lambda d: d[0].update(image_id=[42]), ["entry 0", "'image_id' is a list of 1"]),
    ],
)
def test_lavis_lists(tmp_path: Path, edit, fragments: list[str]) -> None:
    path = _write(tmp_path / "coco_karpathy_train.json", _edit(LAVIS, edit))
    _raises(lambda: load_captions(path), repr(path), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d["annotations"][1].update(image_id=7), ["annotations[1] (id 11)", "'image_id' is 7, which no entry of 'images' has"]),
        (lambda d: d["annotations"][0].update(caption=""), ["annotations[0] (id 10)", "'caption' is an empty string"]),
        (lambda d: d["annotations"][0].pop("image_id"), ["annotations[0] (id 10)", "'image_id' is missing"]),
        (lambda d: d["images"][1].update(id=0), ["images[1] (id 0)", "repeats image id 0"]),
        (lambda d: d["images"][0].pop("file_name"), ["images[0] (id 0)", "'file_name' is missing"]),
        (lambda d: d.update(annotations={}), ["annotations is an object, expected a list of entries"]),
    ],
)
def test_coco_format_nocaps(tmp_path: Path, edit, fragments: list[str]) -> None:
    path = _write(tmp_path / "nocaps_val.json", _edit(COCO, edit))
    _raises(lambda: load_captions(path), repr(path), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d["annotations"][1].update(answers=[]), ["annotations[1] (id 430)", "'answers' is an empty list"]),
        (lambda d: d["annotations"][0]["answers"][3].pop("answer"), ["annotations[0] (id 420)", "'answers[3].answer' is missing"]),
        (lambda d: d["annotations"][0]["answers"][3].update(answer=3), ["'answers[3].answer' is the number 3, expected a string"]),
        (lambda d: d["annotations"][1].pop("question_id"), ["annotations[1]", "'question_id' is missing"]),
        (lambda d: d["annotations"][1].update(question_id=420), ["annotations[1] (id 420)", "repeats question id 420"]),
    ],
)
def test_vqav2_and_okvqa_annotations(tmp_path: Path, edit, fragments: list[str]) -> None:
    q = _write(tmp_path / "questions.json", QUESTIONS)
    a = _write(tmp_path / "mscoco_train2014_annotations.json", _edit(ANSWERS, edit))
    _raises(lambda: load_vqa(q, a), repr(a), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d["questions"][0].update(question=None), ["questions[0] (id 420)", "'question' is null"]),
        (lambda d: d["questions"][1].pop("image_id"), ["questions[1] (id 430)", "'image_id' is missing"]),
        (lambda d: d["questions"][1].update(question_id="q"), ["questions[1] (id 'q')", "expected an integer id"]),
    ],
)
def test_vqav2_questions(tmp_path: Path, edit, fragments: list[str]) -> None:
    q = _write(tmp_path / "questions.json", _edit(QUESTIONS, edit))
    _raises(lambda: load_vqa(q), repr(q), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments", "train"),
    [
        (lambda d: d["05451384"].pop("question"), ["entry 1 (id '05451384')", "'question' is missing"], False),
        (lambda d: d["201307251"].update(imageId=None), ["entry 0 (id '201307251')", "'imageId' is null"], False),
        (lambda d: d["201307251"].update(answer=["no"]), ["entry 0", "'answer' is a list of 1, expected a non-empty string"], False),
        (lambda d: d["05451384"].pop("answer"), ["entry 1 (id '05451384')", "'answer' is missing"], True),
    ],
)
def test_gqa(tmp_path: Path, edit, fragments: list[str], train: bool) -> None:
    path = _write(tmp_path / "train_balanced_questions.json", _edit(GQA, edit))
    _raises(lambda: load_vqa(path, format="gqa", require_answers=train), repr(path), *fragments)


@pytest.mark.parametrize(
    ("edit", "fragments", "train"),
    [
        (lambda d: d[0].update(answer=[]), ["entry 0 (id 5)", "'answer' is an empty list"], False),
        (lambda d: d[1].pop("question"), ["entry 1 (id 'VG_100K/10.jpg')", "'question' is missing"], False),
        (lambda d: d[1].pop("answer"), ["entry 1", "'answer' is missing"], True),
    ],
)
def test_blip_vqa_lists(tmp_path: Path, edit, fragments: list[str], train: bool) -> None:
    path = _write(tmp_path / "vqa_train.json", _edit(BLIP, edit))
    _raises(lambda: load_vqa(path, format="blip", require_answers=train), repr(path), *fragments)


def test_short_answer_lists_are_accepted_and_counted_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def shorten(d: dict) -> None:
        d["annotations"][0]["answers"] = d["annotations"][0]["answers"][:3]
        d["annotations"][1]["answers"] = d["annotations"][1]["answers"][:1]
    q = _write(tmp_path / "questions.json", QUESTIONS)
    a = _write(tmp_path / "okvqa_annotations.json", _edit(ANSWERS, shorten))
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.data.annotations"):
        records = load_vqa(q, a)
    assert [len(r.answers) for r in records] == [3, 1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "qformer_lightning.data.annotations"]
    assert len(warnings) == 1 and repr(a) in warnings[0] and "2 of 2 questions have fewer than 10 answers" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.data.annotations"):
        load_vqa(q, _write(tmp_path / "full.json", ANSWERS))
    assert not caplog.records


def test_training_questions_need_answers(tmp_path: Path) -> None:
    q = _write(tmp_path / "questions.json", QUESTIONS)
    assert [r.answers for r in load_vqa(q)] == [[], []]  # test-dev: no answers
    with pytest.raises(ValueError, match="need answers"):
        load_vqa(q, require_answers=True)


def test_caption_datamodule_fails_at_setup(tmp_path: Path) -> None:
    """`"raw": null` once passed setup and killed the fit in a loader worker with an AttributeError."""
    path = _write(tmp_path / "dataset_coco.json", _edit(KARPATHY, lambda d: d["images"][1]["sentences"][0].update(raw=None)))
    dm = CaptionDataModule(train=CaptionSplit(path, str(tmp_path), ["train"]), num_workers=0, check_images=False)
    _raises(lambda: dm.setup("fit"), repr(path), "images[1] (id 1)", "'sentences[0].raw' is null")


def test_vqa_datamodule_fails_at_setup(tmp_path: Path) -> None:
    """VQAv2 `answers: []` once passed setup and failed at step 3; a training file without answers too."""
    q = _write(tmp_path / "questions.json", QUESTIONS)
    a = _write(tmp_path / "annotations.json", _edit(ANSWERS, lambda d: d["annotations"][1].update(answers=[])))
    dm = VQADataModule(train=[VQAFiles(q, str(tmp_path), a)], num_workers=0, check_images=False)
    _raises(lambda: dm.setup("fit"), repr(a), "annotations[1] (id 430)", "'answers' is an empty list")
    dm = VQADataModule(train=[VQAFiles(q, str(tmp_path))], num_workers=0, check_images=False)
    with pytest.raises(ValueError, match="need answers"):
        dm.setup("fit")
