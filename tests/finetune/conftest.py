"""A small generated corpus shared by the finetune tests."""

from pathlib import Path

import pytest

from qformer_lightning.data.synthetic import SyntheticCorpus, make_synthetic_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    """16 train, 6 val, 6 test images (32 px), Karpathy JSON and VQAv2 files."""
    root: Path = tmp_path_factory.mktemp("finetune") / "synthetic"
    return make_synthetic_corpus(root, num_train=16, num_val=6, num_test=6, image_size=32, shard_size=8)
