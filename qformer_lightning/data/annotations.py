"""Readers of the public caption and VQA annotation formats into plain records.

Captions (:func:`load_captions`), one :class:`CaptionImage` per image, format detected:

- Karpathy's original ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``{"images": [{"split",
  "filepath"?, "filename", "sentences": [{"raw"}], "cocoid"?, "imgid"}]}``; select ``splits``
  (COCO Karpathy train is ``["train", "restval"]``).
- BLIP/LAVIS lists (``coco_karpathy_{train,val,test}.json``, ``flickr30k_*.json``,
  ``nocaps_val.json``): ``[{"image": path, "caption": str | [str], "image_id"?}]``.
- COCO caption format (NoCaps val, ``captions_val2014.json``): ``{"images": [{"id",
  "file_name"}], "annotations": [{"image_id", "caption"}]}``.

Image ids: the COCO id where the format has one (``cocoid``, ``id``); else an integer
``image_id`` / ``img_id`` field or the digits of ``coco_391895``-style ids; else the file name
when it is ``123.jpg`` or ``..._000000391895.jpg``; else a stable hash of the path.

VQA (:func:`load_vqa`), one :class:`VQAQuestion` per question:

- ``vqav2``: the official questions JSON (+ annotations JSON when answers are known); also OK-VQA,
  which uses the same format. Image paths from ``image_template`` and the file's ``data_subtype``.
- ``gqa``: GQA's ``{qid: {"imageId", "question", "answer"?}}`` (images ``{imageId}.jpg``).
- ``blip``: BLIP's lists (``vqa_train.json``, ``vg_qa.json``): ``[{"image", "question",
  "answer": str | [str], "question_id"?}]``.

Every entry is checked when the file is read (at the data module's setup, before training):
each field's presence and type, non-empty captions and questions, non-empty answer lists, caption
ids that name an image of the file, no repeated ids. A bad entry raises :class:`AnnotationError`
naming the file, the entry (position and id) and the field. VQAv2 / OK-VQA answer lists shorter
than 10 are accepted and counted in one warning per file (the accuracy uses the answers given).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qformer_lightning.data.batch import stable_id

log = logging.getLogger(__name__)

VQAFormat = Literal["vqav2", "gqa", "blip"]
VQAV2_ANSWERS = 10
"""Human answers per question in VQAv2 and OK-VQA."""
_PREFIXED_ID = re.compile(r"^(?:[A-Za-z]+_)?(\d+)$")
_COCO_STEM = re.compile(r"_(\d+)$")


@dataclass
class CaptionImage:
    """An image and its reference captions (raw, as annotated)."""

    image: str  # path relative to the image root
    image_id: int
    captions: list[str]


@dataclass
class VQAQuestion:
    """A question about an image, with its human answers (empty when unknown, e.g. test-dev)."""

    question_id: int
    image: str  # path relative to the image root
    image_id: int
    question: str  # raw
    answers: list[str]


class AnnotationError(ValueError):
    """A bad entry of an annotation file; the message names the file, the entry and the field."""


def describe(value: object) -> str:
    """A JSON value as an error message shows it: ``null``, ``an empty string``, ``the number 3``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {len(value)}"
    return "an object" if isinstance(value, dict) else type(value).__name__


@dataclass(frozen=True)
class Entry:
    """One entry (JSON object) of an annotation file, read field by field.

    A missing or mistyped field raises :class:`AnnotationError` naming the file, the entry and
    the field. A field that is ``null`` counts as missing.

    Attributes:
        path: the annotation file.
        where: the entry's place in the file, e.g. ``images[3]``.
        id: the entry's id as written (shown in messages), if it has one.
        data: the entry.
        prefix: the field prefix of an object nested in the entry (``sentences[1].``).
    """

    path: str
    where: str
    id: object
    data: dict
    prefix: str = ""

    def error(self, field: str, problem: str) -> AnnotationError:
        """The error for ``field`` of this entry (``problem``: what is wrong with it)."""
        ident = f" (id {self.id!r})" if self.id is not None else ""
        return AnnotationError(f"annotation file {self.path!r}, {self.where}{ident}: field {self.prefix + field!r} {problem}")

    def _value(self, field: str, expected: str, optional: bool) -> object:
        value = self.data.get(field)
        if value is None and not optional:
            raise self.error(field, f"is {'null' if field in self.data else 'missing'}, expected {expected}")
        return value

    def text(self, field: str, optional: bool = False) -> str | None:
        """A non-empty string (``None`` when optional and absent)."""
        value = self._value(field, "a non-empty string", optional)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise self.error(field, f"is {describe(value)}, expected a non-empty string")
        return value

    def string(self, field: str) -> str:
        """A string, possibly empty."""
        value = self._value(field, "a string", False)
        if not isinstance(value, str):
            raise self.error(field, f"is {describe(value)}, expected a string")
        return value

    def integer(self, field: str, optional: bool = False) -> int | None:
        """An integer id: ``123``, ``"123"`` or ``"coco_123"`` (``None`` when optional and absent)."""
        value = self._value(field, "an integer id", optional)
        if value is None:
            return None
        number = id_from_value(value)
        if number is None:
            raise self.error(field, f"is {describe(value)}, expected an integer id")
        return number

    def identifier(self, field: str, optional: bool = False) -> str | int | None:
        """A non-empty string or an integer (``None`` when optional and absent)."""
        value = self._value(field, "a string or integer id", optional)
        if value is None:
            return None
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip())):
            raise self.error(field, f"is {describe(value)}, expected a non-empty string or an integer id")
        return value

    def texts(self, field: str, optional: bool = False) -> list[str] | None:
        """A non-empty string or a non-empty list of them (``None`` when optional and absent)."""
        value = self._value(field, "a non-empty string or a list of them", optional)
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(field, "is an empty list, expected a non-empty string or a list of them")
        for i, item in enumerate(items):
            if not (isinstance(item, str) and item.strip()):
                at = f"[{i}]" if isinstance(value, list) else ""
                raise self.error(field + at, f"is {describe(item)}, expected a non-empty string")
        return items

    def objects(self, field: str) -> list[Entry]:
        """A non-empty list of objects, each as an :class:`Entry` of this entry (``field[i].`` prefix)."""
        value = self._value(field, "a non-empty list of objects", False)
        if not isinstance(value, list) or not value:
            raise self.error(field, f"is {describe(value)}, expected a non-empty list of objects")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{field}[{i}]", f"is {describe(item)}, expected an object")
            out.append(Entry(self.path, self.where, self.id, item, f"{self.prefix}{field}[{i}]."))
        return out


def entries(path: object, items: object, where: str, id_fields: tuple[str, ...] = ()) -> Iterator[Entry]:
    """The objects of the list ``items`` (the file's ``where``: ``images``, ``annotations``, ``""`` for
    the top level) as :class:`Entry`; the id shown is the first of ``id_fields`` the entry has.

    Raises:
        AnnotationError: ``items`` is not a list, or one of them is not an object.
    """
    name = where or "the top level"
    if not isinstance(items, list):
        raise AnnotationError(f"annotation file {str(path)!r}: {name} is {describe(items)}, expected a list of entries")
    for i, item in enumerate(items):
        place = f"{where}[{i}]" if where else f"entry {i}"
        if not isinstance(item, dict):
            raise AnnotationError(f"annotation file {str(path)!r}, {place}: is {describe(item)}, expected an object")
        ident = next((item[k] for k in id_fields if item.get(k) is not None), None)
        yield Entry(str(path), place, ident, item)


def _read_json(path: str | os.PathLike) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"annotation file {str(path)!r} does not exist") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"annotation file {str(path)!r} is not valid UTF-8 JSON: {err}") from err


def id_from_value(value: object) -> int | None:
    """An integer id from ``123``, ``"123"`` or ``"coco_123"``; ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _PREFIXED_ID.match(value)
        if match:
            return int(match.group(1))
    return None


def id_from_filename(path: str) -> int:
    """``123.jpg`` -> 123, ``COCO_val2014_000000391895.jpg`` -> 391895, else a stable hash of the path."""
    stem = Path(path).stem
    if stem.isdigit():
        return int(stem)
    match = _COCO_STEM.search(stem)
    return int(match.group(1)) if match else stable_id(path)


def load_captions(path: str | os.PathLike, splits: list[str] | None = None) -> list[CaptionImage]:
    """Read and check a caption annotation file (module docstring) into one record per image.

    Raises:
        AnnotationError: a bad entry (named with its field).
        ValueError: not a caption file of a known format, or no image in ``splits``.
    """
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" in data:
        if splits:
            raise ValueError(f"{path}: a COCO-format caption file has no splits, got splits={splits}")
        return _coco_format(data, path)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _karpathy(data, splits, path)
    if isinstance(data, list):
        if splits:
            raise ValueError(f"{path}: a BLIP/LAVIS list file is one split already, got splits={splits}")
        return _lavis(data, path)
    raise ValueError(f"{path}: not a Karpathy, COCO or BLIP/LAVIS caption file")


def _karpathy(data: dict, splits: list[str] | None, path: object) -> list[CaptionImage]:
    out = []
    for entry in entries(path, data["images"], "images", ("cocoid", "imgid", "filename")):
        split = entry.text("split", optional=not splits)
        if splits and split not in splits:
            continue
        filepath, filename = entry.text("filepath", optional=True), entry.text("filename")
        rel = f"{filepath}/{filename}" if filepath else filename
        cocoid = entry.integer("cocoid", optional=True)
        captions = [sentence.text("raw") for sentence in entry.objects("sentences")]
        out.append(CaptionImage(rel, cocoid if cocoid is not None else id_from_filename(rel), captions))
    if not out:
        raise ValueError(f"{path}: no image with split in {splits}")
    return out


def _coco_format(data: dict, path: object) -> list[CaptionImage]:
    images: dict[int, CaptionImage] = {}
    for entry in entries(path, data["images"], "images", ("id",)):
        image_id = entry.integer("id")
        if image_id in images:
            raise entry.error("id", f"repeats image id {image_id} of an earlier entry of 'images'")
        images[image_id] = CaptionImage(entry.text("file_name"), image_id, [])
    for entry in entries(path, data["annotations"], "annotations", ("id",)):
        image_id = entry.integer("image_id")
        if image_id not in images:
            raise entry.error("image_id", f"is {image_id}, which no entry of 'images' has")
        images[image_id].captions.append(entry.text("caption"))
    return list(images.values())


def _lavis(data: list, path: object) -> list[CaptionImage]:
    by_image: dict[str, CaptionImage] = {}
    for entry in entries(path, data, "", ("image_id", "img_id", "image")):
        rel = entry.text("image")
        captions = entry.texts("caption")
        given = [entry.identifier(k, optional=True) for k in ("image_id", "img_id")]
        if rel not in by_image:
            parsed = next((id_from_value(g) for g in given if g is not None), None)
            by_image[rel] = CaptionImage(rel, parsed if parsed is not None else id_from_filename(rel), [])
        by_image[rel].captions.extend(captions)
    return list(by_image.values())


def load_vqa(
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    format: VQAFormat = "vqav2",
    image_template: str = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg",
    require_answers: bool = False,
) -> list[VQAQuestion]:
    """Read and check VQA questions (and answers) in one of the formats of the module docstring.

    Args:
        require_answers: every question must have answers (training); otherwise questions
            without them get an empty list (test-dev).

    Raises:
        AnnotationError: a bad entry (named with its field).
        ValueError: not a file of ``format``; questions without answers (VQAv2 annotations, or
            ``require_answers``).
    """
    if format == "vqav2":
        return _vqav2(questions, annotations, image_template, require_answers)
    if annotations is not None:
        raise ValueError(f"format {format!r} keeps answers in the questions file; got annotations={annotations}")
    if format == "gqa":
        return _gqa(questions, require_answers)
    if format == "blip":
        return _blip_vqa(questions, require_answers)
    raise ValueError(f"unknown VQA format {format!r}; expected 'vqav2', 'gqa' or 'blip'")


def _vqav2_answers(annotations: object) -> dict[int, list[str]]:
    """Question id -> human answers, from a VQAv2 / OK-VQA annotations file; short lists are counted
    in one warning."""
    ann = _read_json(annotations)
    if not isinstance(ann, dict) or "annotations" not in ann:
        raise ValueError(f"{annotations}: not a VQAv2 annotations file (no 'annotations')")
    answers: dict[int, list[str]] = {}
    for entry in entries(annotations, ann["annotations"], "annotations", ("question_id",)):
        qid = entry.integer("question_id")
        if qid in answers:
            raise entry.error("question_id", f"repeats question id {qid} of an earlier entry")
        answers[qid] = [answer.string("answer") for answer in entry.objects("answers")]
    short = sum(len(a) < VQAV2_ANSWERS for a in answers.values())
    if short:
        log.warning(
            "annotation file %r: %d of %d questions have fewer than %d answers (accepted: their accuracy "
            "uses the answers given)", str(annotations), short, len(answers), VQAV2_ANSWERS,
        )
    return answers


def _vqav2(questions: object, annotations: object, template: str, require_answers: bool) -> list[VQAQuestion]:
    data = _read_json(questions)
    if not isinstance(data, dict) or "questions" not in data:
        raise ValueError(f"{questions}: not a VQAv2 questions file (no 'questions')")
    subtype = data.get("data_subtype", "")
    if not isinstance(subtype, str):
        raise AnnotationError(f"annotation file {str(questions)!r}: 'data_subtype' is {describe(subtype)}, expected a string")
    if annotations is None and require_answers:
        raise ValueError(f"{questions}: these questions need answers (training): give their annotations file")
    answers = _vqav2_answers(annotations) if annotations is not None else {}
    out, missing, seen = [], [], set()
    for entry in entries(questions, data["questions"], "questions", ("question_id",)):
        qid, image_id, question = entry.integer("question_id"), entry.integer("image_id"), entry.text("question")
        if qid in seen:
            raise entry.error("question_id", f"repeats question id {qid} of an earlier entry")
        seen.add(qid)
        if annotations is not None and qid not in answers:
            missing.append(qid)
        out.append(VQAQuestion(qid, template.format(subtype=subtype, image_id=image_id), image_id, question, answers.get(qid, [])))
    if missing:
        raise ValueError(f"{annotations}: no answers for {len(missing)} questions, e.g. {missing[:5]}")
    return out


def _gqa(path: object, require_answers: bool) -> list[VQAQuestion]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a GQA questions file (expected an object keyed by question id)")
    out = []
    for i, (qid, q) in enumerate(data.items()):
        if not isinstance(q, dict):
            raise AnnotationError(f"annotation file {str(path)!r}, entry {i} (id {qid!r}): is {describe(q)}, expected an object")
        entry = Entry(str(path), f"entry {i}", qid, q)
        image = str(entry.identifier("imageId"))
        answer = entry.text("answer", optional=not require_answers)
        out.append(VQAQuestion(
            int(qid) if str(qid).isdigit() else stable_id(str(qid)),
            f"{image}.jpg",
            int(image) if image.isdigit() else stable_id(image),
            entry.text("question"),
            [answer] if answer is not None else [],
        ))
    return out


def _blip_vqa(path: object, require_answers: bool) -> list[VQAQuestion]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: not a BLIP VQA list")
    out = []
    for entry in entries(path, data, "", ("question_id", "image")):
        image, question = entry.text("image"), entry.text("question")
        answers = entry.texts("answer", optional=not require_answers) or []
        qid = id_from_value(entry.identifier("question_id", optional=True))
        out.append(VQAQuestion(
            qid if qid is not None else stable_id(f"{image}|{question}"),
            image,
            id_from_filename(image),
            question,
            answers,
        ))
    return out
