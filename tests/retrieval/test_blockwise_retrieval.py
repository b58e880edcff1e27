"""The blockwise retrieval evaluation (top-k lists, no (I, X) matrices) against the dense protocol.

The dense reference below is the protocol as it was computed before (full ITC matrix, candidate
masks, ITM + ITC where a candidate, ``fill`` elsewhere, ranks on the dense rows), with the
documented tie rule at the k-th place: the lower index wins. Scores are small integers and
halves, so every sum is exact and ties are frequent; every comparison is exact equality.
"""

from __future__ import annotations

import pytest
import torch

import qformer_lightning.tasks.retrieval_eval as retrieval_eval
from qformer_lightning.metrics.retrieval import retrieval_metrics, retrieval_ranks
from qformer_lightning.tasks.retrieval_eval import (
    ItcRetrievalMetric,
    dense_blocks,
    itc_blocks,
    itc_topk,
    rerank,
    stable_topk,
)

NEG = float("-inf")


def random_split(seed: int, num_images: int, max_captions: int) -> tuple[list[int], list[list[int]]]:
    """Images with 1..max_captions captions each, texts in shuffled order: txt2img (X,), img2txt (I lists)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_captions + 1, (num_images,), generator=g)
    owners = torch.repeat_interleave(torch.arange(num_images), counts)
    txt2img = owners[torch.randperm(len(owners), generator=g)].tolist()
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(num_images)]
    return txt2img, img2txt


def tied_scores(seed: int, num_images: int, num_texts: int, levels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC (I, X) in {0 .. levels-1} and an ITM table (I, X) in halves: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(0, levels, (num_images, num_texts), generator=g).float()
    itm = torch.randint(-2, 3, (num_images, num_texts), generator=g).float() / 2
    return sim, itm


def dense_reference(sim: torch.Tensor, itm: torch.Tensor, k: int, fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense protocol: i2t (I, X), t2i (X, I) and the candidate mask (I, X) of both directions."""
    num_images, num_texts = sim.shape
    top_texts = sim.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (I, k): ties -> lower index
    i2t_mask = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top_texts, True)
    top_images = sim.T.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (X, k)
    t2i_mask = torch.zeros(num_texts, num_images, dtype=torch.bool).scatter_(1, top_images, True)
    combined = sim + itm
    i2t = torch.where(i2t_mask, combined, torch.tensor(fill))
    t2i = torch.where(t2i_mask, combined.T, torch.tensor(fill))
    return i2t, t2i, i2t_mask | t2i_mask.T


def table_scorer(itm: torch.Tensor, calls: list[int] | None = None):
    def score_pairs(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(len(image))
        return itm[image, text]

    return score_pairs


def test_stable_topk_is_the_head_of_a_stable_descending_sort() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (9, 13), generator=g).float()
    x[0] = 1.0  # a row of one value
    x[1, :4] = float("inf")
    x[2] = NEG
    for k in (1, 2, 5, 13, 40):
        values, index = stable_topk(x, k)
        for row in range(len(x)):
            expected = sorted(range(x.shape[1]), key=lambda j: (-x[row, j].item(), j))[: min(k, x.shape[1])]
            assert index[row].tolist() == expected, (k, row)
            assert torch.equal(values[row], x[row, expected])


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("fill", [NEG, 1.0])
@pytest.mark.parametrize("k", [1, 2, 5, 12, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blockwise_equals_the_dense_protocol_with_ties(seed: int, k: int, fill: float, ties: str) -> None:
    num_images = 11 + seed
    txt2img, img2txt = random_split(seed, num_images, max_captions=5)
    sim, itm = tied_scores(seed, num_images, len(txt2img))
    i2t, t2i, candidates = dense_reference(sim, itm, k, fill)
    for rows in (1, 3, 7, num_images):  # block layouts: the result must not depend on them
        itc = itc_topk(dense_blocks(sim, rows), num_images, len(txt2img), k, txt2img, ties)
        assert itc.metrics() == retrieval_metrics(sim, txt2img, img2txt, ties=ties)
        text_ranks, image_ranks = retrieval_ranks(sim, txt2img, img2txt, ties=ties)
        assert torch.equal(itc.text_ranks, text_ranks)
        cap = itc.t2i_values.shape[1] - 1  # the image ranks are exact below the depth of the lists
        assert cap >= 10 or cap == num_images - 1
        assert torch.equal(itc.image_ranks, image_ranks.clamp(max=cap))

        calls: list[int] = []
        scores = rerank(itc, k, table_scorer(itm, calls), batch_size=4, fill=fill)
        assert torch.equal(scores.i2t, i2t) and torch.equal(scores.t2i, t2i)  # the same candidates, bit for bit
        assert scores.num_pairs == candidates.sum().item() == sum(calls)
        assert torch.equal(scores.itm.isnan(), ~candidates)
        assert scores.metrics(txt2img, ties) == retrieval_metrics(i2t, txt2img, img2txt, t2i, ties=ties)
        assert all(torch.equal(a, b) for a, b in zip(scores.ranks(txt2img, ties), retrieval_ranks(i2t, txt2img, img2txt, t2i, ties)))


def test_a_dense_similarity_and_its_blocks_give_the_same_reranking() -> None:
    txt2img, _ = random_split(5, 9, max_captions=4)
    sim, itm = tied_scores(5, 9, len(txt2img), levels=3)
    from_dense = rerank(sim, 3, table_scorer(itm), batch_size=5)
    from_blocks = rerank(itc_topk(dense_blocks(sim, 2), *sim.shape, 3), 3, table_scorer(itm), batch_size=5)
    for name in ("i2t_index", "i2t_scores", "t2i_index", "t2i_scores", "pairs", "pair_itm"):
        assert torch.equal(getattr(from_dense, name), getattr(from_blocks, name)), name


def test_exact_ties_rank_the_true_item_pessimistically() -> None:
    # image 1 and image 2 are duplicates (same ITC row, same ITM): texts of either never rank their image first
    txt2img = [0, 1, 2, 0, 1, 2]
    img2txt = [[0, 3], [1, 4], [2, 5]]
    sim = torch.tensor([[3.0, 0.0, 0.0, 3.0, 0.0, 0.0],
                        [0.0, 2.0, 2.0, 0.0, 2.0, 2.0],
                        [0.0, 2.0, 2.0, 0.0, 2.0, 2.0]])  # fmt: skip
    itm = torch.zeros_like(sim)
    itc = itc_topk(dense_blocks(sim, 1), 3, 6, 2, txt2img)
    scores = rerank(itc, 2, table_scorer(itm))
    text_ranks, image_ranks = scores.ranks(txt2img)
    assert image_ranks.tolist() == [0, 1, 1, 0, 1, 1]
    # image 1's candidates (k=2, ties to the lower index): texts 1 (true) and 2 (image 2's), tied: rank 1
    assert text_ranks.tolist() == [0, 1, 1]
    # with k=4 both of image 2's captions are candidates and tie with image 1's best: rank 2
    assert rerank(itc_topk(dense_blocks(sim), 3, 6, 4, txt2img), 4, table_scorer(itm)).ranks(txt2img)[0].tolist() == [0, 2, 2]
    assert scores.metrics(txt2img)["img_r1"] == pytest.approx(100 / 3)
    assert itc.image_ranks.tolist() == [0, 1, 1, 0, 1, 1]
    optimistic = rerank(itc_topk(dense_blocks(sim), 3, 6, 2, txt2img, "optimistic"), 2, table_scorer(itm))
    assert optimistic.ranks(txt2img, "optimistic")[1].tolist() == [0] * 6


def test_a_true_caption_outside_the_candidates_scores_fill() -> None:
    # image 0 has 3 captions; with k=1 only its best ITC text is a candidate; with a finite fill the
    # captions outside tie with every other non-candidate
    txt2img, img2txt = [0, 0, 0, 1], [[0, 1, 2], [3]]
    sim = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    itm = torch.tensor([[0.0, 0.0, 0.0, -5.0], [0.0, 0.0, 0.0, 0.0]])  # image 0's candidate (text 3) sinks
    for fill in (NEG, -3.0, 0.0):
        i2t, t2i, _ = dense_reference(sim, itm, 1, fill)
        scores = rerank(sim, 1, table_scorer(itm), fill=fill)
        expected = retrieval_ranks(i2t, txt2img, img2txt, t2i)
        assert all(torch.equal(a, b) for a, b in zip(scores.ranks(txt2img), expected)), fill
    # fill -inf: image 0's true captions all lie outside its one candidate (text 3, wrong, at 2 - 5 = -3): rank 1
    assert rerank(sim, 1, table_scorer(itm)).ranks(txt2img)[0].tolist() == [1, 0]


def test_itc_blocks_from_features_match_the_dense_similarity(monkeypatch: pytest.MonkeyPatch) -> None:
    # features in {-1, 0, 1}: dot products are exact small integers, so the maxima tie often
    g = torch.Generator().manual_seed(3)
    image_feats = torch.randint(-1, 2, (13, 3, 4), generator=g).float()  # (I, Q, E)
    txt2img, img2txt = random_split(3, 13, max_captions=3)
    text_feats = torch.randint(-1, 2, (len(txt2img), 4), generator=g).float()  # (X, E)
    dense = torch.einsum("iqe,xe->ixq", image_feats, text_feats).amax(-1)  # (I, X)
    monkeypatch.setattr(retrieval_eval, "_SIM_BLOCK_ELEMENTS", 3 * len(txt2img))  # blocks of 3 images
    starts = [start for start, _ in itc_blocks(image_feats, text_feats)]
    assert starts == [0, 3, 6, 9, 12]
    assert torch.equal(torch.cat([sim for _, sim in itc_blocks(image_feats, text_feats)]), dense)
    itc = itc_topk(itc_blocks(image_feats, text_feats), 13, len(txt2img), 4, txt2img)
    assert itc.metrics() == retrieval_metrics(dense, txt2img, img2txt)
    itm = torch.zeros_like(dense)
    assert torch.equal(rerank(itc, 4, table_scorer(itm)).i2t, dense_reference(dense, itm, 4, NEG)[0])


def test_itc_metric_equals_the_dense_metrics_with_ties() -> None:
    g = torch.Generator().manual_seed(4)
    image_ids = torch.tensor([7, 7, 3, 9, 9, 9, 3, 1])  # 1 to 3 captions per image, shuffled
    image_table = {i: torch.randint(-1, 2, (2, 3), generator=g).float() for i in (1, 3, 7, 9)}
    image_feats = torch.stack([image_table[int(i)] for i in image_ids])  # (M, Q, E)
    text_feats = torch.randint(-1, 2, (len(image_ids), 3), generator=g).float()  # (M, E)
    metric = ItcRetrievalMetric()
    metric.update(image_feats[:5], text_feats[:5], image_ids[:5])
    metric.update(image_feats[5:], text_feats[5:], image_ids[5:])
    got = {k: v.item() for k, v in metric.compute().items()}
    unique = [1, 3, 7, 9]
    txt2img = [unique.index(int(i)) for i in image_ids]
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(4)]
    sim = torch.einsum("iqe,xe->ixq", torch.stack([image_table[i] for i in unique]), text_feats).amax(-1)
    expected = retrieval_metrics(sim, txt2img, img2txt)
    assert got == pytest.approx(expected, abs=1e-5)  # float32 state


def test_bad_input_is_refused() -> None:
    sim = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="expected rows from 0"):
        itc_topk(iter([(1, sim)]), 3, 4, 2)
    with pytest.raises(ValueError, match="covered 2 of 3"):
        itc_topk(dense_blocks(sim[:2]), 3, 4, 2)
    nan = sim.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="images 0..2 holds NaN"):
        itc_topk(dense_blocks(nan), 3, 4, 2)
    with pytest.raises(ValueError, match=r"no caption for image\(s\) \[2\]"):
        itc_topk(dense_blocks(sim), 3, 4, 2, [0, 1, 1, 0])
    with pytest.raises(ValueError, match="txt2img must have shape"):
        itc_topk(dense_blocks(sim), 3, 4, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="k must be >= 1"):
        itc_topk(dense_blocks(sim), 3, 4, 0)
    itc = itc_topk(dense_blocks(sim), 3, 4, 2)
    with pytest.raises(ValueError, match="built without txt2img"):
        itc.metrics()
    with pytest.raises(ValueError, match="hold only 2 candidates"):
        rerank(itc, 3, table_scorer(torch.zeros(3, 4)))
    with pytest.raises(RuntimeError, match="scored by no rank"):  # image 2 owned by a rank that does not exist
        rerank(itc, 2, table_scorer(torch.zeros(3, 4)), owner=torch.tensor([0, 0, 1]))
    itm = torch.zeros(3, 4)
    itm[0, 0] = float("nan")  # a NaN ITM logit: the ranks are undefined
    with pytest.raises(ValueError, match="NaN"):
        rerank(itc, 2, table_scorer(itm)).metrics([0, 1, 2, 0])
