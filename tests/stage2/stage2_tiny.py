"""Tiny offline building blocks for the stage-2 tests: word-level tokenizers, LLM configs, models."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import OPTConfig, PreTrainedTokenizerFast, T5Config

from qformer_lightning.encoders.llm import LanguageModel
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2_llm import Blip2LLMModel
from qformer_lightning.nn.qformer import QFormer

WORDS = (
    "a photo of the dog cat sits runs on grass red blue big small man woman bike rides street tree "
    "question answer what is color how many two three yes no sky under near water boat ."
).split()
IMAGE_TOKEN = "<image>"
Q = 4


def word_tokenizer(kind: str, bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer. ``opt``: ``<pad>``=1, ``</s>``=2 as BOS/EOS, BOS in front (as OPT's;
    ``bos=False``: no special tokens added, as SmolLM2's); ``t5``: ``<pad>``=0, ``</s>``=1, EOS at the
    end (as T5's). The last id is ``<image>``."""
    if kind == "opt":
        specials = ["<unk0>", "<pad>", "</s>", "<unk>"]
    elif kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        raise ValueError(kind)
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS) + [IMAGE_TOKEN])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    eos = ("</s>", vocab["</s>"])
    if kind == "opt":
        if bos:
            tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[eos])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[eos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def opt_config(vocab_size: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=128, word_embed_proj_dim=16, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        dropout=0.0, attention_dropout=0.0, init_std=0.5,
    )


def t5_config(vocab_size: int, factor: float = 1.0) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, initializer_factor=factor,
    )


def tiny_llm(kind: str, seed: int = 0, bos: bool = True, **kwargs) -> LanguageModel:
    """A random tiny OPT (``opt``) or T5 (``t5``) behind the adapter."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    tok = word_tokenizer(kind, bos)
    torch.manual_seed(seed)
    if kind == "opt":
        model = AutoModelForCausalLM.from_config(opt_config(len(tok)))
    else:
        model = AutoModelForSeq2SeqLM.from_config(t5_config(len(tok)))
    return LanguageModel.from_modules(model.eval(), tok, **kwargs)


def tiny_vision_qformer(seed: int = 0, text_ffn: bool = False) -> tuple[TimmVisionEncoder, QFormer]:
    torch.manual_seed(seed)
    vision = TimmVisionEncoder(image_size=28, model_kwargs=dict(embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0))
    qformer = QFormer(
        num_layers=2, hidden_size=32, num_heads=4, intermediate_size=48, num_query_tokens=Q, cross_attention_freq=2,
        vision_width=16, vocab_size=60, max_position_embeddings=32, text_ffn=text_ffn, dropout=0.0, attention_dropout=0.0,
    )
    return vision, qformer


def tiny_model(kind: str, seed: int = 0, bos: bool = True, **llm_kwargs) -> Blip2LLMModel:
    vision, qformer = tiny_vision_qformer(seed)
    model = Blip2LLMModel(vision, qformer, tiny_llm(kind, seed, bos, **llm_kwargs))
    return model.eval()
