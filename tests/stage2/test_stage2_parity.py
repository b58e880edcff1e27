"""Parity with transformers' Blip2ForConditionalGeneration (tiny random OPT and T5 language models):
converted weights give the same logits (fp32, <= 1e-5) and the same generated ids (greedy, beam 5
with length penalty -1, min/max new tokens), batched with padding."""

from __future__ import annotations

import pytest
import torch
from stage2_tiny import IMAGE_TOKEN, opt_config, t5_config, word_tokenizer
from transformers import Blip2Config, Blip2ForConditionalGeneration

from qformer_lightning.convert import load_into
from qformer_lightning.convert.hf import build_parts_from_hf_config
from qformer_lightning.encoders.llm import LanguageModel
from qformer_lightning.models.blip2_llm import Blip2LLMModel

Q = 4
PROMPTS = ["a photo of", "question what is the color of the sky answer"]
TARGETS = ["a dog sits on the grass", "blue"]


def _hf_model(kind: str):
    tok = word_tokenizer(kind)
    text = opt_config(len(tok)) if kind == "opt" else t5_config(len(tok))
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14, qkv_bias=True, initializer_range=0.3, layer_norm_eps=1e-5,
        ),
        qformer_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, encoder_hidden_size=32,
            cross_attention_frequency=2, vocab_size=60, max_position_embeddings=32, initializer_range=0.2,
        ),
        text_config=text.to_dict(),
        num_query_tokens=Q,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.query_tokens.normal_(std=0.5)  # HF initialises them to zeros: all queries would be equal
        hf.language_projection.weight.normal_(std=0.3)
    return hf, tok


def _ours(hf, tok) -> Blip2LLMModel:
    parts = build_parts_from_hf_config(hf.config)
    llm = LanguageModel.from_modules(hf.language_model, tok)  # shares the HF language model
    model = Blip2LLMModel(parts.vision, parts.qformer, llm).eval()
    report = load_into(model, hf.state_dict())
    assert not [k for k in report.missing if not k.startswith("llm.")], report.summary()
    assert any(k.startswith("projection.") for k in report.loaded)
    return model


def _hf_ids(tok, texts: list[str], num_image: int, left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = [[image] * num_image + tok(t)["input_ids"] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if left_pad else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request):
    hf, tok = _hf_model(request.param)
    return request.param, hf, tok, _ours(hf, tok)


def test_logits_match_fp32(pair) -> None:
    kind, hf, tok, ours = pair
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, labels = ours(images, TARGETS, PROMPTS)
        inputs = ours.llm.training_inputs(ours.soft_prompt(images), TARGETS, PROMPTS)
        if kind == "opt":
            # HF sees [image tokens | prompt + target ids | pad] with the same ids.
            image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
            ids = torch.cat([torch.full((2, Q), image), inputs.input_ids], dim=1)
            ref = hf(pixel_values=images, input_ids=ids, attention_mask=inputs.attention_mask).logits
            ref = ref[:, -logits.shape[1] :]
            real = inputs.attention_mask[:, -logits.shape[1] :].bool()
            assert real.sum() > 10
            torch.testing.assert_close(logits[real], ref[real], atol=1e-5, rtol=1e-5)
        else:
            ids, mask = _hf_ids(tok, PROMPTS, Q, left_pad=False)
            torch.testing.assert_close(ids[:, Q:], inputs.input_ids)
            decoder_ids = hf.language_model.prepare_decoder_input_ids_from_labels(labels=labels)
            ref = hf(
                pixel_values=images, input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                decoder_attention_mask=inputs.decoder_attention_mask,
            ).logits
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert logits.abs().max() > 1.0  # not a degenerate near-zero comparison


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=1, max_new_tokens=6, min_new_tokens=2),
        dict(num_beams=5, max_new_tokens=7, min_new_tokens=3, length_penalty=-1.0),
    ],
    ids=["greedy", "beam5_lp-1"],
)
def test_generate_matches_transformers(pair, settings) -> None:
    kind, hf, tok, ours = pair
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    ids, mask = _hf_ids(tok, PROMPTS, Q, left_pad=kind == "opt")
    ref = hf.generate(
        pixel_values=images, input_ids=ids, attention_mask=mask, do_sample=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **settings,
    )
    ref = ref[:, ids.shape[1] :] if kind == "opt" else ref[:, 1:]  # drop the prompt / decoder start
    got = ours.generate(images, PROMPTS, **settings)
    assert got.shape[1] >= settings["min_new_tokens"]
    assert torch.equal(got, ref), f"{kind} {settings}: ours {got.tolist()} vs transformers {ref.tolist()}"
