"""Retrieval recall vs. brute-force Python references, with and without ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qformer_lightning.metrics.retrieval import retrieval_metrics, retrieval_ranks


def _blip_reference(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img, img2txt) -> dict[str, float]:
    """The ALBEF/BLIP loop (argsort per query); well-defined only without ties."""
    ranks = np.zeros(score_i2t.shape[0])
    for index, score in enumerate(score_i2t):
        order = np.argsort(score)[::-1]
        ranks[index] = min(np.where(order == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(score_t2i.shape[0])
    for index, score in enumerate(score_t2i):
        order = np.argsort(score)[::-1]
        ranks[index] = np.where(order == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    return {
        "txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": sum(tr) / 3,
        "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": sum(ir) / 3,
        "r_mean": (sum(tr) / 3 + sum(ir) / 3) / 2,
    }  # fmt: skip


def _sorted_rank(scores: list[float], true: set[int], pessimistic: bool) -> int:
    """Position of the first true candidate after a full sort with ties broken by policy."""
    # Pessimistic: among equal scores, wrong candidates come first; optimistic: true ones first.
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], (j in true) == pessimistic))
    return next(position for position, j in enumerate(order) if j in true)


def _loop_ranks(score_i2t, score_t2i, txt2img, img2txt, pessimistic: bool) -> tuple[list[int], list[int]]:
    text = [_sorted_rank(score_i2t[i].tolist(), set(img2txt[i]), pessimistic) for i in range(len(img2txt))]
    image = [_sorted_rank(score_t2i[t].tolist(), {txt2img[t]}, pessimistic) for t in range(len(txt2img))]
    return text, image


def _random_problem(seed: int, num_images: int, per_image: int, integer_scores: bool):
    generator = torch.Generator().manual_seed(seed)
    num_texts = num_images * per_image
    perm = torch.randperm(num_texts, generator=generator)
    txt2img = [0] * num_texts
    img2txt = []
    for image in range(num_images):
        texts = perm[image * per_image : (image + 1) * per_image].tolist()
        img2txt.append(texts)
        for t in texts:
            txt2img[t] = image
    if integer_scores:  # few distinct values: many ties, including with the ground truth
        score_i2t = torch.randint(0, 4, (num_images, num_texts), generator=generator).float()
        score_t2i = torch.randint(0, 4, (num_texts, num_images), generator=generator).float()
    else:
        score_i2t = torch.randn(num_images, num_texts, generator=generator)
        score_t2i = torch.randn(num_texts, num_images, generator=generator)
    return score_i2t, score_t2i, txt2img, img2txt


@pytest.mark.parametrize("seed", range(3))
def test_matches_blip_loop_without_ties(seed: int) -> None:
    score_i2t, score_t2i, txt2img, img2txt = _random_problem(seed, 30, 3, integer_scores=False)
    expected = _blip_reference(score_i2t.numpy(), score_t2i.numpy(), txt2img, img2txt)
    for ties in ("pessimistic", "optimistic"):  # no ties: both policies agree with BLIP
        got = retrieval_metrics(score_i2t, txt2img, img2txt, score_t2i=score_t2i, ties=ties)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_ranks_with_ties_match_sorted_loop(seed: int, ties: str) -> None:
    score_i2t, score_t2i, txt2img, img2txt = _random_problem(seed, 25, 2 + seed % 3, integer_scores=True)
    text_ranks, image_ranks = retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i=score_t2i, ties=ties)
    ref_text, ref_image = _loop_ranks(score_i2t, score_t2i, txt2img, img2txt, ties == "pessimistic")
    assert text_ranks.tolist() == ref_text
    assert image_ranks.tolist() == ref_image


def test_ties_policies_bracket_the_truth() -> None:
    score_i2t, score_t2i, txt2img, img2txt = _random_problem(7, 40, 5, integer_scores=True)
    low = retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i, ties="optimistic")
    high = retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i, ties="pessimistic")
    for optimistic, pessimistic in zip(low, high):
        assert bool((optimistic <= pessimistic).all()) and bool((optimistic < pessimistic).any())


def test_hand_case() -> None:
    # 2 images, 4 texts; texts 0,1 belong to image 0 and texts 2,3 to image 1.
    score_i2t = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0],  # image 0: best true caption (text 1) ranked first -> rank 0
            [0.5, 0.7, 0.6, 0.2],  # image 1: best true caption (text 2, 0.6) behind text 1 -> rank 1
        ]
    )
    txt2img = [0, 0, 1, 1]
    img2txt = [[0, 1], [2, 3]]
    text_ranks, image_ranks = retrieval_ranks(score_i2t, txt2img, img2txt)
    assert text_ranks.tolist() == [0, 1]
    # Text columns: t0 (0.1 vs 0.5) -> image 0 second; t1 first; t2 (0.8 vs 0.6) -> image 1 second; t3 first.
    assert image_ranks.tolist() == [1, 0, 1, 0]
    metrics = retrieval_metrics(score_i2t, txt2img, img2txt)
    assert metrics["txt_r1"] == 50.0 and metrics["txt_r5"] == 100.0
    assert metrics["img_r1"] == 50.0 and metrics["img_r10"] == 100.0
    assert metrics["txt_r_mean"] == pytest.approx((50 + 100 + 100) / 3)
    assert metrics["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (50 + 100 + 100) / 3) / 2)


def test_hand_ties() -> None:
    # Image 0's true caption (text 0) ties with wrong text 1; text 2 is a second true caption tie.
    score_i2t = torch.tensor([[0.5, 0.5, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]])
    txt2img = [0, 1, 0, 1]
    img2txt = [[0, 2], [1, 3]]
    pessimistic = retrieval_ranks(score_i2t, txt2img, img2txt, ties="pessimistic")
    optimistic = retrieval_ranks(score_i2t, txt2img, img2txt, ties="optimistic")
    # Row 0: only the wrong text 1 counts against it (true captions never push each other down).
    # Row 1: all four score 0.0; wrong texts 0 and 2 tie with the true ones.
    assert pessimistic[0].tolist() == [1, 2]
    assert optimistic[0].tolist() == [0, 0]
    # Columns (text -> image): t0 0.5 vs 0.0 -> 0; t1 0.0 vs 0.5 -> 1; t2 -> 0; t3 0.0 vs 0.1 -> 1.
    assert pessimistic[1].tolist() == [0, 1, 0, 1]
    # Column 3 of score_i2t.T: true image 1 scores 0.0, image 0 scores 0.1 -> rank 1 either way.
    assert optimistic[1].tolist() == [0, 1, 0, 1]
    tied = retrieval_ranks(torch.zeros(2, 2), [0, 1], [[0], [1]], ties="pessimistic")
    assert tied[0].tolist() == [1, 1] and tied[1].tolist() == [1, 1]


def test_block_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    import qformer_lightning.metrics.retrieval as retrieval

    score_i2t, score_t2i, txt2img, img2txt = _random_problem(3, 21, 2, integer_scores=True)
    full = retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i)
    monkeypatch.setattr(retrieval, "_ROW_BLOCK", 4)
    blocked = retrieval_ranks(score_i2t, txt2img, img2txt, score_t2i)
    assert all(torch.equal(a, b) for a, b in zip(full, blocked))


def test_bad_input() -> None:
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="no caption for image"):
        retrieval_metrics(scores, [0, 0, 0], [[0, 1, 2], []])
    with pytest.raises(ValueError, match="img2txt has 1 entries"):
        retrieval_metrics(scores, [0, 0, 0], [[0]])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(scores, [0, 0, 2], [[0, 1], [2]])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(scores, [0, 0, 1], [[0, 1], [3]])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 3), float("nan")), [0, 0, 1], [[0, 1], [2]])
    with pytest.raises(ValueError, match="score_t2i must have shape"):
        retrieval_metrics(scores, [0, 0, 1], [[0, 1], [2]], score_t2i=scores)
    with pytest.raises(ValueError, match="ties must be"):
        retrieval_metrics(scores, [0, 0, 1], [[0, 1], [2]], ties="random")
