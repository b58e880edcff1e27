"""Checkpoint sizes of the paper's stage 1 (ViT-g) and stage 2 (FlanT5-XXL), ours vs a full one.

    python tools/checkpoint_size.py [--stage1 configs/stage1_vitg.yaml] [--stage2 configs/stage2_flant5xxl.yaml]

Nothing is downloaded and no memory is used for weights: each task is built from its experiment
config by the CLI with every parameter on the ``meta`` device (ViT and Q-Former from their
classes, the LLM from its published architecture: FlanT5-XXL is d_model 4096, d_ff 10240, 24+24
layers, 64 heads of 64, vocabulary 32128), its frozen parts cast to ``frozen_dtype`` as in training,
and then the task's own :meth:`~qformer_lightning.tasks.base.Blip2Task.on_save_checkpoint` decides
what is kept. Sizes count tensor bytes:

- weights: the state-dict entries kept (ours) or all of them (full);
- optimizer: AdamW's two fp32 moments per trainable parameter plus one fp32 step per tensor;
- the rest (loops, data-loader position, scheduler, config text) is a few kilobytes.

Prints one table row per stage: trainable / frozen parameters, ours, full, ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qformer_lightning.cli import Blip2CLI  # noqa: E402
from qformer_lightning.tasks.base import Blip2Task  # noqa: E402

FLAN_T5_XXL = dict(
    d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, relative_attention_num_buckets=32,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
"""google/flan-t5-xxl's config.json (the fields that set parameter shapes)."""

CPU_OVERRIDES = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.logger=false",
                 "--trainer.strategy=auto", "--trainer.callbacks=[]"]

NO_DATA = ["--data=lightning.pytorch.demos.boring_classes.BoringDataModule"]
"""Stage-2 experiment configs leave the data to a composed config; sizes do not depend on it."""


@dataclass
class CheckpointSize:
    """Bytes and parameter counts of one task's checkpoint."""

    name: str
    trainable_params: int
    frozen_params: int
    kept_weight_bytes: int
    all_weight_bytes: int
    optimizer_bytes: int

    @property
    def ours(self) -> int:
        return self.kept_weight_bytes + self.optimizer_bytes

    @property
    def full(self) -> int:
        return self.all_weight_bytes + self.optimizer_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique_bytes(tensors) -> int:
    """Bytes of distinct tensors (tied weights, e.g. the ITG head and the word embeddings, are
    stored once by ``torch.save``; on ``meta`` they are told apart by object identity)."""
    return sum(_nbytes(t) for t in {id(t): t for t in tensors}.values())


def measure(task: Blip2Task, name: str) -> CheckpointSize:
    """What ``task.on_save_checkpoint`` keeps, in bytes (tensors may be on ``meta``)."""
    state = task.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    checkpoint = {"state_dict": dict(state)}
    task.on_save_checkpoint(checkpoint)
    trainable = [p for p in task.parameters() if p.requires_grad]
    frozen = [p for p in task.parameters() if not p.requires_grad]
    return CheckpointSize(
        name=name,
        trainable_params=sum(p.numel() for p in trainable),
        frozen_params=sum(p.numel() for p in frozen),
        kept_weight_bytes=_unique_bytes(checkpoint["state_dict"].values()),
        all_weight_bytes=_unique_bytes(state.values()),
        optimizer_bytes=sum(2 * p.numel() * 4 + 4 for p in trainable),
    )


def _build(config: str, extra: list[str]) -> Blip2Task:
    """The config's task with every tensor on ``meta`` (built by the CLI, nothing run)."""
    with torch.device("meta"):
        cli = Blip2CLI(args=["--config", config, *CPU_OVERRIDES, *extra], run=False)
    return cli.model


def _cast_frozen(task: Blip2Task) -> None:
    """Frozen modules in ``frozen_dtype``, as ``configure_model`` leaves them."""
    if task.frozen_dtype is not None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[task.frozen_dtype]
        for module in task.frozen_modules():
            module.to(dtype)


def stage1_size(config: str) -> CheckpointSize:
    """Stage 1: the ViT's weights come from timm (``pretrained: true``), so they are not stored."""
    task = _build(config, ["--model.init_args.model.init_args.vision.init_args.pretrained=false",
                           "--model.init_args.bert_init=null"])
    task.model.vision.has_weight_source = True  # as with the config's pretrained=true, without the download
    task.apply_freezing()
    _cast_frozen(task)
    return measure(task, f"stage 1 ({Path(config).stem})")


def _word_tokenizer():
    """A T5-style tokenizer (``<pad>``=0, ``</s>``=1 appended): shapes only need its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def stage2_size(config: str, llm_config: dict | None = None) -> CheckpointSize:
    """Stage 2: the LLM (FlanT5-XXL unless ``llm_config`` says otherwise) built on ``meta`` in its dtype."""
    from transformers import T5Config, T5ForConditionalGeneration

    task = _build(config, ["--model.init_args.model.init_args.vision.init_args.pretrained=false", *NO_DATA])
    task.model.vision.has_weight_source = True
    llm = task.model.llm
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[llm.dtype_name]
    with torch.device("meta"):
        t5 = T5ForConditionalGeneration(T5Config(**(llm_config or FLAN_T5_XXL))).to(dtype)
        llm.attach(t5, _word_tokenizer())
        task.model.build()  # the projection to the LLM width
    task.apply_freezing()
    _cast_frozen(task)
    return measure(task, f"stage 2 ({Path(config).stem})")


def _gb(n: int) -> str:
    return f"{n / 1e9:8.3f} GB"


def table(rows: list[CheckpointSize]) -> str:
    lines = [f"{'checkpoint':34} {'trainable':>12} {'frozen':>14} {'ours':>11} {'full':>11} {'full/ours':>9}"]
    for r in rows:
        lines.append(f"{r.name:34} {r.trainable_params:12,} {r.frozen_params:14,} {_gb(r.ours)} {_gb(r.full)} "
                     f"{r.full / r.ours:9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", default="configs/stage1_vitg.yaml")
    parser.add_argument("--stage2", default="configs/stage2_flant5xxl.yaml")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    print(table([stage1_size(args.stage1), stage2_size(args.stage2)]))


if __name__ == "__main__":
    main()
