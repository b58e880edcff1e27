"""The loader state's data-layout fingerprint: a resume with any changed field fails before the first
step, naming the field with its saved and current values; ``on_layout_change="fresh_epoch"`` starts a
fresh data epoch instead."""

import json
import shutil
from pathlib import Path

import pytest

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.stream import ResumableShardLoader
from shard_tiny import tiny_shard_dm as _dm  # noqa: E402  (tests/data on the path)


def _loader(dm: ShardDataModule, world_size: int = 1) -> ResumableShardLoader:
    if world_size == 1:
        return dm.train_dataloader()
    return ResumableShardLoader(dm.train_dataset(0, world_size), weights=[s.weight for s in dm.sources])


def _undercounted_copy(corpus, root: Path) -> str:
    """The train shards with shard 2's stats file saying 19 samples instead of 20."""
    shutil.copytree(Path(corpus.shards("train")).parent, root)
    (root / "00002_stats.json").write_text(json.dumps({"successes": 19}))
    return str(root / "*.tar")


def _split_sources(corpus) -> list[ShardSource]:
    shard_dir = Path(corpus.shards("train")).parent
    return [ShardSource(str(shard_dir / "{00000..00002}.tar"), name="syn"),
            ShardSource(str(shard_dir / "{00003..00005}.tar"), name="syn_b")]


# (field named in the error, saved value, current value, what changes)
CHANGES = {
    "shards": ("sources[0].shards", "6 shards, 120 samples", "3 shards, 60 samples",
               lambda corpus, tmp: {"sources": _split_sources(corpus)}),
    "num_sources": ("num_sources", "1", "2", lambda corpus, tmp: {"sources": _split_sources(corpus)}),
    "sample_count": ("sources[0].shards", "6 shards, 120 samples", "6 shards, 119 samples",
                     lambda corpus, tmp: {"sources": [ShardSource(_undercounted_copy(corpus, tmp), name="syn")]}),
    "name": ("sources[0].name", "syn", "other", lambda corpus, tmp: {"sources": [
        ShardSource(corpus.shards("train"), name="other")]}),
    "weight": ("sources[0].weight", "1.0", "0.5", lambda corpus, tmp: {"sources": [
        ShardSource(corpus.shards("train"), name="syn", weight=0.5)]}),
    "shuffle_block": ("shuffle_block", "10", "20", lambda corpus, tmp: {"shuffle_block": 20}),
    "interleave": ("interleave", "3", "2", lambda corpus, tmp: {"interleave": 2}),
    "seed": ("seed", "0", "5", lambda corpus, tmp: {"seed": 5}),
    "batch_size": ("batch_size", "8", "4", lambda corpus, tmp: {"batch_size": 4}),
    "num_workers": ("num_workers", "0", "2", lambda corpus, tmp: {"num_workers": 2}),
}


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_a_changed_field_is_refused_and_named(corpus, tmp_path: Path, case: str) -> None:
    field, saved, now, change = CHANGES[case]
    state = _loader(_dm(corpus)).state_dict()
    loader = _loader(_dm(corpus, **change(corpus, tmp_path / "shards")))
    with pytest.raises(ValueError, match="data layout changed") as err:
        loader.load_state_dict(state)
    assert f"{field}: saved {saved}" in str(err.value) and f" now {now}" in str(err.value)
    assert "on_layout_change: fresh_epoch" in str(err.value)


def test_a_changed_world_size_is_refused_and_named(corpus) -> None:
    state = _loader(_dm(corpus)).state_dict()
    with pytest.raises(ValueError, match="world_size: saved 1 now 2"):
        _loader(_dm(corpus), world_size=2).load_state_dict(state)


def test_a_changed_seed_everything_is_refused_and_named(corpus, monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    state = _loader(_dm(corpus)).state_dict()
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    with pytest.raises(ValueError, match="seed_everything: saved 0 now 7"):
        _loader(_dm(corpus)).load_state_dict(state)


def test_every_changed_field_is_named(corpus) -> None:
    state = _loader(_dm(corpus)).state_dict()
    with pytest.raises(ValueError) as err:
        _loader(_dm(corpus, seed=1, interleave=2)).load_state_dict(state)
    assert "seed: saved 0 now 1" in str(err.value) and "interleave: saved 3 now 2" in str(err.value)


def test_an_older_state_without_the_fingerprint_is_refused(corpus) -> None:
    state = {"epoch": 0, "batches": 3, "world_size": 1, "num_workers": 0, "batch_size": 8, "seed": 0,
             "samples_per_epoch": 120}
    with pytest.raises(ValueError, match="plan_version: saved not recorded now"):
        _loader(_dm(corpus)).load_state_dict(state)


def test_the_same_layout_resumes(corpus) -> None:
    state = {**_loader(_dm(corpus)).state_dict(), "epoch": 0, "batches": 3}
    loader = _loader(_dm(corpus))
    loader.load_state_dict(state)
    assert (loader.epoch, loader.batches) == (0, 3)


def test_fresh_epoch_starts_the_next_data_epoch_of_the_new_layout(corpus) -> None:
    state = {**_loader(_dm(corpus)).state_dict(), "epoch": 0, "batches": 4}
    new = dict(shuffle_block=5, on_layout_change="fresh_epoch")
    reference = _loader(_dm(corpus, **new))
    list(reference)
    expected = [k for batch in reference for k in batch["key"]]  # data epoch 1 of the new layout
    resumed = _loader(_dm(corpus, **new))
    resumed.load_state_dict(state)
    keys = [k for batch in resumed for k in batch["key"]]
    assert resumed.epoch == 1 and keys == expected
    assert resumed.state_dict()["shuffle_block"] == 5  # later checkpoints record the new layout


def test_on_layout_change_is_checked(corpus) -> None:
    with pytest.raises(ValueError, match="on_layout_change must be one of"):
        _dm(corpus, on_layout_change="ignore").train_dataloader()
