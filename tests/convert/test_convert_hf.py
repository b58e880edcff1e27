"""Parity of Hugging Face Blip2 imports/exports against transformers itself (fp32, CPU, max abs diff <= 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_tiny import blip2_config, inputs, perturb_
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2QFormerModel

from qformer_lightning.convert import CheckpointError, VisionQFormer, load_pretrained
from qformer_lightning.convert.hf import (
    build_from_hf_config,
    build_qformer_from_hf_config,
    export_hf_retrieval,
    load_hf_retrieval,
    load_hf_state_dict,
    split_hf_state_dict,
)
from qformer_lightning.convert.native import save_native
from qformer_lightning.models.blip2 import Blip2QFormerModel as OurModel

TOL = 1e-5


def _hf_retrieval(**config_kw) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(0)
    return perturb_(Blip2ForImageTextRetrieval(blip2_config(**config_kw))).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _hf_query_outputs(hf, image_embeds: torch.Tensor) -> torch.Tensor:
    queries = hf.query_tokens.expand(image_embeds.shape[0], -1, -1)
    return hf.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state


@torch.no_grad()
def _compare_retrieval(hf: Blip2ForImageTextRetrieval, ours: OurModel, image_size: int) -> None:
    """Vision features, query outputs, ITM logits and ITC similarities of HF vs ours."""
    pixels, ids, mask = inputs(image_size)
    hf_vision = hf.vision_model(pixels).last_hidden_state
    our_vision = ours.image_embeds(pixels)
    assert hf_vision.abs().mean() > 0.1  # features far from zero: the comparison means something
    assert _max_diff(hf_vision, our_vision) <= TOL
    hf_queries = _hf_query_outputs(hf, hf_vision)
    our_queries, our_feats, _ = ours.query_features(our_vision)
    assert _max_diff(hf_queries, our_queries) <= TOL
    hf_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
    assert _max_diff(hf_itm, ours.itm_logits(our_vision, ids, mask)) <= TOL
    hf_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image  # (B_img, B_txt), no temperature
    _, text_feat = ours.text_features(ids, mask)
    ours_itc = torch.einsum("iqe,te->iqt", our_feats, text_feat).amax(dim=1)
    assert hf_itc.std() > 1e-3
    assert _max_diff(hf_itc, ours_itc) <= TOL


@pytest.mark.parametrize(
    "config_kw",
    [
        dict(num_query_tokens=4, cross_attention_frequency=2, image_size=28),
        dict(num_query_tokens=8, cross_attention_frequency=1, image_size=42, vision_eps=1e-6),
    ],
    ids=["q4-freq2-28px", "q8-freq1-42px"],
)
def test_retrieval_parity(config_kw: dict) -> None:
    hf = _hf_retrieval(**config_kw)
    ours = build_from_hf_config(hf.config).eval()
    assert ours.vision.width == 24 and ours.qformer.hidden_size == 32  # vision width differs from the Q-Former's
    report = load_hf_state_dict(ours, hf.state_dict(), "tiny")
    assert sorted(report.missing) == sorted(
        ["temp", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.norm.weight", "lm_head.norm.bias", "lm_head.decoder.bias"]
    )
    assert report.unexpected == [] and report.resampled == []
    assert ours.lm_head_tied and torch.equal(ours.lm_head.decoder.weight, hf.embeddings.word_embeddings.weight)
    assert ours.vision.vit.blocks[0].norm1.eps == config_kw.get("vision_eps", 1e-5) == ours.vision.ln_vision.eps
    _compare_retrieval(hf, ours, config_kw["image_size"])


@torch.no_grad()
def test_position_embeddings_resampled_like_interpolate_pos_encoding() -> None:
    hf = _hf_retrieval(image_size=28)
    ours = build_from_hf_config(hf.config, image_size=42).eval()
    report = load_hf_state_dict(ours, hf.state_dict(), "tiny")
    assert report.resampled == ["vision.vit.pos_embed"]
    assert ours.vision.vit.pos_embed.shape == (1, 1 + 3 * 3, 24)
    pixels, _, _ = inputs(42)
    hf_vision = hf.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
    our_vision = ours.image_embeds(pixels)
    assert _max_diff(hf_vision, our_vision) <= TOL
    assert _max_diff(_hf_query_outputs(hf, hf_vision), ours.query_features(our_vision)[0]) <= TOL


@torch.no_grad()
def test_export_to_hf_directory_round_trip(tmp_path: Path) -> None:
    hf = _hf_retrieval(num_query_tokens=8, image_size=28)
    ours = build_from_hf_config(hf.config).eval()
    load_hf_state_dict(ours, hf.state_dict(), "tiny")
    report = export_hf_retrieval(ours, tmp_path / "hf")
    assert any("temp" in note and "lm_head" in note for note in report.notes)  # not representable, said so
    back, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "hf", output_loading_info=True)
    back.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels, ids, mask = inputs(28)
    for itm in (True, False):
        want = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm).logits_per_image
        got = back(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm).logits_per_image
        assert _max_diff(want, got) <= TOL
    # and our loader reads the exported directory back to the same weights
    again, _ = load_hf_retrieval(tmp_path / "hf")
    for name, tensor in ours.state_dict().items():
        if not name.startswith(("temp", "lm_head")):
            assert torch.equal(tensor, again.state_dict()[name]), name


@torch.no_grad()
def test_generation_checkpoint_to_vision_qformer(tmp_path: Path) -> None:
    text_config = dict(model_type="opt", vocab_size=60, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                       num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    config = blip2_config(text_input=False, text_config=text_config)
    config.image_token_index = 59
    torch.manual_seed(0)
    hf = perturb_(Blip2ForConditionalGeneration(config)).eval()
    hf.save_pretrained(tmp_path / "gen", max_shard_size="20KB")  # sharded safetensors with an index
    assert (tmp_path / "gen" / "model.safetensors.index.json").is_file()
    with pytest.raises(CheckpointError, match="VisionQFormer"):
        load_hf_retrieval(tmp_path / "gen")
    parts, report = load_pretrained(tmp_path / "gen")
    parts.eval()
    assert isinstance(parts, VisionQFormer) and not parts.qformer.has_text
    assert report.missing == [] and report.unexpected == []
    _, language = split_hf_state_dict(hf.state_dict())
    # save_pretrained does not write the OPT head tied to its input embeddings
    assert set(language) - set(parts.language_state) == {"language_model.lm_head.weight"}
    assert all(torch.equal(v, language[k]) for k, v in parts.language_state.items())
    assert parts.language_config["model_type"] == "opt"
    pixels, _, _ = inputs(28)
    hf_vision = hf.vision_model(pixels).last_hidden_state
    assert _max_diff(hf_vision, parts.vision(pixels)) <= TOL
    assert _max_diff(_hf_query_outputs(hf, hf_vision), parts(pixels)) <= TOL


@torch.no_grad()
def test_bare_qformer_checkpoint(tmp_path: Path) -> None:
    config = Blip2QFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, cross_attention_frequency=1, encoder_hidden_size=24)
    torch.manual_seed(0)
    hf = perturb_(Blip2QFormerModel(config)).eval()
    ours = build_qformer_from_hf_config(config, num_query_tokens=5).eval()
    report = load_hf_state_dict(ours, hf.state_dict(), "bare")
    assert report.missing == ["query_tokens"]
    queries = torch.randn(2, 5, 32)
    image = torch.randn(2, 7, 24)
    with torch.no_grad():
        ours.query_tokens.copy_(queries[:1])
    want = hf(query_embeds=queries[:1].expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    assert _max_diff(want, ours.encode_queries(image).hidden) <= TOL


def test_reads_pytorch_bin_directory_and_native_round_trip(tmp_path: Path) -> None:
    hf = _hf_retrieval()
    (tmp_path / "bin").mkdir()
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ours, report = load_pretrained(tmp_path / "bin")
    assert isinstance(ours, OurModel) and report.kind.startswith("hf:")  # config.json without architectures
    save_native(ours, tmp_path / "ours.pt")
    again, native_report = load_pretrained(tmp_path / "ours.pt")
    assert native_report.missing == [] and native_report.unexpected == []
    assert again.lm_head_tied
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    bigger, resized = load_pretrained(tmp_path / "ours.pt", image_size=42)
    assert resized.resampled == ["vision.vit.pos_embed"] and bigger.vision.image_size == 42


def test_wrong_kind_and_wrong_shape_errors() -> None:
    hf = _hf_retrieval()
    ours = build_from_hf_config(hf.config)
    state = dict(hf.state_dict())
    bad = dict(state)
    bad["qformer.encoder.layer.1.attention.output.dense.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError, match=r"attention\.output\.dense\.weight.*\(32, 31\).*\(32, 32\)"):
        load_hf_state_dict(ours, bad, "bad")
    missing = {k: v for k, v in state.items() if k != "itm_head.weight"}
    with pytest.raises(CheckpointError, match="itm_head.linear.weight"):
        load_hf_state_dict(ours, missing, "missing")
    extra = dict(state, **{"qformer.encoder.layer.9.output_query.dense.weight": torch.zeros(32, 64)})
    with pytest.raises(CheckpointError, match="layer.9"):
        load_hf_state_dict(ours, extra, "extra")
    partial = {k: v for k, v in state.items() if "layer.0.attention.attention.key." not in k}
    with pytest.raises(CheckpointError, match="incomplete"):
        load_hf_state_dict(ours, partial, "partial")
    with pytest.raises(CheckpointError, match="LAVIS"):
        load_hf_state_dict(ours, {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(32)}, "lavis")
    with pytest.raises(CheckpointError, match="not a Hugging Face Blip2"):
        load_hf_state_dict(ours, {"foo.weight": torch.ones(2)}, "foo")
    with pytest.raises(CheckpointError, match="vision_width|shape mismatch"):
        load_hf_state_dict(build_from_hf_config(blip2_config(vision_width=16)), state, "narrow")


def test_hub_id_offline_says_to_pass_a_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="local directory"):
        load_hf_retrieval("Salesforce/blip2-itm-vit-g-does-not-exist")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_pretrained("/no/such/path.pt")


def test_exported_config_is_the_retrieval_flavour(tmp_path: Path) -> None:
    hf = _hf_retrieval(num_query_tokens=8, cross_attention_frequency=1)
    ours = build_from_hf_config(hf.config)
    load_hf_state_dict(ours, hf.state_dict(), "tiny")
    export_hf_retrieval(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Blip2ForImageTextRetrieval"]
    assert config["num_query_tokens"] == 8 and config["image_token_index"] is None
    assert config["qformer_config"]["use_qformer_text_input"] is True
    assert config["qformer_config"]["cross_attention_frequency"] == 1
    assert config["vision_config"]["intermediate_size"] == 56 and config["vision_config"]["num_hidden_layers"] == 2
