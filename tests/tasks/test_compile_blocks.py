"""The CompileBlocks callback compiles the chosen parts' blocks once, in place, before the first
step; compiled blocks give the eager results; bad settings are refused with a clear message."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from test_stage1 import IMAGE, datamodule, tiny_stage1

from qformer_lightning.callbacks import CompileBlocks
from qformer_lightning.callbacks.compile import compile_blocks
from qformer_lightning.data.synthetic import make_synthetic_corpus
from qformer_lightning.nn.qformer import QFormerLayer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("compile") / "synthetic"
    return make_synthetic_corpus(root, num_train=32, num_val=8, num_test=8, image_size=IMAGE, shard_size=16)


def test_vision_blocks_compiled_once_and_equal_eager(corpus, tmp_path) -> None:
    task = tiny_stage1()
    callback = CompileBlocks(targets=["vision"])
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path, callbacks=[callback],
    )
    trainer.fit(task, datamodule=datamodule(corpus, batch_size=4))
    blocks = list(task.model.vision.vit.blocks)
    assert callback.compiled == [f"vision.vit.blocks.{i}" for i in range(len(blocks))]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(layer._compiled_call_impl is None for layer in task.model.qformer.modules() if isinstance(layer, QFormerLayer))
    assert "model.vision.vit.blocks.0.attn.qkv.weight" in task.state_dict()  # compiling renames nothing

    callback._apply(trainer, task)  # a later stage (validate/test) does not compile again
    assert callback.compiled == [f"vision.vit.blocks.{i}" for i in range(len(blocks))]

    x = torch.randn(2, 17, blocks[0].norm1.normalized_shape[0])
    with torch.no_grad():
        compiled, eager = blocks[0](x), blocks[0].forward(x)  # __call__ runs the compiled function
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown compile targets \['vit'\]"):
        CompileBlocks(targets=["vit"])
    with pytest.raises(ValueError, match="cannot import block class"):
        CompileBlocks(block_classes=["no.such.Block"])
    task = tiny_stage1()
    with pytest.raises(ValueError, match=r"has no 'llm' part"):
        compile_blocks(task.model, ("llm",), (QFormerLayer,))

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(use_orig_params=False))
    with pytest.raises(ValueError, match="use_orig_params: true"):
        CompileBlocks()._apply(trainer, task)


def test_added_from_the_command_line_as_docs_scaling_shows(tmp_path) -> None:
    from qformer_lightning.cli import Blip2CLI

    cli = Blip2CLI(args=[
        "--config", "configs/demo/stage1.yaml", "--trainer.callbacks+=qformer_lightning.callbacks.CompileBlocks",
        "--trainer.callbacks.targets=[vision]", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.synthetic=null",
    ], run=False)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, CompileBlocks)]
    assert len(callbacks) == 1 and callbacks[0].targets == ("vision",)
