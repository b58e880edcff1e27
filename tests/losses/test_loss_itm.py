"""ITM: hard-negative sampler (never a positive, robust, reproducible), targets, logits, loss."""

import math

import pytest
import torch

from qformer_lightning.losses.itm import (
    has_negative,
    itm_logits_from_queries,
    itm_loss,
    itm_targets,
    negative_weights,
    sample_hard_negatives,
)


def test_targets_and_query_mean() -> None:
    assert itm_targets(2).tolist() == [1, 1, 0, 0, 0, 0]
    assert itm_targets(1).dtype == torch.long
    head = torch.tensor([[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [-2.0, 4.0]], [[5.0, 1.0], [1.0, 1.0]]])  # (3, Q=2, 2)
    torch.testing.assert_close(itm_logits_from_queries(head), torch.tensor([[2.0, 4.0], [-1.0, 2.0], [3.0, 1.0]]))


def test_itm_loss_by_hand_and_negative_mask() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0], [0.5, -0.5], [3.0, 3.0], [0.0, 1.0]])  # (3B=6, 2)
    targets = itm_targets(2)

    def ce(row: list[float], label: int) -> float:
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    per_pair = [ce(logits[k].tolist(), int(targets[k])) for k in range(6)]
    assert itm_loss(logits, targets).item() == pytest.approx(sum(per_pair) / 6, abs=1e-6)
    # row 1 has no true negative: its two negative pairs (indices 3 and 5) are left out
    masked = itm_loss(logits, targets, negative_valid=torch.tensor([True, False]))
    assert masked.item() == pytest.approx((per_pair[0] + per_pair[1] + per_pair[2] + per_pair[4]) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="3B"):
        itm_loss(logits[:5], targets)


def test_weights_are_softmax_over_non_positives() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.0, math.log(3.0)]])
    own = torch.tensor([[False, True, False, False]])
    weights = negative_weights(logits, own, own)
    z = math.e + 1 + 3
    torch.testing.assert_close(weights, torch.tensor([[math.e / z, 0.0, 1 / z, 3 / z]]))


def test_sampler_never_picks_a_positive_with_duplicate_ids() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 2, 3])
    # positives get the largest logits, so a sampler that ignored the mask would pick them
    sim = torch.randn(6, 6, generator=gen)
    same = ids[:, None] == ids[None, :]
    sim = sim + 20.0 * same
    picked_images, picked_texts = [], []
    for _ in range(300):
        neg_image, neg_text = sample_hard_negatives(sim, sim.t().contiguous(), ids, ids, generator=gen)
        picked_images.append(neg_image)
        picked_texts.append(neg_text)
    neg_image, neg_text = torch.stack(picked_images), torch.stack(picked_texts)  # (300, B)
    assert (ids[neg_image] != ids).all()
    assert (ids[neg_text] != ids).all()
    assert neg_image.min() >= 0 and neg_image.max() < 6


def test_sampler_never_picks_a_duplicate_caption() -> None:
    """Different images with the same caption (repeated scenes, duplicate web captions) are positives:
    neither the other image nor its caption is ever drawn as a negative."""
    gen = torch.Generator().manual_seed(2)
    image_ids = torch.tensor([0, 1, 2, 3, 4, 5])
    text_ids = torch.tensor([7, 7, 8, 9, 8, 6])  # samples 0/1 and 2/4 share their caption
    same_text = text_ids[:, None] == text_ids[None, :]
    sim = torch.randn(6, 6, generator=gen) + 20.0 * same_text  # the duplicates are the "hardest"
    picked = [
        sample_hard_negatives(sim, sim.t().contiguous(), image_ids, image_ids, generator=gen,
                              text_ids_local=text_ids, text_ids_global=text_ids)
        for _ in range(300)
    ]
    neg_image = torch.stack([p[0] for p in picked])  # (300, B)
    neg_text = torch.stack([p[1] for p in picked])
    assert (text_ids[neg_image] != text_ids).all() and (text_ids[neg_text] != text_ids).all()
    # without text ids the same draws pick the duplicates almost always (they are a true match)
    neg_image, _ = sample_hard_negatives(sim, sim.t().contiguous(), image_ids, image_ids, generator=gen)
    assert (text_ids[neg_image] == text_ids).sum() >= 3
    # a row whose caption is everywhere else has no negative
    assert has_negative(image_ids[:2], image_ids[:2], 2, text_ids[:2], text_ids[:2]).tolist() == [False, False]
    assert has_negative(None, None, 3, text_ids[:2], text_ids[:3]).tolist() == [True, True]
    with pytest.raises(ValueError, match="text_ids"):
        sample_hard_negatives(sim, sim, text_ids_local=text_ids)


def test_sampler_follows_softmax_and_direction() -> None:
    gen = torch.Generator().manual_seed(1)
    # one row, G = 3 columns; own column 0. i2t prefers text 1 (weights 3:1), t2i prefers image 2 (1:3)
    sim_i2t = torch.tensor([[9.0, math.log(3.0), 0.0]])
    sim_t2i = torch.tensor([[9.0, 0.0, math.log(3.0)]])
    draws = 4000
    counts_text, counts_image = torch.zeros(3), torch.zeros(3)
    for _ in range(draws):
        neg_image, neg_text = sample_hard_negatives(sim_i2t, sim_t2i, generator=gen)
        counts_image[neg_image] += 1
        counts_text[neg_text] += 1
    assert counts_text[0] == 0 and counts_image[0] == 0
    assert counts_text[1] / draws == pytest.approx(0.75, abs=0.03)
    assert counts_image[2] / draws == pytest.approx(0.75, abs=0.03)


def test_equal_similarities_are_finite_and_uniform() -> None:
    gen = torch.Generator().manual_seed(2)
    ids = torch.tensor([4, 5, 4, 6, 7])
    sim = torch.full((5, 5), 3.0)
    own = torch.eye(5, dtype=torch.bool)
    positives = ids[:, None] == ids[None, :]
    weights = negative_weights(sim, own, positives)
    assert torch.isfinite(weights).all()
    # row 0 (id 4) has negatives 1, 3, 4 with equal weight
    torch.testing.assert_close(weights[0], torch.tensor([0.0, 1 / 3, 0.0, 1 / 3, 1 / 3]))
    counts = torch.zeros(5)
    for _ in range(1500):
        _, neg_text = sample_hard_negatives(sim, sim, ids, ids, generator=gen)
        counts[neg_text[0]] += 1
    assert counts[0] == 0 and counts[2] == 0
    assert (counts[[1, 3, 4]] / 1500 - 1 / 3).abs().max() < 0.05


def test_extreme_and_non_finite_logits_do_not_crash() -> None:
    gen = torch.Generator().manual_seed(3)
    sim = torch.tensor([[1e4, -1e4, 5e3], [float("nan"), 0.0, float("inf")], [0.0, float("-inf"), 2.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        neg_image, neg_text = sample_hard_negatives(sim.to(dtype), sim.to(dtype), generator=gen)
        assert (neg_image != torch.arange(3)).all() and (neg_text != torch.arange(3)).all()


def test_fallback_when_no_negative_exists() -> None:
    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([8, 8, 8])
    sim = torch.randn(3, 3, generator=gen)
    assert has_negative(ids, ids, 3).tolist() == [False, False, False]
    for _ in range(50):
        neg_image, neg_text = sample_hard_negatives(sim, sim, ids, ids, generator=gen)
        assert (neg_image != torch.arange(3)).all() and (neg_text != torch.arange(3)).all()
    # a single sample: the only index is its own, flagged as unusable
    neg_image, neg_text = sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), generator=gen)
    assert neg_image.tolist() == [0] and neg_text.tolist() == [0]
    assert has_negative(None, None, 1).tolist() == [False]
    # mixed batch: only the rows whose id is everywhere lack a negative
    assert has_negative(torch.tensor([1, 2]), torch.tensor([1, 2, 2, 2]), 4).tolist() == [True, True]
    assert has_negative(torch.tensor([2]), torch.tensor([2, 2]), 2).tolist() == [False]


def test_rank_offset_excludes_own_global_column() -> None:
    gen = torch.Generator().manual_seed(5)
    sim = torch.zeros(2, 4)
    sim[0, 2] = 50.0  # own column of local row 0 on rank 1
    sim[1, 3] = 50.0
    for _ in range(100):
        neg_image, neg_text = sample_hard_negatives(sim, sim, generator=gen, rank=1)
        assert neg_text[0] != 2 and neg_text[1] != 3 and neg_image[0] != 2 and neg_image[1] != 3
    with pytest.raises(ValueError, match="does not fit"):
        sample_hard_negatives(sim, sim, rank=2)
    with pytest.raises(ValueError, match="neither"):
        sample_hard_negatives(sim, sim, torch.tensor([1, 2]), None, rank=1)


def test_seeded_generator_is_deterministic() -> None:
    sim = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7])
    first = sample_hard_negatives(sim, sim.flip(1), ids[:4], ids, generator=torch.Generator().manual_seed(7))
    second = sample_hard_negatives(sim, sim.flip(1), ids[:4], ids, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
