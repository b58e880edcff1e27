"""Shared fixtures of the scale tests: a small synthetic corpus (64 train / 16 val images, 32 px)."""

from pathlib import Path

import pytest
import torch

from qformer_lightning.data.synthetic import SyntheticCorpus, make_synthetic_corpus


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training batches of 8 per epoch, 16 validation images."""
    root: Path = tmp_path_factory.mktemp("scale") / "synthetic"
    corpus: SyntheticCorpus = make_synthetic_corpus(root, num_train=64, num_val=16, num_test=8, image_size=32, shard_size=16)
    return corpus.root


@pytest.fixture(scope="session")
def vit_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local timm checkpoint of the demo config's ViT at 32 px: the frozen weights' source."""
    import timm

    out = tmp_path_factory.mktemp("vit")
    torch.manual_seed(7)
    vit = timm.create_model("eva_giant_patch14_clip_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
    torch.save(vit.state_dict(), out / "vit.pth")
    return out / "vit.pth"
