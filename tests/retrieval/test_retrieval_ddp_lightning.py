"""``trainer.test`` with 2 CPU processes (Lightning ddp_spawn, gloo) logs the single-process metrics."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from qformer_lightning.data.caption_datamodule import CaptionDataModule, CaptionSplit
from qformer_lightning.data.synthetic import make_synthetic_corpus

from retrieval_tiny import IMAGE, tiny_retrieval


def test_lightning_ddp_test_metrics_equal_single_process(tmp_path: Path) -> None:
    """Lightning's DistributedSampler gives 7 images as 4 + 4 (rank 1 repeats image 0); the evaluation
    hooks, the cross-rank re-ranking and the logging give the metrics of one process."""
    corpus = make_synthetic_corpus(tmp_path / "synthetic", num_train=2, num_val=2, num_test=7, image_size=IMAGE, shard_size=10)
    split = CaptionSplit(str(Path(corpus.root) / "karpathy/dataset_synthetic.json"), str(Path(corpus.root) / "images"), ["test"])
    results = []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )
        dm = CaptionDataModule(test=split, eval_batch_size=2, num_workers=0, image_size=IMAGE)
        (result,) = trainer.test(tiny_retrieval(k=3, itm_batch_size=4), datamodule=dm, verbose=False)
        results.append(result)
    assert set(results[0]) >= {"test/txt_r1", "test/img_r10", "test/r_mean", "test/itc_r_mean"}
    assert results[1] == results[0]
