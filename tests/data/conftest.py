"""Small generated corpora shared by the data tests."""

from pathlib import Path

import pytest

from qformer_lightning.data.synthetic import SyntheticCorpus, make_synthetic_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    """120 train images in 6 shards of 20 (32 px), 24 val, 16 test."""
    root: Path = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic_corpus(root, num_train=120, num_val=24, num_test=16, image_size=32, shard_size=20)
