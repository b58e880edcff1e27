"""PredictDataModule: requests from files, folders and JSONL; clear errors; bad images skipped by name."""

from __future__ import annotations

import json

import pytest
import torch
from predict_tiny import load_pixels, write_images

from qformer_lightning.data.predict import (
    PredictCollate, PredictDataModule, PredictDataset, list_images, make_request, read_requests,
)
from qformer_lightning.data.image import ImageTransform
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.tasks.predict import batch_requests, llm_prompt


def test_kind_follows_the_given_fields() -> None:
    assert make_request("a.png").kind == "caption"
    assert make_request("a.png", question="why").kind == "question"
    assert make_request("a.png", prompt="tell").kind == "prompt"
    assert make_request("a.png", text="a dog").as_json() == {"image": "a.png", "task": "score", "text": "a dog"}
    with pytest.raises(ValueError, match="cannot be combined"):
        make_request("a.png", question="why", text="a dog")


def test_folder_listing_is_sorted_and_filtered(tmp_path) -> None:
    write_images(tmp_path / "d", 3)
    (tmp_path / "d" / "notes.txt").write_text("x")
    (tmp_path / "d" / "sub").mkdir()
    write_images(tmp_path / "d" / "sub", 1)
    names = [p.rsplit("/", 1)[1] for p in list_images(str(tmp_path / "d"))]
    assert names == ["img0.png", "img1.png", "img2.png"]
    assert len(list_images(str(tmp_path / "d"), recursive=True)) == 4
    with pytest.raises(FileNotFoundError, match="no image files .* in folder .*empty"):
        (tmp_path / "empty").mkdir()
        list_images(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="image path .*nope.jpg.* does not exist"):
        list_images([str(tmp_path / "d" / "img0.png"), str(tmp_path / "nope.jpg")])


def test_jsonl_requests_resolve_paths_expand_text_lists_and_name_bad_lines(tmp_path) -> None:
    write_images(tmp_path / "photos", 2)
    lines = [{"image": "photos/img0.png", "text": ["a dog", "a cat"], "id": 7}, {"image": "photos/img1.png", "question": "what"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    requests = read_requests(tmp_path / "r.jsonl")
    assert [(r.kind, r.text, r.id) for r in requests] == [("score", "a dog", 7), ("score", "a cat", 7), ("question", None, None)]
    assert requests[0].image == str(tmp_path / "photos" / "img0.png")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "photos/img0.png", "questoin": "what"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown key\(s\) \['questoin'\]"):
        read_requests(tmp_path / "bad.jsonl")
    (tmp_path / "missing.jsonl").write_text("\n" + json.dumps({"image": "photos/img9.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl:2: image .*img9.png.* does not exist"):
        read_requests(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="request file .*absent.jsonl.* does not exist"):
        read_requests(tmp_path / "absent.jsonl")


def test_constructor_rejects_conflicting_inputs() -> None:
    with pytest.raises(ValueError, match="either `images`"):
        PredictDataModule()
    with pytest.raises(ValueError, match="put them on each JSONL line"):
        PredictDataModule(requests="r.jsonl", question="why")
    with pytest.raises(ValueError, match="cannot be combined"):
        PredictDataModule(images="x", texts=["a"], prompt="p")


def test_image_settings_come_from_the_encoder_and_a_conflicting_size_is_named() -> None:
    encoder = TimmVisionEncoder(image_size=28, model_kwargs=dict(embed_dim=16, depth=2, num_heads=2, patch_size=14), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    size, mean, std = PredictDataModule(images="x").resolve_image_settings(encoder)
    assert (size, mean, std) == (28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="image_size=32, but the model's image encoder takes 28x28"):
        PredictDataModule(images="x", image_size=32).resolve_image_settings(encoder)


def test_bad_images_are_skipped_with_their_name_or_stop_the_run(tmp_path) -> None:
    paths = write_images(tmp_path, 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    requests = [make_request(str(paths[0])), make_request(str(broken)), make_request(str(paths[1]), question="q")]
    dataset = PredictDataset(requests, ImageTransform(28, train=False), "skip")
    batch = PredictCollate(dataset, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(
        [dataset[i] for i in range(3)]
    )
    assert batch["index"].tolist() == [0, 2] and batch["key"] == [str(paths[0]), str(paths[1])]
    torch.testing.assert_close(batch["image"], load_pixels(paths))
    assert [r["task"] for r in batch["request"]] == ["caption", "question"]
    assert len(batch["skipped"]) == 1 and batch["skipped"][0]["image"] == str(broken) and batch["skipped"][0]["index"] == 1
    assert batch["skipped"][0]["error"].startswith("bad_image:") and "BytesIO" not in batch["skipped"][0]["error"]
    strict = PredictDataset(requests, ImageTransform(28, train=False), "error")
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.jpg' \(bad_image: .*on_bad_image: skip"):
        strict[1]


def test_question_templates_and_annotation_batches() -> None:
    question = {"image": "a", "task": "question", "question": "why"}
    assert llm_prompt(question, "", encoder_decoder=False) == "Question: why Answer:"
    assert llm_prompt(question, "a photo of", encoder_decoder=True) == "Question: why Short answer:"
    assert llm_prompt(question, "Q: {} A:", encoder_decoder=True) == "Q: why A:"
    assert llm_prompt({**question, "prompt": "ask {} now"}, "Q: {} A:", encoder_decoder=False) == "ask why now"
    assert llm_prompt({"image": "a", "task": "caption"}, "a photo of", False) == "a photo of"
    with pytest.raises(ValueError, match="need a stage-1 model"):
        llm_prompt({"image": "a.png", "task": "score", "text": "x"}, "", False)
    vqa = {"image": torch.zeros(2, 3, 4, 4), "text": ["q1", "q2"], "key": ["k1", "k2"], "question_id": torch.tensor([5, 6])}
    assert batch_requests(vqa, score_texts=False) == [
        {"image": "k1", "task": "question", "question": "q1", "id": 5}, {"image": "k2", "task": "question", "question": "q2", "id": 6},
    ]
    captions = {"image": torch.zeros(1, 3, 4, 4), "text": ["a dog"], "key": ["k"]}
    assert batch_requests(captions, score_texts=True) == [{"image": "k", "task": "score", "text": "a dog"}]
    assert batch_requests(captions, score_texts=False) == [{"image": "k", "task": "caption"}]
