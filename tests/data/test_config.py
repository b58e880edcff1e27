"""The data modules are configured from YAML through class_path (their signatures are the schema)."""

from pathlib import Path

import lightning.pytorch as pl
from jsonargparse import ArgumentParser

from qformer_lightning.data import CaptionDataModule, ShardDataModule, VQADataModule


def test_yaml_instantiates_the_data_modules(corpus, tmp_path: Path) -> None:
    root = corpus.root
    (tmp_path / "c.yaml").write_text(f"""
shards:
  class_path: qformer_lightning.data.ShardDataModule
  init_args:
    sources: [{{name: syn, urls: "{root}/shards/train/*.tar", weight: 2.0}}]
    batch_size: 8
    synthetic: {{root: {root}, num_train: 120}}
captions:
  class_path: qformer_lightning.data.CaptionDataModule
  init_args:
    test: {{annotations: {root}/karpathy/dataset_synthetic.json, image_root: {root}/images, splits: [test]}}
vqa:
  class_path: qformer_lightning.data.VQADataModule
  init_args:
    train:
      - {{questions: {root}/vqa/train_questions.json, image_root: {root}/images,
          annotations: {root}/vqa/train_annotations.json}}
""")
    parser = ArgumentParser()
    for name in ("shards", "captions", "vqa"):
        parser.add_subclass_arguments(pl.LightningDataModule, name)
    init = parser.instantiate(parser.parse_path(tmp_path / "c.yaml"))
    assert isinstance(init.shards, ShardDataModule) and init.shards.sources[0].weight == 2.0
    assert init.shards.synthetic.num_train == 120
    assert isinstance(init.captions, CaptionDataModule) and init.captions.splits["test"].splits == ["test"]
    assert isinstance(init.vqa, VQADataModule) and init.vqa.files["train"][0].format == "vqav2"
    init.shards.setup("fit")
    assert init.shards.num_batches_per_epoch() == 30
