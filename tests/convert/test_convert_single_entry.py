"""The single entry for weights: ``read_checkpoint`` recognises each source by its contents, and
``load_into``/``load_pretrained`` fill what the weights hold. A transformers
``Blip2ForConditionalGeneration`` saved with ``use_qformer_text_input=True`` (text FFNs, no text
embeddings) converts, and a stage-2 model filled from it gives transformers' logits (fp32, <= 1e-5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from convert_tiny import blip2_config, perturb_
from transformers import Blip2ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stage2"))
from stage2_tiny import IMAGE_TOKEN, opt_config, word_tokenizer  # noqa: E402

from qformer_lightning.convert import (  # noqa: E402
    CheckpointError,
    VisionQFormer,
    load_into,
    load_pretrained,
    read_checkpoint,
)
from qformer_lightning.convert.hf import build_from_hf_config, build_parts_from_hf_config  # noqa: E402
from qformer_lightning.convert.lavis import save_lavis_checkpoint  # noqa: E402
from qformer_lightning.convert.native import save_native  # noqa: E402
from qformer_lightning.encoders.llm import LanguageModel  # noqa: E402
from qformer_lightning.models.blip2_llm import Blip2LLMModel  # noqa: E402

Q, TOL = 4, 1e-5
PROMPTS = ["a photo of", "question what is the color of the sky answer"]
TARGETS = ["a dog sits on the grass", "blue"]
TEXT_FFN = "qformer.encoder.layer.0.intermediate.dense.weight"


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """A tiny Blip2ForConditionalGeneration with Q-Former text input, saved; (hf, tokenizer, directory)."""
    tok = word_tokenizer("opt")
    config = blip2_config(num_query_tokens=Q, text_input=True, text_config=opt_config(len(tok)).to_dict())
    config.image_token_index = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.manual_seed(0)
    hf = perturb_(Blip2ForConditionalGeneration(config), seed=3).eval()
    path = tmp_path_factory.mktemp("generation") / "hf"
    hf.save_pretrained(path)
    return hf, tok, path


def _stage2_model(hf, tok, seed: int) -> Blip2LLMModel:
    """A stage-2 model shaped like ``hf`` with other random weights everywhere (LLM included)."""
    torch.manual_seed(seed)
    parts = build_parts_from_hf_config(hf.config, text=False)
    llm = type(hf.language_model)(hf.language_model.config).eval()
    return Blip2LLMModel(parts.vision, parts.qformer, LanguageModel.from_modules(llm, tok)).eval()


def _hf_query_outputs(hf, pixels: torch.Tensor) -> torch.Tensor:
    image = hf.vision_model(pixels).last_hidden_state
    queries = hf.query_tokens.expand(len(pixels), -1, -1)
    return hf.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state


@torch.no_grad()
def test_generation_checkpoint_with_text_input_converts(generation) -> None:
    hf, _, path = generation
    state = hf.state_dict()
    assert TEXT_FFN in state and "embeddings.word_embeddings.weight" not in state  # text FFNs without embeddings
    parts, report = load_pretrained(path)  # strict; failed with "missing ['qformer.word_embeddings.weight', ...]"
    assert isinstance(parts, VisionQFormer) and not parts.qformer.has_text  # decided by the weights, not the flag
    assert report.missing == [] and report.unexpected == [] and TEXT_FFN in report.ignored
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    want = _hf_query_outputs(hf, pixels)
    assert want.std() > 0.1
    assert (parts.eval()(pixels) - want).abs().max() <= TOL


@torch.no_grad()
def test_stage2_model_filled_from_it_matches_transformers_logits(generation) -> None:
    hf, tok, path = generation
    model = _stage2_model(hf, tok, seed=5)
    report = load_into(model, path)
    assert report.kind == "hf:Blip2ForConditionalGeneration" and report.missing == []
    assert TEXT_FFN in report.unexpected  # no text parts in this Q-Former: dropped and reported
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    logits, _ = model(images, TARGETS, PROMPTS)
    inputs = model.llm.training_inputs(model.soft_prompt(images), TARGETS, PROMPTS)
    image_ids = torch.full((2, Q), tok.convert_tokens_to_ids(IMAGE_TOKEN))
    ids = torch.cat([image_ids, inputs.input_ids], dim=1)  # HF: [image tokens | prompt + target | pad]
    ref = hf(pixel_values=images, input_ids=ids, attention_mask=inputs.attention_mask).logits[:, -logits.shape[1] :]
    real = inputs.attention_mask[:, -logits.shape[1] :].bool()
    assert real.sum() > 10 and logits.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(logits[real], ref[real], atol=TOL, rtol=TOL)


def test_weights_present_decide_what_a_stage1_model_gets(generation) -> None:
    hf, _, path = generation
    torch.manual_seed(6)
    stage1 = build_from_hf_config(blip2_config(num_query_tokens=Q))  # text parts and ITC/ITM heads
    before = {k: v.clone() for k, v in stage1.state_dict().items()}
    report = load_into(stage1, path)
    state = hf.state_dict()
    torch.testing.assert_close(stage1.qformer.layers[0].text_ffn.fc1.weight, state[TEXT_FFN])
    torch.testing.assert_close(stage1.qformer.query_tokens, state["query_tokens"])
    for name in ("qformer.word_embeddings.weight", "vision_proj.weight", "itm_head.linear.weight", "temp"):
        assert name in report.missing and torch.equal(stage1.state_dict()[name], before[name]), name
    assert not any(k.startswith("language_") for k in report.unexpected)  # the LLM is not read for a stage-1 model
    assert "left as built" in report.summary()


def test_lavis_and_native_files_fill_the_language_side(generation, tmp_path) -> None:
    hf, tok, path = generation
    parts, _ = load_pretrained(path)
    save_native(parts, tmp_path / "ours.pt")  # language side under the Hugging Face names
    model = _stage2_model(hf, tok, seed=7)
    report = load_into(model, tmp_path / "ours.pt")
    assert report.kind == "qformer_lightning:vision_qformer" and report.missing == []
    torch.testing.assert_close(model.projection.weight, hf.language_projection.weight)
    torch.testing.assert_close(model.qformer.query_tokens, hf.query_tokens)

    weight, bias = torch.randn_like(hf.language_projection.weight), torch.randn_like(hf.language_projection.bias)
    parts.language_state = {"opt_proj.weight": weight, "opt_proj.bias": bias}
    save_lavis_checkpoint(parts, tmp_path / "lavis.pth")
    model = _stage2_model(hf, tok, seed=8)
    report = load_into(model, tmp_path / "lavis.pth")
    assert report.kind == "lavis" and not [k for k in report.missing if not k.startswith("llm.")]
    assert torch.equal(model.projection.weight, weight) and torch.equal(model.projection.bias, bias)
    torch.testing.assert_close(model.vision.vit.pos_embed, parts.vision.vit.pos_embed)


def test_format_is_read_from_the_contents(generation, tmp_path) -> None:
    hf, _, path = generation
    directory = read_checkpoint(path)
    assert (directory.format, directory.kind) == ("hf", "hf:Blip2ForConditionalGeneration")
    assert directory.config is not None
    assert read_checkpoint(hf.state_dict()).format == "hf"
    torch.save(hf.state_dict(), tmp_path / "blip2.bin")
    bare = read_checkpoint(tmp_path / "blip2.bin")
    assert (bare.format, bare.kind, bare.config) == ("hf", "hf:generation", None)
    with pytest.raises(CheckpointError, match="without its config"):
        load_pretrained(tmp_path / "blip2.bin")
    lightning = {"state_dict": {"model.qformer.query_tokens": hf.query_tokens}, "qformer_lightning": {"task": "Stage2"}}
    torch.save(lightning, tmp_path / "stage2.pt")  # a Lightning checkpoint by its contents, whatever the suffix
    read = read_checkpoint(tmp_path / "stage2.pt")
    assert (read.format, read.kind) == ("lightning", "qformer_lightning:Stage2")
    assert list(read.state) == ["qformer.query_tokens"]  # the task's model. prefix removed
    with pytest.raises(CheckpointError, match="Lightning training checkpoint"):
        load_pretrained(tmp_path / "stage2.pt")
    torch.save({"weight": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a qformer_lightning checkpoint nor a LAVIS or Hugging Face"):
        read_checkpoint(tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
        read_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")
