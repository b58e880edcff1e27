"""``learn_bos``: stage-2 pretraining without a prompt may also learn the BOS after the soft prompt,
as LAVIS's blip2_opt does; by default the BOS is an input only (tiny random OPT and T5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stage2_tiny import tiny_model

from qformer_lightning.tasks.stage2 import Stage2, lm_loss

CAPTIONS = ["a dog sits on the grass", "red boat"]


@torch.no_grad()
def test_learn_bos_adds_one_target_per_caption_the_bos_after_the_soft_prompt() -> None:
    model = tiny_model("opt", seed=1)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    logits, labels = model(images, CAPTIONS)  # (B, K, V), (B, K); K starts at the last soft-prompt position
    logits_bos, labels_bos = model(images, CAPTIONS, learn_bos=True)
    torch.testing.assert_close(logits_bos, logits)  # same inputs, only the labels differ
    bos = model.llm.tokenizer.bos_token_id
    changed = labels_bos != labels
    assert changed[:, 1].all() and changed.sum() == 2  # the first text position of each row, nothing else
    assert (labels[:, 1] == -100).all() and (labels_bos[:, 1] == bos).all()
    # The loss is the mean over one more token per caption: the BOS, predicted by the last query position.
    targets = (labels[:, 1:] != -100).sum()
    bos_terms = F.cross_entropy(logits[:, 0].float(), labels_bos[:, 1], reduction="sum")
    expected = (lm_loss(logits, labels, shift=True) * targets + bos_terms) / (targets + 2)
    torch.testing.assert_close(lm_loss(logits_bos, labels_bos, shift=True), expected)
    assert not torch.isclose(expected, lm_loss(logits, labels, shift=True))


@torch.no_grad()
def test_task_option_reaches_the_loss_and_is_checked() -> None:
    batch = {"image": torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)), "text": CAPTIONS}
    default, lavis = Stage2(tiny_model("opt", seed=1)), Stage2(tiny_model("opt", seed=1), learn_bos=True)
    for task in (default, lavis):
        task.configure_model()
    logits, labels = lavis.model(batch["image"], CAPTIONS, learn_bos=True)
    torch.testing.assert_close(lavis.compute_loss(batch), lm_loss(logits, labels, shift=True))
    assert not torch.isclose(lavis.compute_loss(batch), default.compute_loss(batch))
    with pytest.raises(ValueError, match="no prompt"):
        Stage2(tiny_model("opt"), prompt="a photo of", learn_bos=True)
    with pytest.raises(ValueError, match="decoder-only"):
        Stage2(tiny_model("t5"), learn_bos=True).configure_model()
