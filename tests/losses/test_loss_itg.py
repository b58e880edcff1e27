"""ITG: shifted, padding-aware, label-smoothed LM loss against a plain-Python cross-entropy."""

import math

import pytest
import torch

from qformer_lightning.losses.itg import itg_labels, itg_loss

DEC, PAD = 3, 0


def smoothed_ce(row: list[float], label: int, eps: float) -> float:
    log_z = math.log(sum(math.exp(v) for v in row))
    log_p = [v - log_z for v in row]
    return -((1 - eps) * log_p[label] + eps / len(row) * sum(log_p))


def test_labels_shift_and_mask_padding() -> None:
    ids = torch.tensor([[DEC, 1, 2, PAD], [DEC, 2, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert itg_labels(ids, mask).tolist() == [[1, 2, -100], [2, -100, -100]]
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        itg_labels(ids, mask[:, :3])


def test_loss_matches_manual_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, eps = 4, 0.1
    ids = torch.tensor([[DEC, 1, 2, PAD], [DEC, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    logits = torch.randn(2, 4, vocab, generator=gen)
    # targets: row 0 positions 0,1 -> tokens 1,2; row 1 positions 0,1,2 -> tokens 2,1,1
    pairs = [(0, 0, 1), (0, 1, 2), (1, 0, 2), (1, 1, 1), (1, 2, 1)]
    expected = sum(smoothed_ce(logits[b, t].tolist(), y, eps) for b, t, y in pairs) / len(pairs)
    assert itg_loss(logits, ids, mask, label_smoothing=eps).item() == pytest.approx(expected, abs=1e-6)
    no_smoothing = sum(smoothed_ce(logits[b, t].tolist(), y, 0.0) for b, t, y in pairs) / len(pairs)
    assert itg_loss(logits, ids, mask, label_smoothing=0.0).item() == pytest.approx(no_smoothing, abs=1e-6)


def test_padding_and_last_position_get_no_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[DEC, 1, 2, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    logits = torch.randn(1, 5, 6, generator=gen, requires_grad=True)
    itg_loss(logits, ids, mask).backward()
    grad_norm = logits.grad.abs().sum(dim=-1)[0]  # (T,)
    # positions 0 and 1 predict real tokens; position 2 predicts padding; 3, 4 are padding
    assert (grad_norm[:2] > 0).all()
    assert (grad_norm[2:] == 0).all()


def test_dec_token_is_never_a_target() -> None:
    # every text is just [DEC] + one token: the only target is that token, never [DEC]
    ids = torch.tensor([[DEC, 2], [DEC, 1]])
    mask = torch.ones(2, 2, dtype=torch.long)
    logits = torch.zeros(2, 2, 5)
    logits[:, 0, DEC] = 100.0  # predicting [DEC] perfectly would not lower the loss
    uniform = itg_loss(torch.zeros(2, 2, 5), ids, mask, label_smoothing=0.0)
    assert uniform.item() == pytest.approx(math.log(5), abs=1e-6)
    assert itg_loss(logits, ids, mask, label_smoothing=0.0).item() > uniform.item()


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        itg_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))
