"""A small ShardDataModule over the synthetic corpus' train shards, shared by the data tests."""

from __future__ import annotations

from typing import Any

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource


def tiny_shard_dm(corpus: Any, **kw: Any) -> ShardDataModule:
    """Batch 8, no workers, 16 px, interleave 3, shuffle block 10 (``kw`` overrides any), set up for fit."""
    args: dict[str, Any] = dict(sources=[ShardSource(corpus.shards("train"), name="syn")], batch_size=8,
                                num_workers=0, seed=0, image_size=16, interleave=3, shuffle_block=10)
    args.update(kw)
    dm = ShardDataModule(**args)
    dm.setup("fit")
    return dm
