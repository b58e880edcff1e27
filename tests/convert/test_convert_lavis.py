"""LAVIS layout: exporter key names/shapes against the LAVIS source, and exact import(export(model)) round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from convert_tiny import blip2_config, inputs, perturb_
from transformers import Blip2ForImageTextRetrieval

from qformer_lightning.convert import CheckpointError, VisionQFormer, load_pretrained
from qformer_lightning.convert.hf import build_from_hf_config, load_hf_state_dict
from qformer_lightning.convert.lavis import (
    build_from_lavis_state_dict,
    export_lavis_state_dict,
    load_lavis_state_dict,
    save_lavis_checkpoint,
)
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

DV, D, Q, V, E, P, FFN, VIT_MLP = 24, 32, 4, 50, 16, 16, 64, 56


def _vision() -> TimmVisionEncoder:
    return TimmVisionEncoder(image_size=28, num_removed_blocks=0,
                             model_kwargs=dict(embed_dim=DV, depth=2, num_heads=2, mlp_ratio=VIT_MLP / DV, patch_size=14))


def _model(tie: bool = True, seed: int = 0) -> Blip2QFormerModel:
    torch.manual_seed(seed)
    qformer = QFormer(num_layers=3, hidden_size=D, num_heads=4, intermediate_size=FFN, num_query_tokens=Q,
                      cross_attention_freq=2, vision_width=DV, vocab_size=V, max_position_embeddings=P)
    model = Blip2QFormerModel(_vision(), qformer, embed_dim=E, vocab_size=V, tie_lm_head=tie)
    return perturb_(model, seed).eval()


def _expected_lavis_shapes(text: bool = True, heads: bool = True, vision: bool = True) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a LAVIS BLIP-2 state dict, written from LAVIS's eva_vit.py (VisionTransformer,
    Block, Attention, Mlp, PatchEmbed), Qformer.py (BertEmbeddings, BertLayer, BertOnlyMLMHead) and
    blip2_qformer.py (ln_vision, query_tokens, vision_proj, text_proj, itm_head, temp) for these tiny sizes."""
    shapes: dict[str, tuple[int, ...]] = {"ln_vision.weight": (DV,), "ln_vision.bias": (DV,), "query_tokens": (1, Q, D)}
    if vision:
        shapes.update({
            "visual_encoder.cls_token": (1, 1, DV),
            "visual_encoder.pos_embed": (1, 5, DV),
            "visual_encoder.patch_embed.proj.weight": (DV, 3, 14, 14),
            "visual_encoder.patch_embed.proj.bias": (DV,),
        })
        for i in range(2):
            b = f"visual_encoder.blocks.{i}"
            shapes.update({
                f"{b}.norm1.weight": (DV,), f"{b}.norm1.bias": (DV,),
                f"{b}.attn.q_bias": (DV,), f"{b}.attn.v_bias": (DV,), f"{b}.attn.qkv.weight": (3 * DV, DV),
                f"{b}.attn.proj.weight": (DV, DV), f"{b}.attn.proj.bias": (DV,),
                f"{b}.norm2.weight": (DV,), f"{b}.norm2.bias": (DV,),
                f"{b}.mlp.fc1.weight": (VIT_MLP, DV), f"{b}.mlp.fc1.bias": (VIT_MLP,),
                f"{b}.mlp.fc2.weight": (DV, VIT_MLP), f"{b}.mlp.fc2.bias": (DV,),
            })
    e = "Qformer.bert.embeddings"
    shapes.update({f"{e}.LayerNorm.weight": (D,), f"{e}.LayerNorm.bias": (D,)})
    if text:
        shapes.update({f"{e}.word_embeddings.weight": (V, D), f"{e}.position_embeddings.weight": (P, D),
                       f"{e}.position_ids": (1, P)})
    for i in range(3):
        layer = f"Qformer.bert.encoder.layer.{i}"
        blocks = ["attention"] + (["crossattention"] if i % 2 == 0 else [])
        for block in blocks:
            width = DV if block == "crossattention" else D
            for name in ("query", "key", "value"):
                shapes[f"{layer}.{block}.self.{name}.weight"] = (D, D if name == "query" else width)
                shapes[f"{layer}.{block}.self.{name}.bias"] = (D,)
            shapes.update({f"{layer}.{block}.output.dense.weight": (D, D), f"{layer}.{block}.output.dense.bias": (D,),
                           f"{layer}.{block}.output.LayerNorm.weight": (D,), f"{layer}.{block}.output.LayerNorm.bias": (D,)})
        for suffix in ([""] if text else []) + ["_query"]:
            shapes.update({
                f"{layer}.intermediate{suffix}.dense.weight": (FFN, D), f"{layer}.intermediate{suffix}.dense.bias": (FFN,),
                f"{layer}.output{suffix}.dense.weight": (D, FFN), f"{layer}.output{suffix}.dense.bias": (D,),
                f"{layer}.output{suffix}.LayerNorm.weight": (D,), f"{layer}.output{suffix}.LayerNorm.bias": (D,),
            })
    if heads:
        c = "Qformer.cls.predictions"
        shapes.update({
            f"{c}.transform.dense.weight": (D, D), f"{c}.transform.dense.bias": (D,),
            f"{c}.transform.LayerNorm.weight": (D,), f"{c}.transform.LayerNorm.bias": (D,),
            f"{c}.decoder.weight": (V, D), f"{c}.decoder.bias": (V,), f"{c}.bias": (V,),
            "vision_proj.weight": (E, D), "vision_proj.bias": (E,), "text_proj.weight": (E, D), "text_proj.bias": (E,),
            "itm_head.weight": (2, D), "itm_head.bias": (2,), "temp": (),
        })
    return shapes


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tie", [True, False], ids=["tied-lm-head", "untied-lm-head"])
def test_export_matches_lavis_names_and_round_trips_exactly(tie: bool) -> None:
    model = _model(tie)
    with torch.no_grad():
        model.temp.fill_(0.05)
    state = export_lavis_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == _expected_lavis_shapes()
    assert torch.equal(state["Qformer.cls.predictions.decoder.bias"], state["Qformer.cls.predictions.bias"])
    assert torch.equal(state["Qformer.bert.encoder.layer.0.attention.self.key.weight"],
                       model.qformer.layers[0].self_attn.qkv_proj.weight[D: 2 * D])
    assert torch.equal(state["visual_encoder.blocks.1.attn.v_bias"], model.vision.vit.blocks[1].attn.v_bias)
    back = build_from_lavis_state_dict(state, vision_num_heads=2, qformer_num_heads=4).eval()
    assert isinstance(back, Blip2QFormerModel) and back.lm_head_tied == tie
    report = load_lavis_state_dict(back, state, "lavis")
    assert report.missing == [] and report.unexpected == [] and report.resampled == []
    assert sorted(report.ignored) == ["Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.bias"]
    _assert_same_state(model, back)
    assert back.vision.vit.blocks[0].norm1.eps == 1e-6 and back.vision.ln_vision.eps == 1e-5
    pixels, ids, mask = inputs(28)
    with torch.no_grad():
        emb = model.image_embeds(pixels)
        assert torch.equal(emb, back.image_embeds(pixels))
        assert torch.equal(model.itm_logits(emb, ids, mask), back.itm_logits(emb, ids, mask))


def test_checkpoint_file_with_model_wrapper_and_resampling(tmp_path: Path) -> None:
    model = _model()
    path = save_lavis_checkpoint(model, tmp_path / "blip2.pth")
    assert set(torch.load(path, weights_only=True)) == {"model"}
    back, report = load_pretrained(path, vision_num_heads=2, qformer_num_heads=4)
    assert report.kind == "lavis" and report.missing == []
    _assert_same_state(model, back)
    bigger, report = load_pretrained(path, image_size=42, vision_num_heads=2, qformer_num_heads=4)
    assert report.resampled == ["vision.vit.pos_embed"] and bigger.vision.vit.pos_embed.shape == (1, 10, DV)


def test_checkpoint_without_frozen_vit_keeps_the_given_encoder() -> None:
    model = _model()
    state = export_lavis_state_dict(model, include_vision=False)
    assert not any(k.startswith("visual_encoder.") for k in state)
    vision = _vision()
    before = {k: v.clone() for k, v in vision.vit.state_dict().items()}
    back = build_from_lavis_state_dict(state, vision=vision, qformer_num_heads=4)
    report = load_lavis_state_dict(back, state, "no-vit")
    assert back.vision is vision and all(k.startswith("vision.vit.") for k in report.missing) and report.missing
    assert all(torch.equal(v, vision.vit.state_dict()[k]) for k, v in before.items())
    assert torch.equal(back.vision.ln_vision.weight, model.vision.ln_vision.weight)


def test_stage2_checkpoint_loads_as_vision_qformer() -> None:
    torch.manual_seed(0)
    qformer = QFormer(num_layers=3, hidden_size=D, num_heads=4, intermediate_size=FFN, num_query_tokens=Q,
                      vision_width=DV, text_ffn=False)
    language = {"opt_proj.weight": torch.randn(20, D), "opt_proj.bias": torch.randn(20)}
    parts = perturb_(VisionQFormer(_vision(), qformer, language)).eval()
    state = export_lavis_state_dict(parts)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        **_expected_lavis_shapes(text=False, heads=False), "opt_proj.weight": (20, D), "opt_proj.bias": (20,)
    }
    with pytest.raises(CheckpointError, match="stage-2"):
        load_lavis_state_dict(_model(), state, "stage2")
    back = build_from_lavis_state_dict(state, vision_num_heads=2, qformer_num_heads=4)
    assert isinstance(back, VisionQFormer) and not back.qformer.has_text
    report = load_lavis_state_dict(back, {"model": state}, "stage2")
    assert report.missing == [] and report.unexpected == []
    _assert_same_state(parts, back)
    assert back.language_state.keys() == language.keys()


def test_hf_to_lavis_to_ours_keeps_hf_outputs() -> None:
    """HF retrieval model -> ours -> LAVIS -> ours: the query outputs still equal transformers'."""
    torch.manual_seed(0)
    hf = perturb_(Blip2ForImageTextRetrieval(blip2_config(vision_eps=1e-6))).eval()
    ours = build_from_hf_config(hf.config).eval()
    load_hf_state_dict(ours, hf.state_dict(), "hf")
    state = export_lavis_state_dict(ours)
    back = build_from_lavis_state_dict(state, vision_num_heads=2, qformer_num_heads=4,
                                       ln_vision_eps=1e-6).eval()
    load_lavis_state_dict(back, state, "lavis")
    pixels, ids, mask = inputs(28)
    with torch.no_grad():
        want = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
        got = back.itm_logits(back.image_embeds(pixels), ids, mask)
    assert (want - got).abs().max() <= 1e-5


def test_errors_name_keys_and_shapes() -> None:
    model = _model()
    state = export_lavis_state_dict(model)
    bad = dict(state, **{"text_proj.weight": torch.zeros(E + 1, D)})
    with pytest.raises(CheckpointError, match=r"text_proj\.weight.*\(17, 32\).*\(16, 32\)"):
        load_lavis_state_dict(model, bad, "bad")
    bad = dict(state, **{"Qformer.cls.predictions.decoder.bias": torch.zeros(V)})
    with pytest.raises(CheckpointError, match="decoder.bias"):
        load_lavis_state_dict(model, bad, "alias")
    untied = dict(state, **{"Qformer.cls.predictions.decoder.weight": torch.zeros(V, D)})
    with pytest.raises(CheckpointError, match="ties"):
        load_lavis_state_dict(model, untied, "untied")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_lavis_state_dict(model, {"vision_model.post_layernorm.weight": torch.ones(DV)}, "hf")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_lavis_state_dict(model, dict(state, **{"Qformer.bert.encoder.layer.7.output.dense.bias": torch.zeros(D)}), "x")
