"""TensorBoard panels of the captioning and VQA finetunes: a tiny fit + validation with
``GradNormMonitor`` and ``ValidationExamples`` writes ``train/grad_norm`` at every step, a grid of the
validation images and a table of what the task generates for them (the question, the answer and
the human answers for VQA), equal to the task's own generation on those images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from finetune_tiny import BERT, IMAGE_SIZE, tiny_model
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qformer_lightning.callbacks import GradNormMonitor, ValidationExamples
from qformer_lightning.data import CaptionDataModule, VQADataModule
from qformer_lightning.data.caption_datamodule import CaptionSplit
from qformer_lightning.data.vqa_datamodule import VQAFiles
from qformer_lightning.metrics.vqa import vqa_accuracy
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.caption import Caption
from qformer_lightning.tasks.vqa import VQA

ROOT = Path(__file__).resolve().parents[2]
PANEL_CONFIGS = [
    "demo/caption.yaml", "demo/vqa.yaml", "caption_coco_opt2.7b.yaml", "caption_coco_flant5xl.yaml",
    "vqav2_opt2.7b.yaml", "vqav2_opt6.7b.yaml", "vqav2_flant5xl.yaml",
]
K = 2
STEPS = 2
PAD = 2  # make_grid's padding


def _fit(task: pl.LightningModule, data: pl.LightningDataModule, tmp_path, name: str) -> EventAccumulator:
    """Fit for STEPS steps with one validation batch at the end; the run's TensorBoard events."""
    logger = TensorBoardLogger(str(tmp_path / "tb"), name=name)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, val_check_interval=STEPS, check_val_every_n_epoch=None,
        limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1, logger=logger,
        callbacks=[GradNormMonitor(), ValidationExamples(num_examples=K)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


def _first_val_batch(data: pl.LightningDataModule) -> dict:
    return next(iter(data.val_dataloader()))


def _table(events: EventAccumulator) -> str:
    (text,) = events.Tensors("val_examples/generated/text_summary")
    return text.tensor_proto.string_val[0].decode()


def _check_grad_norm_and_grid(events: EventAccumulator) -> None:
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert len(norms) == STEPS and all(torch.isfinite(torch.tensor(n)) and n > 0 for n in norms)
    (grid,) = events.Images("val_examples/images")
    assert (grid.width, grid.height) == (K * IMAGE_SIZE + (K + 1) * PAD, IMAGE_SIZE + 2 * PAD)


def test_caption_finetune_logs_grad_norm_images_and_captions(corpus, tmp_path) -> None:
    split = lambda name: CaptionSplit(str(corpus.karpathy_json), str(corpus.image_root), [name])  # noqa: E731
    data = CaptionDataModule(train=split("train"), val=split("val"), batch_size=4, eval_batch_size=4, num_workers=0,
                             image_size=IMAGE_SIZE)
    task = Caption(tiny_model("opt"), num_beams=2, max_new_tokens=4, min_new_tokens=1, metrics=["bleu"],
                   results_dir=str(tmp_path / "results"), optim=Optimization(lr=1e-3, warmup_steps=0, total_steps=STEPS))
    events = _fit(task, data, tmp_path, "caption")
    _check_grad_norm_and_grid(events)

    batch = _first_val_batch(data)
    with torch.no_grad():
        expected = task.generate_captions(batch["image"][:K])  # the weights after the last step
    table = _table(events)
    assert table.splitlines()[0] == "| # | question / prompt | generated | reference |"
    for i in range(K):
        assert f"| {i} | a photo of | {expected[i]} | {batch['text'][i]} |" in table
    assert len(table.splitlines()) == 2 + K


def test_vqa_finetune_logs_grad_norm_images_questions_answers_and_references(corpus, tmp_path) -> None:
    files = lambda name: VQAFiles(  # noqa: E731
        str(corpus.vqa_questions(name)), str(corpus.image_root), str(corpus.vqa_annotations(name)))
    data = VQADataModule(train=[files("train")], val=files("val"), batch_size=4, eval_batch_size=4, num_workers=0,
                         image_size=IMAGE_SIZE)
    task = VQA(tiny_model("opt", text_ffn=True), tokenizer=BERT, max_question_length=16, num_beams=2, max_new_tokens=3,
               results_dir=str(tmp_path / "results"), optim=Optimization(lr=1e-3, warmup_steps=0, total_steps=STEPS))
    events = _fit(task, data, tmp_path, "vqa")
    _check_grad_norm_and_grid(events)

    batch = _first_val_batch(data)
    questions = list(batch["text"][:K])
    with torch.no_grad():
        expected = task.answer(batch["image"][:K], questions)  # question through the Q-Former too
    table = _table(events)
    assert table.splitlines()[0] == "| # | question / prompt | generated | reference | VQA acc |"
    for i in range(K):
        answers = batch["answers"][i]
        counted = ", ".join(f"{a} ×{n}" for a, n in Counter(answers).most_common())
        accuracy = f"{100 * vqa_accuracy(expected[i], answers):.0f}"
        assert f"| {i} | {questions[i]} | {expected[i]} | {counted} | {accuracy} |" in table
    assert "val/vqa_acc" in events.Tags()["scalars"]


@pytest.mark.parametrize("answers, shown", [
    (["yellow"] * 8 + ["orange", "purple"], "yellow ×8, orange ×1, purple ×1"),
    (["2", "two", "2", "two"], "2 ×2, two ×2"),  # ties: first listed first
])
def test_human_answers_are_shown_with_their_counts(answers: list[str], shown: str) -> None:
    from qformer_lightning.callbacks.tensorboard import answer_counts

    assert answer_counts(answers) == shown


@pytest.mark.parametrize("name", PANEL_CONFIGS)
def test_caption_and_vqa_finetune_configs_log_the_panels(name: str) -> None:
    """Both callbacks are listed, and ModelCheckpoint stays last (``--trainer.callbacks.dirpath`` overrides the last entry)."""
    trainer = yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]
    paths = [c if isinstance(c, str) else c["class_path"] for c in trainer["callbacks"]]
    assert "qformer_lightning.callbacks.GradNormMonitor" in paths
    assert "qformer_lightning.callbacks.ValidationExamples" in paths
    assert paths[-1] == "lightning.pytorch.callbacks.ModelCheckpoint"
    logger = trainer.get("logger", True)  # Lightning's default logger is TensorBoard's when tensorboard is installed
    assert logger is True or logger["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
