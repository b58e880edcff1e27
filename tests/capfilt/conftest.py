"""Tiny random captioner (BLIP) and CLIP saved as offline model directories, and small corpora."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qformer_lightning.capfilt import CapFilt
from qformer_lightning.data.synthetic import SyntheticCorpus, make_synthetic_corpus

from capfilt_tiny import IMAGE, TINY_SAMPLING, tiny_tokenizer


@pytest.fixture(scope="session")
def captioner_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer BLIP captioner; its tokenizer has BLIP's layout (BERT WordPiece + [DEC] as bos, [ENC])."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

    out = tmp_path_factory.mktemp("captioner")
    tok = tiny_tokenizer(blip=True)
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8, initializer_range=0.2),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 1-layer CLIP with a WordPiece tokenizer standing in for CLIP's BPE (text pooled at [SEP])."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = tmp_path_factory.mktemp("clip")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=IMAGE, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def capfilt(captioner_dir: str, clip_dir: str) -> CapFilt:
    """The tiny pipeline: 3 captions per image, batches of 4, no loader workers."""
    return CapFilt.from_pretrained(captioner_dir, clip_dir, TINY_SAMPLING, batch_size=4, num_workers=0, seed=0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    """20 train images in 4 shards of 5 (32 px), 5 val images."""
    root: Path = tmp_path_factory.mktemp("capfilt_corpus") / "synthetic"
    return make_synthetic_corpus(root, num_train=20, num_val=5, num_test=2, image_size=IMAGE, shard_size=5)


@pytest.fixture(scope="session")
def recaptioned(capfilt: CapFilt, corpus: SyntheticCorpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus' train shards re-captioned by the tiny pipeline (an output directory)."""
    out = tmp_path_factory.mktemp("recaptioned")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the root conftest's per-test one-thread fixture
    try:
        summary = capfilt.run(corpus.shards("train"), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.shards_written == 4 and summary.images == 20 and summary.unreadable == 0
    return out
