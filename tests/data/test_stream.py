"""Shard streaming: coverage, disjointness across ranks and workers, determinism, weights,
caption sampling and exact resume at the loader level."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from qformer_lightning.data.plan import source_quota
from qformer_lightning.data.shard_datamodule import ShardSource
from qformer_lightning.data.text import pre_caption
from shard_tiny import tiny_shard_dm as _dm  # noqa: E402  (tests/data on the path)


def _epoch(loader) -> list[dict]:
    return list(loader)


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_epoch_length_from_stats(corpus) -> None:
    dm = _dm(corpus)
    assert dm.num_batches_per_epoch(1) == 15  # 120 / 8
    assert dm.num_batches_per_epoch(2) == 7  # floor(120 / 16)
    assert dm.num_batches_per_epoch(3) == 5
    assert len(dm.train_dataloader()) == 15


def test_stats_file_defines_the_epoch(corpus, tmp_path: Path) -> None:
    """A stats file saying 5 samples makes the stream read 5 of that shard's 20, without a scan."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(Path(corpus.shards("train")).parent, shards)
    (shards / "00002_stats.json").write_text(json.dumps({"successes": 5}))
    dm = _dm(corpus, sources=[ShardSource(str(shards / "*.tar"))], batch_size=5)
    keys = _keys(_epoch(dm.train_dataloader()))
    assert len(keys) == 105 and len(set(keys)) == 105
    from_two = sorted(k.split("#")[1] for k in keys if "00002.tar" in k)
    assert len(from_two) == 5  # the first 5 samples of shard 2, in file order
    with __import__("tarfile").open(shards / "00002.tar") as tar:
        first = sorted({m.name.split(".")[0] for m in tar.getmembers()})[:5]
    assert from_two == first


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(corpus, world_size: int) -> None:
    dm = _dm(corpus)
    per_rank = [_keys(list(iter_batches(dm.train_dataset(rank, world_size)))) for rank in range(world_size)]
    sizes = {len(k) for k in per_rank}
    assert sizes == {(120 // (world_size * 8)) * 8}  # equal full batches on every rank
    union = [k for keys in per_rank for k in keys]
    assert len(set(union)) == len(union)  # disjoint, no duplicates
    single = set(_keys(_epoch(dm.train_dataloader())))
    assert set(union) <= single and len(single) == 120
    assert len(single - set(union)) == 120 - len(union)  # the left-out tail is < world_size * batch


def iter_batches(dataset):
    dataset.set_position(0, 0)
    return iter(dataset)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_workers_split_the_rank_share(corpus, num_workers: int) -> None:
    in_process = _keys(_epoch(_dm(corpus).train_dataloader()))
    with_workers = _keys(_epoch(_dm(corpus, num_workers=num_workers).train_dataloader()))
    assert len(with_workers) == 120 and sorted(with_workers) == sorted(in_process)


def test_deterministic_for_a_seed_new_order_each_epoch(corpus) -> None:
    a, b = _dm(corpus).train_dataloader(), _dm(corpus).train_dataloader()
    a0, b0 = _epoch(a), _epoch(b)
    assert _keys(a0) == _keys(b0)
    assert all(torch.equal(x["image"], y["image"]) and x["text"] == y["text"] for x, y in zip(a0, b0))
    a1 = _epoch(a)
    assert a.epoch == 1 and sorted(_keys(a1)) == sorted(_keys(a0)) and _keys(a1) != _keys(a0)
    other_seed = _keys(_epoch(_dm(corpus, seed=1).train_dataloader()))
    assert other_seed != _keys(a0)


def test_batches_mix_shards(corpus) -> None:
    batches = _epoch(_dm(corpus).train_dataloader())
    shards_per_batch = [len({k.split("#")[0] for k in b["key"]}) for b in batches]
    assert sum(shards_per_batch) / len(batches) >= 2.0  # interleave=3 lanes


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("skip", [1, 4, 7])
def test_loader_state_resumes_on_the_next_batch(corpus, num_workers: int, skip: int) -> None:
    full = _dm(corpus, num_workers=num_workers).train_dataloader()
    reference = _epoch(full) + _epoch(full)  # epochs 0 and 1
    first = _dm(corpus, num_workers=num_workers).train_dataloader()
    it = iter(first)
    for _ in range(skip):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == skip
    resumed = _dm(corpus, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    after = _epoch(resumed) + _epoch(resumed)
    assert _keys(after) == _keys(reference[skip:])
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(after, reference[skip:]))


def test_resume_from_a_complete_epoch_starts_the_next(corpus) -> None:
    loader = _dm(corpus).train_dataloader()
    e0, e1 = _epoch(loader), _epoch(loader)
    resumed = _dm(corpus).train_dataloader()
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "batches": 15})
    assert _keys(_epoch(resumed)) == _keys(e1)


def test_changed_layout_is_refused(corpus) -> None:
    state = _dm(corpus).train_dataloader().state_dict()
    loader = _dm(corpus, num_workers=2).train_dataloader()
    with pytest.raises(ValueError, match="num_workers: saved 0 now 2"):
        loader.load_state_dict(state)


def test_source_weights_repeat_and_subsample(corpus) -> None:
    shard_dir = Path(corpus.shards("train")).parent
    a = ShardSource(str(shard_dir / "{00000..00002}.tar"), weight=2.0, name="a")
    b = ShardSource(str(shard_dir / "{00003..00005}.tar"), weight=0.5, name="b")
    dm = _dm(corpus, sources=[a, b], batch_size=10)
    assert [source_quota(s, w) for s, w in zip(dm._train, (2.0, 0.5))] == [120, 30]
    loader = dm.train_dataloader()
    for _ in range(2):
        keys = _keys(_epoch(loader))
        assert len(keys) == 150
        counts = Counter(keys)
        from_a = {k: c for k, c in counts.items() if any(f"0000{i}.tar" in k for i in range(3))}
        from_b = {k: c for k, c in counts.items() if k not in from_a}
        assert len(from_a) == 60 and set(from_a.values()) == {2}
        assert len(from_b) == 30 and set(from_b.values()) == {1}


def test_one_of_the_top_k_captions_is_sampled(corpus) -> None:
    with open(corpus.karpathy_json) as f:
        images = json.load(f)["images"]
    allowed = {f"{im['cocoid']:09d}": [pre_caption(s["raw"]) for s in im["sentences"]] for im in images}
    loader = _dm(corpus).train_dataloader()
    chosen: dict[str, set[str]] = {}
    for _ in range(4):
        for batch in loader:
            for key, text in zip(batch["key"], batch["text"]):
                chosen.setdefault(key.split("#")[1], set()).add(text)
    for key, texts in chosen.items():
        assert texts <= {allowed[key][0], allowed[key][1]}  # the first 2 of the shard json's 5 captions
    assert sum(len(t) == 2 for t in chosen.values()) > 60  # both get drawn (p = 7/8 per key over 4 epochs)


def test_all_five_captions_are_drawn_with_top_k_5(corpus) -> None:
    with open(corpus.karpathy_json) as f:
        images = json.load(f)["images"]
    allowed = {f"{im['cocoid']:09d}": {pre_caption(s["raw"]) for s in im["sentences"]} for im in images}
    loader = _dm(corpus, caption_top_k=5, hflip=False).train_dataloader()
    chosen: dict[str, set[str]] = {}
    for _ in range(6):
        for batch in loader:
            for key, text in zip(batch["key"], batch["text"]):
                chosen.setdefault(key.split("#")[1], set()).add(text)
    assert all(texts <= allowed[key] for key, texts in chosen.items())
    # with 5 templates, over 6 epochs most keys get at least 3 distinct captions
    assert sum(len(t) >= 3 for t in chosen.values()) > 0.8 * len(chosen)


def _side_errors(corpus, **kw) -> tuple[int, int]:
    """(captions whose "left"/"right" contradicts the pixels, captions naming a side) over one epoch."""
    loader = _dm(corpus, caption_top_k=5, crop_scale=(1.0, 1.0), image_size=32, **kw).train_dataloader()
    wrong = named = 0
    for batch in loader:
        grey = batch["image"].std(dim=1)  # (B, S, S): the background is grey, the shapes saturated
        for image, text in zip(grey, batch["text"]):
            words = text.split()
            if ("left" in words) == ("right" in words):
                continue
            columns = (image > image.mean() + image.std()).float().sum(0)  # (S,) shape pixels per column
            centre = (columns * torch.arange(len(columns))).sum() / columns.sum().clamp(min=1)
            named += 1
            wrong += bool(("left" in words) != (centre < len(columns) / 2))
    return wrong, named


def test_flip_swaps_left_and_right_in_the_caption(corpus) -> None:
    wrong, named = _side_errors(corpus, hflip=True, hflip_swaps_text=True)
    assert named > 10 and wrong == 0
    wrong, named = _side_errors(corpus, hflip=True, hflip_swaps_text=False)
    assert wrong > 0.2 * named  # a plain flip makes about half of them false


def test_batch_layout(corpus) -> None:
    batch = next(iter(_dm(corpus).train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image_id"].dtype == torch.long and batch["image_id"].shape == (8,)
    assert len(batch["text"]) == 8 and len(batch["key"]) == 8
    assert batch["num_replaced"] == 0 and batch["replaced"] == {}
    assert -2.0 < batch["image"].min() and batch["image"].max() < 2.2  # CLIP-normalised


def test_worker_batches_are_normalised_in_the_main_process_identically(corpus) -> None:
    """Workers send uint8 images (a quarter of the bytes); the loader normalises them in the main
    process. Validation (no augmentation) gives exactly the in-process images per key; training
    batches come out float32 and normalised."""
    for batch in _epoch(_dm(corpus, num_workers=2).train_dataloader()):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 16, 16)
        assert -2.0 < batch["image"].min() and batch["image"].max() < 2.2
    val_sources = [ShardSource(corpus.shards("val"), name="val")]
    one = _epoch(_dm(corpus, val_sources=val_sources, num_workers=0).val_dataloader())
    two = _epoch(_dm(corpus, val_sources=val_sources, num_workers=2).val_dataloader())
    assert sorted(k for b in two for k in b["key"]) == sorted(k for b in one for k in b["key"])
    images = {k: img for b in one for k, img in zip(b["key"], b["image"])}
    assert all(torch.equal(img, images[k]) for b in two for k, img in zip(b["key"], b["image"]))


def test_val_loader_reads_in_file_order_with_a_short_last_batch(corpus) -> None:
    dm = _dm(corpus, val_sources=[ShardSource(corpus.shards("val"))], val_batch_size=10)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [len(b["key"]) for b in batches] == [10, 10, 4]
    keys = [k.split("#")[1] for k in _keys(batches)]
    assert keys == sorted(keys)
    again = list(dm.val_dataloader())
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, again))
