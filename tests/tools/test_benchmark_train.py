"""tools/benchmark_train.py: the tiny runs print finite figures, and the analytic model FLOPs equal
hand computations and torch's FLOP counter (attention as explicit matmuls so that it is counted)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qformer_lightning.encoders.llm import LanguageModel
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.nn.qformer import QFormer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import benchmark_train as bt  # noqa: E402


def figures(text: str) -> dict[str, float]:
    """The numbers of the printed report."""
    found = {}
    for key, pattern in {
        "samples_per_s": r"^samples/s: (\S+)$",
        "median_step": r"^median step time \(s\): (\S+)$",
        "loss": r"^loss: (\S+) ",
        "tflops": r"^model TFLOPs per step: (\S+)$",
        "memory": r"^peak memory \(GiB\): (\S+) ",
    }.items():
        match = re.search(pattern, text, re.MULTILINE)
        assert match is not None, f"{pattern!r} not in the report:\n{text}"
        found[key] = float(match.group(1))
    return found


@pytest.mark.parametrize("args", [
    ["--stage", "1"], ["--stage", "2", "--llm", "opt2.7b"], ["--stage", "2", "--llm", "flant5xl"],
    ["--stage", "1", "--precision", "bf16-mixed"], ["--stage", "2", "--llm", "flant5xl", "--precision", "bf16-mixed"],
])  # bf16-mixed: the GPU default, here on CPU autocast
def test_tiny_run_prints_figures(args: list[str], capsys: pytest.CaptureFixture) -> None:
    result = bt.main([*args, "--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4"])
    out = capsys.readouterr().out
    got = figures(out)
    assert got["samples_per_s"] > 0 and got["median_step"] > 0 and got["memory"] > 0
    assert math.isfinite(got["loss"]) and got["loss"] > 0
    assert len(result.step_times) == 2 and result.batch == 4
    assert got["samples_per_s"] == pytest.approx(4 / got["median_step"], rel=1e-2)
    assert got["tflops"] * 1e12 == pytest.approx(result.flops_per_step, rel=1e-5)
    assert "MFU: n/a" in out  # CPU without --peak-tflops
    assert ("precision bf16-mixed" in result.name) == ("bf16-mixed" in args)
    assert result.trainable_params > 0 and result.frozen_params > 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="steps >= 1"):
        bt.benchmark(1, size="tiny", steps=0, device="cpu")
    with pytest.raises(ValueError, match="unknown size/llm"):
        bt.benchmark(2, llm="opt6.7b", size="tiny", device="cpu")


def test_mfu_uses_the_given_peak() -> None:
    result = bt.Result("x", "cpu", batch=4, step_times=[0.5, 1.0, 2.0], losses=[1.0], flops_per_step=3e12,
                       peak_memory_gib=1.0, memory_kind="rss", peak_tflops=10.0, trainable_params=1, frozen_params=1)
    assert result.samples_per_s == 4.0  # batch / median step
    assert result.mfu == pytest.approx(0.3)  # 3 TFLOP in 1 s of a 10 TFLOP/s device


def test_qformer_passes_by_hand() -> None:
    # 2 layers, D=8, FFN 16, cross-attention in layer 0 only, image features 12 wide
    qformer = QFormer(num_layers=2, hidden_size=8, num_heads=2, intermediate_size=16, num_query_tokens=4,
                      cross_attention_freq=2, vision_width=12, vocab_size=30, max_position_embeddings=16)
    shape = bt.QFormerShape.of(qformer)
    # per layer: qkv 8x24 + out 8x8 = 256; each FFN 8x16 + 16x8 = 256; cross q + out 128, kv 12x16 = 192
    assert (shape.self_attn, shape.query_ffn, shape.text_ffn, shape.cross_q, shape.cross_kv) == (512, 512, 512, 128, 192)
    q, t, n = 4, 3, 5
    assert shape.query_pass(q, n) == 2 * (512 + 512 + 128) * 4 + 2 * 192 * 5 + 4 * 2 * 4 * 4 * 8 + 4 * 1 * 4 * 5 * 8
    assert shape.query_pass(q, n) == 12800
    assert shape.text_pass(t) == 2 * 1024 * 3 + 4 * 2 * 9 * 8 == 6720
    assert shape.joint_pass(q, t, n) == 2 * 512 * 7 + 2 * 512 * 4 + 2 * 512 * 3 + 2 * 128 * 4 + 2 * 192 * 5 + 4 * 2 * 49 * 8 + 4 * 4 * 5 * 8
    assert shape.decode_pass(q, t) == 2 * 1024 * 3 + 4 * 2 * 3 * 7 * 8 == 7488


def test_stage1_step_flops_by_hand() -> None:
    task = bt.build_task(1, None, "tiny", torch.device("cpu"), "32")  # configs/demo/stage1.yaml
    shape = bt.QFormerShape.of(task.model.qformer)
    # ViT: 64 px, patch 8 (64 patches + cls = 65 tokens), width 64, 3 - 1 blocks of qkv 64x192, proj 64x64,
    # MLP 64x128 + 128x64
    vit = 2 * (3 * 8 * 8 * 64) * 64 + 2 * 2 * (12288 + 4096 + 8192 + 8192) * 65 + 4 * 2 * 65 * 65 * 64
    assert bt.vit_flops(task.model.vision) == vit == 12_255_744
    # Q-Former 2 layers x 64 with cross-attention in both (freq 1), image width 64, 8 queries, 30523 vocab
    assert (shape.self_attn, shape.query_ffn, shape.cross_q, shape.cross_kv) == (2 * 16384, 2 * 16384, 2 * 8192, 2 * 8192)
    q, t, n, b = 8, 14, 65, 4  # 12 words + [CLS] + [SEP]
    heads = 2 * 64 * 64 * q + 2 * 64 * 64 + 3 * 2 * 128 * q + 4 * b * q * 64
    lm_head = 2 * (64 * 64 + 64 * 30523) * t
    trainable = shape.query_pass(q, n) + shape.text_pass(t) + 3 * shape.joint_pass(q, t, n) + shape.decode_pass(q, t)
    expected = b * (vit + 3 * (trainable + lm_head + heads))
    batch = bt.synthetic_batch(b, 64, 12, 0, torch.device("cpu"))
    assert bt.step_flops(task, 1, batch, 0) == expected


def test_vit_flops_match_flop_counter() -> None:
    encoder = TimmVisionEncoder(image_size=32, model_kwargs=dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0))
    for block in encoder.vit.blocks:
        block.attn.fused_attn = False  # explicit matmuls: the counter sees the attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(torch.randn(2, 3, 32, 32))
    assert counter.get_total_flops() == 2 * bt.vit_flops(encoder)


@pytest.mark.parametrize("llm", ["opt2.7b", "flant5xl"])
def test_llm_flops_match_flop_counter(llm: str) -> None:
    """Forward + backward to a soft prompt that needs its gradient, weights frozen, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    fields = dict(bt.LLM_CONFIGS[("tiny", llm)])
    config = AutoConfig.for_model(fields.pop("model_type"), attn_implementation="eager", **fields)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    lm = LanguageModel.from_modules(auto.from_config(config), bt.word_tokenizer(config.model_type), target_suffix=None)
    soft = torch.randn(3, 5, 64, requires_grad=True)  # (B, Q, Dl)
    texts = bt.captions(3, 7, torch.Generator().manual_seed(0))
    inputs = lm.training_inputs(soft, texts, None, config.is_encoder_decoder, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits, _ = lm(inputs)
        logits.sum().backward()
    if config.is_encoder_decoder:
        sequence = (inputs.inputs_embeds.shape[1], inputs.labels.shape[1])
        assert sequence[0] > 5 and sequence[1] > 1  # prefix in the encoder, the rest in the decoder
    else:
        sequence = (inputs.inputs_embeds.shape[1], inputs.input_ids.shape[1] + 1)
        assert sequence == (5 + 1 + 7 + 1, 10)  # queries, BOS, words, EOS; logits from the last query on
    assert soft.grad is not None
    assert counter.get_total_flops() == 3 * bt.llm_flops(lm.model, sequence)
