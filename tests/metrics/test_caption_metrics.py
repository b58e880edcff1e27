"""Caption scores vs. pycocoevalcap called directly; results files; SPICE detection; CaptionMetric."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import qformer_lightning.metrics.caption as caption
from qformer_lightning.metrics.caption import (
    CaptionMetric,
    CaptionScorer,
    load_coco_results,
    score_captions,
    spice_available,
    write_coco_results,
)

ANNOTATION = {
    "images": [{"id": i} for i in (1, 2, 3, 4)],
    "annotations": [
        {"image_id": 1, "id": 10, "caption": "A dog runs across the green field."},
        {"image_id": 1, "id": 11, "caption": "a brown dog running on grass"},
        {"image_id": 1, "id": 12, "caption": "The dog is playing outside, in a park."},
        {"image_id": 2, "id": 20, "caption": "Two people riding bikes down a street."},
        {"image_id": 2, "id": 21, "caption": "a couple of cyclists on a city road"},
        {"image_id": 3, "id": 30, "caption": "A plate of food with broccoli and rice."},
        {"image_id": 3, "id": 31, "caption": "a dinner plate holding vegetables and rice"},
        {"image_id": 3, "id": 32, "caption": "Broccoli, rice and chicken on a white plate."},
        {"image_id": 4, "id": 40, "caption": "A cat sleeping on a laptop keyboard."},
        {"image_id": 4, "id": 41, "caption": "the cat lies on the computer"},
    ],
}
PREDICTIONS = [
    {"image_id": 1, "caption": "a dog running on the grass"},
    {"image_id": 2, "caption": "two people riding bikes on a street"},
    {"image_id": 3, "caption": "a plate of rice and broccoli"},
    {"image_id": 4, "caption": "a cat sleeping on a computer keyboard"},
]


def _direct_pycocoevalcap(annotation_path: Path, results_path: Path, meteor) -> dict[str, float]:  # noqa: ANN001
    """COCOEvalCap.evaluate's steps (minus SPICE), on the files, with pycocoevalcap's own classes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    annotations = json.loads(annotation_path.read_text())["annotations"]
    results = json.loads(results_path.read_text())
    image_ids = [r["image_id"] for r in results]
    gts = {i: [a for a in annotations if a["image_id"] == i] for i in image_ids}
    res = {r["image_id"]: [r] for r in results}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": b for n, b in enumerate(bleu)})
    out["METEOR"], _ = meteor.compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


def test_score_captions_equals_pycocoevalcap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pycocoevalcap.meteor import meteor as meteor_module

    # One METEOR JVM (~12 s to start) serves both sides; it is stateless between calls.
    shared_meteor = meteor_module.Meteor()
    monkeypatch.setattr(meteor_module, "Meteor", lambda: shared_meteor)
    annotation_path = tmp_path / "annotation.json"
    annotation_path.write_text(json.dumps(ANNOTATION))
    results_path = write_coco_results(PREDICTIONS, tmp_path / "out" / "results.json")
    got = score_captions(results_path, annotation_path, use_spice=False)
    expected = _direct_pycocoevalcap(annotation_path, results_path, shared_meteor)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert 0.0 < got["CIDEr"] and 0.0 < got["Bleu_4"] < 1.0 and 0.0 < got["METEOR"] < 1.0


def test_write_and_load_results(tmp_path: Path) -> None:
    path = write_coco_results(PREDICTIONS, tmp_path / "results.json")
    assert json.loads(path.read_text()) == PREDICTIONS
    assert load_coco_results(path) == {p["image_id"]: p["caption"] for p in PREDICTIONS}
    with pytest.raises(ValueError, match="more than one caption for image_id 2"):
        write_coco_results(PREDICTIONS + [{"image_id": 2, "caption": "again"}], tmp_path / "dup.json")
    with pytest.raises(ValueError, match=r"predictions\[0\] must be a dict"):
        write_coco_results([{"image_id": 1}], tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco_results(tmp_path / "missing.json")


def test_scorer_input_errors() -> None:
    with pytest.raises(ValueError, match="'annotations' list"):
        CaptionScorer({"images": []}, use_spice=False)
    with pytest.raises(ValueError, match="unknown caption metrics"):
        CaptionScorer(ANNOTATION, use_spice=False, metrics=("bleu", "spider"))
    with pytest.raises(ValueError, match="no reference captions, e.g. \\[99\\]"):
        CaptionScorer(ANNOTATION, use_spice=False)([{"image_id": 99, "caption": "x"}])


def test_spice_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(caption, "spice_jar_dir", lambda: tmp_path)
    assert not spice_available()
    with pytest.raises(RuntimeError, match="stanford-corenlp-3.6.0.jar.*get_stanford_models"):
        CaptionScorer(ANNOTATION, use_spice=True)
    with caplog.at_level(logging.WARNING, logger=caption.__name__):
        scorer = CaptionScorer(ANNOTATION, use_spice=None)
    assert not scorer.use_spice
    assert "Skipping SPICE" in caplog.text and str(tmp_path) in caplog.text
    assert not CaptionScorer(ANNOTATION, use_spice=False).use_spice
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / jar).write_bytes(b"")
    assert spice_available() and CaptionScorer(ANNOTATION, use_spice=None).use_spice


def test_caption_metric_encoding_and_duplicates() -> None:
    metric = CaptionMetric(ANNOTATION, use_spice=False)
    metric.update(torch.tensor([3, 1]), ["un café près de la fenêtre ☕", ""])
    metric.update([1, 2], ["duplicate of 1, dropped", "two people"])
    assert metric.predictions() == [
        {"image_id": 3, "caption": "un café près de la fenêtre ☕"},
        {"image_id": 1, "caption": ""},
        {"image_id": 2, "caption": "two people"},
    ]
    strict = CaptionMetric(ANNOTATION, use_spice=False, on_duplicate="error")
    strict.update([1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="image_id 1 received more than one caption"):
        strict.predictions()
    with pytest.raises(TypeError, match="integers"):
        metric.update([1.5], ["x"])
    with pytest.raises(ValueError, match="2 image ids"):
        metric.update([1, 2], ["x"])


def test_caption_metric_merge_and_compute(tmp_path: Path) -> None:
    first = CaptionMetric(ANNOTATION, use_spice=False, metrics=("bleu", "cider"), results_path=tmp_path / "r.json")
    second = CaptionMetric(ANNOTATION, use_spice=False, metrics=("bleu", "cider"))
    first.update([p["image_id"] for p in PREDICTIONS[:3]], [p["caption"] for p in PREDICTIONS[:3]])
    second.update([PREDICTIONS[3]["image_id"]], [PREDICTIONS[3]["caption"]])
    first.merge_state(second)
    scores = first.compute()
    expected = CaptionScorer(ANNOTATION, use_spice=False, metrics=("bleu", "cider"))(PREDICTIONS)
    assert sorted(scores) == sorted(expected) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"]
    for key, value in expected.items():
        assert scores[key].item() == pytest.approx(value, rel=1e-12)
    written = json.loads((tmp_path / "r.json").read_text())
    assert sorted(written, key=lambda p: p["image_id"]) == PREDICTIONS
