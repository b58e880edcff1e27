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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qformer_lightning.data.batch import stable_id

VQAFormat = Literal["vqav2", "gqa", "blip"]
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
    """Read a caption annotation file (module docstring) into one record per image."""
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("images"), list) and "annotations" in data:
        if splits:
            raise ValueError(f"{path}: a COCO-format caption file has no splits, got splits={splits}")
        return _coco_format(data)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _karpathy(data, splits, path)
    if isinstance(data, list):
        if splits:
            raise ValueError(f"{path}: a BLIP/LAVIS list file is one split already, got splits={splits}")
        return _lavis(data, path)
    raise ValueError(f"{path}: not a Karpathy, COCO or BLIP/LAVIS caption file")


def _karpathy(data: dict, splits: list[str] | None, path: object) -> list[CaptionImage]:
    out = []
    for entry in data["images"]:
        if splits and entry.get("split") not in splits:
            continue
        rel = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        image_id = entry["cocoid"] if "cocoid" in entry else id_from_filename(rel)
        out.append(CaptionImage(rel, int(image_id), [s["raw"] for s in entry["sentences"]]))
    if not out:
        raise ValueError(f"{path}: no image with split in {splits}")
    return out


def _coco_format(data: dict) -> list[CaptionImage]:
    images = {im["id"]: CaptionImage(im["file_name"], int(im["id"]), []) for im in data["images"]}
    for ann in data["annotations"]:
        images[ann["image_id"]].captions.append(ann["caption"])
    return list(images.values())


def _lavis(data: list, path: object) -> list[CaptionImage]:
    by_image: dict[str, CaptionImage] = {}
    for entry in data:
        if "image" not in entry or "caption" not in entry:
            raise ValueError(f"{path}: entry without 'image' and 'caption': {entry}")
        rel = entry["image"]
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if rel not in by_image:
            given = next((id_from_value(entry[k]) for k in ("image_id", "img_id") if k in entry), None)
            by_image[rel] = CaptionImage(rel, given if given is not None else id_from_filename(rel), [])
        by_image[rel].captions.extend(captions)
    return list(by_image.values())


def load_vqa(
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    format: VQAFormat = "vqav2",
    image_template: str = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg",
) -> list[VQAQuestion]:
    """Read VQA questions (and answers) in one of the formats of the module docstring."""
    if format == "vqav2":
        return _vqav2(questions, annotations, image_template)
    if annotations is not None:
        raise ValueError(f"format {format!r} keeps answers in the questions file; got annotations={annotations}")
    if format == "gqa":
        return _gqa(questions)
    if format == "blip":
        return _blip_vqa(questions)
    raise ValueError(f"unknown VQA format {format!r}; expected 'vqav2', 'gqa' or 'blip'")


def _vqav2(questions: object, annotations: object, template: str) -> list[VQAQuestion]:
    data = _read_json(questions)
    if not isinstance(data, dict) or "questions" not in data:
        raise ValueError(f"{questions}: not a VQAv2 questions file (no 'questions')")
    subtype = data.get("data_subtype", "")
    answers: dict[int, list[str]] = {}
    if annotations is not None:
        ann = _read_json(annotations)
        if not isinstance(ann, dict) or "annotations" not in ann:
            raise ValueError(f"{annotations}: not a VQAv2 annotations file (no 'annotations')")
        answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in ann["annotations"]}
        missing = [q["question_id"] for q in data["questions"] if q["question_id"] not in answers]
        if missing:
            raise ValueError(f"{annotations}: no answers for {len(missing)} questions, e.g. {missing[:5]}")
    return [
        VQAQuestion(
            int(q["question_id"]),
            template.format(subtype=subtype, image_id=q["image_id"]),
            int(q["image_id"]),
            q["question"],
            answers.get(q["question_id"], []),
        )
        for q in data["questions"]
    ]


def _gqa(path: object) -> list[VQAQuestion]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a GQA questions file (expected an object keyed by question id)")
    out = []
    for qid, q in data.items():
        image = str(q["imageId"])
        out.append(VQAQuestion(
            int(qid) if str(qid).isdigit() else stable_id(str(qid)),
            f"{image}.jpg",
            int(image) if image.isdigit() else stable_id(image),
            q["question"],
            [q["answer"]] if "answer" in q else [],
        ))
    return out


def _blip_vqa(path: object) -> list[VQAQuestion]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: not a BLIP VQA list")
    out = []
    for entry in data:
        answer = entry.get("answer", [])
        answers = answer if isinstance(answer, list) else [answer]
        qid = id_from_value(entry.get("question_id"))
        out.append(VQAQuestion(
            qid if qid is not None else stable_id(f"{entry['image']}|{entry['question']}"),
            entry["image"],
            id_from_filename(entry["image"]),
            entry["question"],
            answers,
        ))
    return out
