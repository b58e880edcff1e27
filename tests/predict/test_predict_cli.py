"""``python -m qformer_lightning predict`` on user images: stage-1 scores, stage-2 captions, answers and
free prompts, JSONL output in input order, bad images skipped by name, ``--ckpt_path``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from predict_tiny import load_pixels, read_jsonl, run_predict, save_tokenizer, stage1_config, stage2_config, write_config, write_images


def _reference_scores(task, pixels: torch.Tensor, text: str) -> tuple[float, float]:
    """ITC cosine (max over queries, from the unnormalised projections) and ITM P(match) of one pair."""
    model = task.model.eval()
    ids, mask = task.text([text])
    with torch.no_grad():
        embeds = model.image_embeds(pixels[None])
        hidden = model.qformer.encode_queries(embeds).hidden[0]  # (Q, D)
        text_cls = model.qformer.encode_text(ids, mask)[0, 0]  # (D,)
        cosines = F.cosine_similarity(model.vision_proj(hidden), model.text_proj(text_cls)[None], dim=-1)  # (Q,)
        itm = model.itm_logits(embeds, ids, mask)[0].softmax(-1)[1]
    return float(cosines.max()), float(itm)


def test_stage1_scores_every_image_text_pair_and_names_bad_images(tmp_path) -> None:
    paths = write_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    config = write_config(tmp_path / "s1.yaml", stage1_config())
    out = tmp_path / "out" / "scores.jsonl"
    texts = ["a dog on the grass", "a red boat"]
    cli = run_predict(config, "--data.images", str(tmp_path / "photos"), "--data.texts", json.dumps(texts),
                      "--trainer.callbacks.init_args.output", str(out))
    lines = read_jsonl(out)
    assert [line["index"] for line in lines] == list(range(6))
    broken = [line for line in lines if line["image"].endswith("broken.jpg")]
    assert [b["text"] for b in broken] == texts and all(b["error"].startswith("bad_image:") for b in broken)
    assert all("itc" not in b for b in broken)
    pixels = load_pixels(paths)
    good = [line for line in lines if "error" not in line]
    assert [(line["image"], line["text"]) for line in good] == [(str(p), t) for p in paths for t in texts]
    for line in good:
        itc, itm = _reference_scores(cli.model, pixels[paths.index(next(p for p in paths if str(p) == line["image"]))], line["text"])
        assert line["task"] == "score"
        assert line["itc"] == pytest.approx(itc, abs=1e-5) and line["itm"] == pytest.approx(itm, abs=1e-5)
        assert -1.0 <= line["itc"] <= 1.0 and 0.0 < line["itm"] < 1.0


def test_stage2_captions_answers_and_free_prompts_from_a_jsonl(tmp_path) -> None:
    paths = write_images(tmp_path / "photos", 2)
    requests = [
        {"image": "photos/img0.png", "id": "cap"},
        {"image": "photos/img1.png", "question": "what color is the boat"},
        {"image": "photos/img0.png", "question": "how many dog", "prompt": "question {} answer"},
        {"image": str(paths[1]), "prompt": "a big red"},
    ]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    config = write_config(tmp_path / "s2.yaml", stage2_config(save_tokenizer(tmp_path / "tok"), prompt="a photo of"))
    out = tmp_path / "answers.jsonl"
    cli = run_predict(config, "--data.requests", str(tmp_path / "requests.jsonl"), "--trainer.callbacks.init_args.output", str(out))
    lines = read_jsonl(out)
    assert [line["task"] for line in lines] == ["caption", "question", "question", "prompt"]
    assert lines[0]["id"] == "cap" and lines[0]["image"] == str(tmp_path / "photos" / "img0.png")
    prompts = ["a photo of", "Question: what color is the boat Answer:", "question how many dog answer", "a big red"]
    assert [line["llm_prompt"] for line in lines] == prompts
    pixels = load_pixels([paths[0], paths[1], paths[0], paths[1]])
    task = cli.model
    expected = task.model.caption(pixels, prompts, **task.generation)
    assert [line["output"] for line in lines] == expected
    assert all(isinstance(line["output"], str) for line in lines)


def test_stage2_one_question_for_a_folder_uses_the_encoder_decoder_free_template(tmp_path) -> None:
    write_images(tmp_path / "photos", 3)
    config = write_config(tmp_path / "s2.yaml", stage2_config(save_tokenizer(tmp_path / "tok"), prompt="question : {} answer :"))
    out = tmp_path / "p.jsonl"
    run_predict(config, "--data.images", str(tmp_path / "photos"), "--data.question", "what is on the grass",
                "--data.batch_size", "2", "--trainer.callbacks.init_args.output", str(out))
    lines = read_jsonl(out)
    assert [line["image"].rsplit("/", 1)[1] for line in lines] == ["img0.png", "img1.png", "img2.png"]
    assert {line["llm_prompt"] for line in lines} == {"question : what is on the grass answer :"}


def test_ckpt_path_predicts_with_the_checkpoint_weights(tmp_path) -> None:
    paths = write_images(tmp_path / "photos", 1)
    config = write_config(tmp_path / "s1.yaml", stage1_config())
    first = run_predict(config, "--data.images", str(paths[0]), "--data.texts", '["a dog"]',
                        "--trainer.callbacks.init_args.output", str(tmp_path / "a.jsonl"))
    with torch.no_grad():
        first.model.model.text_proj.weight.mul_(-1.0)  # flips every query-text cosine
    first.trainer.save_checkpoint(tmp_path / "s1.ckpt")
    itc, itm = _reference_scores(first.model, load_pixels(paths)[0], "a dog")
    run_predict(config, "--data.images", str(paths[0]), "--data.texts", '["a dog"]', "--ckpt_path", str(tmp_path / "s1.ckpt"),
                "--trainer.callbacks.init_args.output", str(tmp_path / "b.jsonl"))
    before, after = read_jsonl(tmp_path / "a.jsonl")[0], read_jsonl(tmp_path / "b.jsonl")[0]
    assert after["itc"] == pytest.approx(itc, abs=1e-5) and after["itm"] == pytest.approx(itm, abs=1e-5)
    assert abs(after["itc"] - before["itc"]) > 1e-2  # the flipped projection changed the scores
