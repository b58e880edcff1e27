"""ITC on hand-checkable tensors: similarity, targets, label smoothing, temperature clamping."""

import math

import pytest
import torch

from qformer_lightning.losses.itc import (
    clamp_temperature,
    clamp_temperature_,
    itc_loss,
    itc_similarity,
    itc_targets,
)


def smoothed_ce(row: list[float], target: list[float], eps: float) -> float:
    """-sum_j q_j log softmax(row)_j with q = (1 - eps) * target + eps / C, in plain Python."""
    log_z = math.log(sum(math.exp(v) for v in row))
    log_p = [v - log_z for v in row]
    count = len(row)
    return -sum(((1 - eps) * t + eps / count) * lp for t, lp in zip(target, log_p))


def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_similarity_is_max_over_queries() -> None:
    # image 0 queries at 0 and 90 degrees, image 1 queries at 180 and 45 degrees; texts at 0, 90, 60
    image = torch.tensor([[unit(0), unit(90)], [unit(180), unit(45)]])  # (2, 2, 2)
    text = torch.tensor([unit(0), unit(90), unit(60)])  # (3, 2)
    sim = itc_similarity(image, text)
    cos = lambda a, b: math.cos(math.radians(a - b))  # noqa: E731
    expected = [
        [max(cos(0, t), cos(90, t)) for t in (0, 90, 60)],
        [max(cos(180, t), cos(45, t)) for t in (0, 90, 60)],
    ]
    assert sim.shape == (2, 3)
    torch.testing.assert_close(sim, torch.tensor(expected), rtol=0, atol=1e-6)
    assert sim[1, 0].item() == pytest.approx(math.cos(math.radians(45)), abs=1e-6)


def test_similarity_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="image_feats"):
        itc_similarity(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="widths differ"):
        itc_similarity(torch.zeros(2, 3, 4), torch.zeros(2, 5))


def test_itc_loss_2x2_by_hand() -> None:
    # Q = 2; sims: image 0 vs (text 0, text 1), image 1 vs (text 0, text 1)
    image = torch.tensor([[unit(0), unit(120)], [unit(90), unit(200)]])
    text = torch.tensor([unit(30), unit(100)])
    temp, eps = 0.2, 0.1
    cos = lambda a, b: math.cos(math.radians(a - b))  # noqa: E731
    q_angles = [(0, 120), (90, 200)]
    t_angles = [30, 100]
    sim = [[max(cos(q, t) for q in q_angles[i]) / temp for t in t_angles] for i in range(2)]
    i2t = sum(smoothed_ce(sim[i], [1.0 if j == i else 0.0 for j in range(2)], eps) for i in range(2)) / 2
    sim_t = [[sim[i][j] for i in range(2)] for j in range(2)]  # text j vs images
    t2i = sum(smoothed_ce(sim_t[j], [1.0 if i == j else 0.0 for i in range(2)], eps) for j in range(2)) / 2
    out = itc_loss(image, text, torch.tensor(temp), label_smoothing=eps)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)
    torch.testing.assert_close(out.sim_i2t, torch.tensor(sim), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sim_t2i, torch.tensor(sim).t(), rtol=0, atol=1e-5)


def test_itc_loss_3x3_with_shared_image_id_by_hand() -> None:
    # Q = 1 so the similarity is one cosine; samples 0 and 1 are two captions of image 7.
    angles_img = [0, 10, 90]
    angles_txt = [5, 40, 80]
    image = torch.tensor([[unit(a)] for a in angles_img])  # (3, 1, 2)
    text = torch.tensor([unit(a) for a in angles_txt])  # (3, 2)
    ids = torch.tensor([7, 7, 9])
    temp, eps = 0.1, 0.1
    sim = [[math.cos(math.radians(a - b)) / temp for b in angles_txt] for a in angles_img]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    i2t = sum(smoothed_ce(sim[i], targets[i], eps) for i in range(3)) / 3
    t2i = sum(smoothed_ce([sim[i][j] for i in range(3)], targets[j], eps) for j in range(3)) / 3
    out = itc_loss(image, text, temp, image_ids=ids, label_smoothing=eps)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)
    torch.testing.assert_close(out.targets, torch.tensor(targets))
    # without ids, sample 1's text is a negative of image 0: a different loss
    plain = itc_loss(image, text, temp, label_smoothing=eps)
    hard = [[1.0 if j == i else 0.0 for j in range(3)] for i in range(3)]
    i2t_plain = sum(smoothed_ce(sim[i], hard[i], eps) for i in range(3)) / 3
    t2i_plain = sum(smoothed_ce([sim[i][j] for i in range(3)], hard[j], eps) for j in range(3)) / 3
    assert plain.loss.item() == pytest.approx((i2t_plain + t2i_plain) / 2, abs=1e-5)
    assert abs(plain.loss.item() - out.loss.item()) > 0.1


def test_distinct_ids_equal_plain_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    a = itc_loss(image, text, 0.07, image_ids=torch.tensor([3, 1, 4, 5]))
    b = itc_loss(image, text, 0.07)
    torch.testing.assert_close(a.loss, b.loss)


def test_targets_single_process_and_rank_offset() -> None:
    expected_plain = torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(itc_targets(None, None, 2, rank=1, world=2), expected_plain)
    ids_local, ids_global = torch.tensor([5, 6]), torch.tensor([6, 1, 5, 6])
    expected = torch.tensor([[0.0, 0, 1, 0], [0.5, 0, 0, 0.5]])
    torch.testing.assert_close(itc_targets(ids_local, ids_global, 2, rank=1, world=2), expected)


def test_temperature_clamp_value_and_gradient() -> None:
    image = torch.tensor([[unit(0)], [unit(60)]])
    text = torch.tensor([unit(10), unit(80)])
    above = torch.tensor(2.0, requires_grad=True)
    at_max = itc_loss(image, text, torch.tensor(0.5))
    clamped = itc_loss(image, text, above)
    assert clamped.loss.item() == pytest.approx(at_max.loss.item(), abs=1e-7)
    clamped.loss.backward()
    assert above.grad is not None and above.grad.item() == 0.0
    inside = torch.tensor(0.07, requires_grad=True)
    itc_loss(image, text, inside).loss.backward()
    assert inside.grad is not None and inside.grad.item() != 0.0
    assert clamp_temperature(1e-6).item() == pytest.approx(0.001)
    param = torch.nn.Parameter(torch.tensor(0.9))
    clamp_temperature_(param)
    assert param.item() == pytest.approx(0.5) and param.requires_grad
    with pytest.raises(ValueError, match="bounds"):
        clamp_temperature(0.1, min=0.0)


def test_itc_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    ids = torch.tensor([0, 0, 1])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        img, txt = flat[: image.numel()].view_as(image), flat[image.numel() :].view_as(text)
        return itc_loss(img, txt, 0.3, image_ids=ids).loss

    flat = torch.cat([image.reshape(-1), text.reshape(-1)]).requires_grad_(True)
    loss_of(flat).backward()
    step = 1e-3
    with torch.no_grad():
        for k in range(0, flat.numel(), 3):
            shift = torch.zeros_like(flat)
            shift[k] = step
            numeric = (loss_of(flat + shift) - loss_of(flat - shift)) / (2 * step)
            assert flat.grad[k].item() == pytest.approx(numeric.item(), abs=2e-3)


def test_itc_rejects_mismatched_batch() -> None:
    with pytest.raises(ValueError, match="same batch size"):
        itc_loss(torch.zeros(2, 1, 4), torch.zeros(3, 4), 0.1)
    with pytest.raises(ValueError, match="image_ids"):
        itc_loss(torch.zeros(2, 1, 4), torch.zeros(2, 4), 0.1, image_ids=torch.zeros(3))
