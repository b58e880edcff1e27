"""Two CPU processes (gloo) reproduce the single-process ITC loss and gradients on the full batch.

Convention checked here (see qformer_lightning.distributed): every rank computes its loss
over its B local rows against the G = W * B gathered columns, and DDP averages parameter
gradients over the W ranks. Hence
- the mean over ranks of the rank losses equals the single-process loss on the full batch;
- rank r's local feature gradients equal W times the single-process gradients of its slice
  (so that DDP's 1/W gives back the single-process parameter gradients);
- the temperature (not gathered) has rank gradients whose mean equals the single-process one.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from qformer_lightning.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world
from qformer_lightning.losses.itc import itc_loss
from qformer_lightning.losses.itm import has_negative, sample_hard_negatives

WORLD, LOCAL, QUERIES, WIDTH = 2, 3, 4, 8
IMAGE_IDS = torch.tensor([0, 1, 2, 2, 3, 0])  # id 2 and id 0 appear on both ranks


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (G, Q, E) image and (G, E) text features, L2-normalised."""
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(WORLD * LOCAL, QUERIES, WIDTH, generator=gen), dim=-1)
    text = F.normalize(torch.randn(WORLD * LOCAL, WIDTH, generator=gen), dim=-1)
    return image, text


def run_itc(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Loss, logits and gradients of one ITC evaluation on leaf copies of the given features."""
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(True)
    temperature = torch.tensor(0.07, requires_grad=True)
    out = itc_loss(image, text, temperature, image_ids=image_ids)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "sim_i2t": out.sim_i2t.detach(),
        "sim_t2i": out.sim_t2i.detach(),
        "image_grad": image.grad,
        "text_grad": text.grad,
        "temp_grad": temperature.grad,
        "image_ids_all": out.image_ids_all,
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        local = slice(rank * LOCAL, (rank + 1) * LOCAL)
        image, text = full_batch()
        ids = IMAGE_IDS[local]
        result: dict[str, object] = {"rank_and_world": rank_and_world()}
        result["plain"] = run_itc(image[local], text[local], None)
        result["ids"] = run_itc(image[local], text[local], ids)
        result["gathered_ids"] = all_gather_no_grad(ids)
        result["gathered_bool"] = all_gather_no_grad(ids == 2)
        # gather-with-grad alone: d/dx_r of sum_s sum_j w_s[j] * gathered[j] = sum_s w_s[slice r]
        x = torch.ones(LOCAL, requires_grad=True)
        weights = torch.arange(WORLD * LOCAL, dtype=torch.float32) * (rank + 1)
        (all_gather_with_grad(x) * weights).sum().backward()
        result["gather_grad"] = x.grad
        # hard negatives of the local rows, indices into the global batch
        sims = result["ids"]
        gen = torch.Generator().manual_seed(rank)
        draws = [
            sample_hard_negatives(sims["sim_i2t"], sims["sim_t2i"], ids, result["gathered_ids"], generator=gen)
            for _ in range(100)
        ]
        result["neg_image"] = torch.stack([d[0] for d in draws])  # (100, B)
        result["neg_text"] = torch.stack([d[1] for d in draws])
        result["has_negative"] = has_negative(ids, result["gathered_ids"], WORLD * LOCAL)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_itc_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["rank_and_world"] for r in ranks] == [(0, WORLD), (1, WORLD)]
    assert rank_and_world() == (0, 1)  # this (parent) process has no process group

    image, text = full_batch()
    for mode, ids in (("plain", None), ("ids", IMAGE_IDS)):
        single = run_itc(image, text, ids)
        loss_mean = sum(r[mode]["loss"] for r in ranks) / WORLD
        torch.testing.assert_close(loss_mean, single["loss"], rtol=1e-6, atol=1e-6)
        for rank, result in enumerate(ranks):
            local = slice(rank * LOCAL, (rank + 1) * LOCAL)
            torch.testing.assert_close(result[mode]["sim_i2t"], single["sim_i2t"][local])
            torch.testing.assert_close(result[mode]["sim_t2i"], single["sim_t2i"][local])
            for grad in ("image_grad", "text_grad"):
                expected = WORLD * single[grad][local]
                torch.testing.assert_close(result[mode][grad], expected, rtol=1e-5, atol=1e-6)
        temp_grad_mean = sum(r[mode]["temp_grad"] for r in ranks) / WORLD
        torch.testing.assert_close(temp_grad_mean, single["temp_grad"], rtol=1e-5, atol=1e-6)
    # the id-aware loss is a different objective on this batch (ids 0 and 2 repeat)
    assert abs(single["loss"].item() - run_itc(image, text, None)["loss"].item()) > 1e-3

    for rank, result in enumerate(ranks):
        assert torch.equal(result["gathered_ids"], IMAGE_IDS)
        assert torch.equal(result["ids"]["image_ids_all"], IMAGE_IDS) and result["plain"]["image_ids_all"] is None
        assert torch.equal(result["gathered_bool"], IMAGE_IDS == 2)
        # sum over ranks s of weights_s[slice r], weights_s = arange(G) * (s + 1)
        local = slice(rank * LOCAL, (rank + 1) * LOCAL)
        expected = torch.arange(WORLD * LOCAL, dtype=torch.float32)[local] * sum(s + 1 for s in range(WORLD))
        torch.testing.assert_close(result["gather_grad"], expected)
        own_ids = IMAGE_IDS[local]
        assert result["has_negative"].all()
        assert (IMAGE_IDS[result["neg_image"]] != own_ids).all()
        assert (IMAGE_IDS[result["neg_text"]] != own_ids).all()
        # negatives come from both ranks' samples
        assert (result["neg_text"] < LOCAL).any() and (result["neg_text"] >= LOCAL).any()
