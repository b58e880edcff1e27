"""``predict`` on converted official weights: tiny transformers Blip2 models saved with
``save_pretrained`` and named by the tasks' ``pretrained`` option. Stage 1: the JSONL's ITC/ITM
scores equal ``Blip2ForImageTextRetrieval``'s own; stage 2: the captions equal those of the model
built by the (separately tested) conversion path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from predict_tiny import (
    IMAGE_SIZE, load_pixels, read_jsonl, run_predict, save_tokenizer, stage1_config, stage2_config, write_config, write_images,
)
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))
from convert_tiny import perturb_  # noqa: E402
from stage2_tiny import IMAGE_TOKEN, Q, opt_config, word_tokenizer  # noqa: E402

from qformer_lightning.convert import load_into  # noqa: E402
from qformer_lightning.convert.hf import build_parts_from_hf_config  # noqa: E402
from qformer_lightning.encoders.llm import LanguageModel  # noqa: E402
from qformer_lightning.models.blip2_llm import Blip2LLMModel  # noqa: E402

VISION = dict(
    hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
    patch_size=14, initializer_range=0.3, layer_norm_eps=1e-6, qkv_bias=True,
)
QFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, cross_attention_frequency=2,
    vocab_size=30523, max_position_embeddings=32, initializer_range=0.2,
)


def test_stage1_scores_match_blip2_for_image_text_retrieval(tmp_path) -> None:
    config = Blip2Config(
        vision_config=VISION, qformer_config=dict(QFORMER, use_qformer_text_input=True), num_query_tokens=4,
        image_text_hidden_size=16, image_token_index=None,
    )
    torch.manual_seed(0)
    hf = perturb_(Blip2ForImageTextRetrieval(config).eval(), scale=0.1)
    hf.save_pretrained(tmp_path / "hf")
    paths = write_images(tmp_path / "photos", 2)
    texts = ["a dog on the grass", "two cats"]
    cfg = write_config(tmp_path / "s1.yaml", stage1_config(pretrained=str(tmp_path / "hf")))
    cli = run_predict(cfg, "--data.images", str(tmp_path / "photos"), "--data.texts", '["a dog on the grass", "two cats"]',
                      "--trainer.callbacks.init_args.output", str(tmp_path / "out.jsonl"))
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert len(lines) == 4
    pixels = load_pixels([p for p in paths for _ in texts])
    ids, mask = cli.model.text([t for _ in paths for t in texts])
    with torch.no_grad():
        itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False).logits_per_image
    torch.testing.assert_close(torch.tensor([line["itm"] for line in lines]), itm.softmax(-1)[:, 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([line["itc"] for line in lines]), itc.diagonal(), atol=1e-4, rtol=1e-4)
    assert len({round(line["itm"], 4) for line in lines}) > 1  # the pairs are told apart


def test_stage2_captions_from_a_converted_blip2_for_conditional_generation(tmp_path) -> None:
    tok = word_tokenizer("opt")
    config = Blip2Config(
        vision_config=VISION, qformer_config=dict(QFORMER, encoder_hidden_size=24), text_config=opt_config(len(tok)).to_dict(),
        num_query_tokens=Q, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.query_tokens.normal_(std=0.5)
        hf.language_projection.weight.normal_(std=0.3)
    hf.save_pretrained(tmp_path / "hf")
    paths = write_images(tmp_path / "photos", 3)
    cfg = write_config(tmp_path / "s2.yaml", stage2_config(save_tokenizer(tmp_path / "tok"), pretrained=str(tmp_path / "hf"), prompt="a photo of"))
    cli = run_predict(cfg, "--data.images", str(tmp_path / "photos"), "--trainer.callbacks.init_args.output", str(tmp_path / "c.jsonl"))
    lines = read_jsonl(tmp_path / "c.jsonl")
    torch.testing.assert_close(cli.model.model.projection.weight, hf.language_projection.weight)

    parts = build_parts_from_hf_config(hf.config)
    reference = Blip2LLMModel(parts.vision, parts.qformer, LanguageModel.from_modules(hf.language_model, tok)).eval()
    load_into(reference, hf.state_dict())
    expected = reference.caption(load_pixels(paths), ["a photo of"] * 3, num_beams=1, max_new_tokens=5, min_new_tokens=1)
    assert [line["output"] for line in lines] == expected
    assert [line["task"] for line in lines] == ["caption"] * 3


def test_a_missing_pretrained_directory_is_named(tmp_path) -> None:
    paths = write_images(tmp_path / "photos", 1)
    cfg = write_config(tmp_path / "s1.yaml", stage1_config(pretrained=str(tmp_path / "does/not/exist/blip2")))
    with pytest.raises(FileNotFoundError, match="does/not/exist/blip2"):
        run_predict(cfg, "--data.images", str(paths[0]), "--data.texts", '["a dog"]',
                    "--trainer.callbacks.init_args.output", str(tmp_path / "x.jsonl"))
