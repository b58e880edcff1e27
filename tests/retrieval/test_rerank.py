"""ITM re-ranking against a naive per-query reference, hand-computed cases, and k beyond the candidates."""

from __future__ import annotations

import math

import pytest
import torch

from qformer_lightning.metrics.retrieval import retrieval_metrics, retrieval_ranks
from qformer_lightning.tasks.retrieval_eval import candidate_masks, itc_blocks, rerank

from retrieval_tiny import feed, tiny_retrieval, tiny_split

NEG = float("-inf")


def naive_scores(task, images: torch.Tensor, texts: list[str], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ITC by explicit loops, then per query and per candidate one ITM call on one pair."""
    model = task.model
    with torch.no_grad():
        embeds = model.image_embeds(images)  # (I, N, Dv)
        _, image_feats, _ = model.query_features(embeds)  # (I, Q, E)
        ids, mask = task.text(texts)
        _, text_feats = model.text_features(ids, mask)  # (X, E)
        num_images, num_texts = len(images), len(texts)
        sim = torch.empty(num_images, num_texts)
        for i in range(num_images):
            for x in range(num_texts):
                sim[i, x] = max(float(image_feats[i, q] @ text_feats[x]) for q in range(image_feats.shape[1]))

        def itm(i: int, x: int) -> float:
            return float(model.itm_logits(embeds[i : i + 1], ids[x : x + 1], mask[x : x + 1])[0, 1])

        i2t = torch.full((num_images, num_texts), NEG)
        for i in range(num_images):
            for x in sim[i].topk(min(k, num_texts)).indices.tolist():
                i2t[i, x] = itm(i, x) + sim[i, x]
        t2i = torch.full((num_texts, num_images), NEG)
        for x in range(num_texts):
            for i in sim[:, x].topk(min(k, num_images)).indices.tolist():
                t2i[x, i] = itm(i, x) + sim[i, x]
    return sim, i2t, t2i


def evaluate(task, images, texts, txt2img, img2txt):
    feed(task, images, list(range(len(images))), batch_size=4)
    return task.evaluate(texts, txt2img, img2txt)


def test_reranking_matches_naive_reference() -> None:
    task = tiny_retrieval(k=4, itm_batch_size=7)
    images, texts, txt2img, img2txt = tiny_split(num_images=6, captions_per_image=3)
    result = evaluate(task, images, texts, txt2img, img2txt)
    sim, i2t, t2i = naive_scores(task, images, texts, k=4)
    torch.testing.assert_close(result.sim, sim, atol=1e-5, rtol=0)
    assert torch.equal(torch.isinf(result.scores.i2t), torch.isinf(i2t))  # same candidates
    assert torch.equal(torch.isinf(result.scores.t2i), torch.isinf(t2i))
    assert (torch.isfinite(i2t).sum(1) == 4).all() and (torch.isfinite(t2i).sum(1) == 4).all()
    torch.testing.assert_close(result.scores.i2t, i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.scores.t2i, t2i, atol=1e-5, rtol=0)
    expected = retrieval_metrics(i2t, txt2img, img2txt, t2i)
    assert {k: v for k, v in result.metrics.items() if not k.startswith("itc_")} == expected
    assert {k[4:]: v for k, v in result.metrics.items() if k.startswith("itc_")} == retrieval_metrics(sim, txt2img, img2txt)
    # 6 images' top-4 and 18 texts' top-4, minus the pairs that are candidates both ways
    both = (torch.isfinite(i2t) & torch.isfinite(t2i.T)).sum().item()
    assert result.scores.num_pairs == 6 * 4 + 18 * 4 - both


def test_itm_changes_the_ranking_hand_computed() -> None:
    # 2 images x 3 texts; text 0, 1 belong to image 0, text 2 to image 1.
    sim = torch.tensor([[0.30, 0.50, 0.60],
                        [0.20, 0.10, 0.40]])
    itm_table = torch.tensor([[2.0, -1.0, -3.0],
                              [0.0, 0.5, 1.0]])
    calls = []

    def score_pairs(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        calls.append(len(image))
        return itm_table[image, text]

    out = rerank(sim, k=2, score_pairs=score_pairs, batch_size=3)
    # image 0: top-2 texts by ITC are 2 (0.6) and 1 (0.5); image 1: texts 2 (0.4) and 0 (0.2)
    inf = float("-inf")
    expected_i2t = torch.tensor([[inf, 0.5 - 1.0, 0.6 - 3.0],
                                 [0.2 + 0.0, inf, 0.4 + 1.0]])
    # k=2 >= 2 images: every text keeps both images
    expected_t2i = (sim + itm_table).T
    torch.testing.assert_close(out.i2t, expected_i2t)
    torch.testing.assert_close(out.t2i, expected_t2i)
    assert out.num_pairs == 6 and calls == [3, 3]  # every pair once, in batches of 3
    txt2img, img2txt = [0, 0, 1], [[0, 1], [2]]
    itc = retrieval_metrics(sim, txt2img, img2txt)
    itm = retrieval_metrics(out.i2t, txt2img, img2txt, out.t2i)
    # ITC alone: image 0 ranks text 2 (wrong) first -> TR@1 = 50; ITM + ITC: text 1 (-0.5) beats text 2 (-2.4)
    assert itc["txt_r1"] == 50.0 and itm["txt_r1"] == 100.0
    # text 0: ITC prefers image 0 (0.3 > 0.2); with ITM 2.3 > 0.2 still right. text 1: 0.5-1.0 = -0.5 vs 0.1+0.5 = 0.6 -> wrong
    assert itc["img_r1"] == pytest.approx(200 / 3) and itm["img_r1"] == pytest.approx(200 / 3)
    # which texts succeed changed: ITC gets texts 0, 1 right; ITM + ITC texts 0, 2
    assert retrieval_ranks(sim, txt2img, img2txt)[1].tolist() == [0, 0, 1]
    assert retrieval_ranks(out.i2t, txt2img, img2txt, out.t2i)[1].tolist() == [0, 1, 0]


def test_reranking_can_change_ranks_of_a_random_model() -> None:
    task = tiny_retrieval(k=4)
    images, texts, txt2img, img2txt = tiny_split()
    result = evaluate(task, images, texts, txt2img, img2txt)
    assert not torch.equal(result.scores.i2t.argmax(1), result.sim.argmax(1))


def test_k_larger_than_the_candidates_scores_every_pair_with_ties() -> None:
    task = tiny_retrieval(k=1000, itm_batch_size=5)
    images, texts, txt2img, img2txt = tiny_split(num_images=4, captions_per_image=2)
    images[3] = images[1]  # a duplicated image and duplicated captions: exact ties
    texts[6], texts[7] = texts[2], texts[3]
    result = evaluate(task, images, texts, txt2img, img2txt)
    sim, i2t, t2i = naive_scores(task, images, texts, k=1000)
    assert torch.isfinite(result.scores.i2t).all() and torch.isfinite(result.scores.t2i).all()
    assert result.scores.num_pairs == 4 * 8
    torch.testing.assert_close(result.scores.i2t, i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.scores.t2i, result.scores.i2t.T)
    # the duplicates tie up to rounding: an ITM batch's GEMM may round a row differently by its position
    # in the batch (seen on an AVX-512 CPU: 4.8e-7 apart)
    scores = result.scores.i2t
    torch.testing.assert_close(scores[1], scores[3], atol=1e-6, rtol=0)
    torch.testing.assert_close(scores[:, [2, 3]], scores[:, [6, 7]], atol=1e-6, rtol=0)
    metrics = result.metrics
    assert metrics == {**retrieval_metrics(scores, txt2img, img2txt, result.scores.t2i),
                       **{f"itc_{k}": v for k, v in retrieval_metrics(result.sim, txt2img, img2txt).items()}}
    # exact ties are pessimistic: image 1's captions score as high on image 3, so no text finds its image at rank 0
    tied = scores.clone()
    tied[3] = tied[1]
    tied[:, [6, 7]] = tied[:, [2, 3]]
    _, ranks = retrieval_ranks(tied, txt2img, img2txt, tied.T)
    assert (ranks[[2, 3, 6, 7]] >= 1).all()


def test_candidate_masks_cap_k_and_itc_similarity_blocks() -> None:
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    i2t, t2i = candidate_masks(sim, 2)
    assert i2t.tolist() == [[False, True, True], [True, False, True]]
    assert t2i.all()  # k=2 >= 2 images
    image = torch.nn.functional.normalize(torch.randn(5, 3, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(7, 4), dim=-1)
    expected = torch.einsum("iqe,xe->ixq", image, text).amax(-1)
    torch.testing.assert_close(torch.cat([sim for _, sim in itc_blocks(image, text)]), expected)
    assert math.isinf(rerank(sim, 1, lambda i, t: torch.zeros(len(i)), batch_size=2).i2t[0, 0].item())
