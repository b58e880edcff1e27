"""End to end on the synthetic corpus: output layout and ranking, streaming by ShardDataModule,
unreadable images passed through, restart after an interruption, the shard split across ranks."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest

from capfilt_tiny import read_tar, write_shard
from qformer_lightning.capfilt import CapFilt, ShardWriter
from qformer_lightning.capfilt.batches import decode_image
from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.text import pre_caption

NAMES = ["00000", "00001", "00002", "00003"]


def snapshot(out: Path) -> dict[str, bytes]:
    return {os.path.basename(p): Path(p).read_bytes() for p in sorted(glob.glob(str(out / "*")))}


def test_output_shards_hold_ranked_captions(capfilt: CapFilt, corpus, recaptioned: Path) -> None:
    assert sorted(os.listdir(recaptioned)) == sorted([f"{n}.tar" for n in NAMES] + [f"{n}_stats.json" for n in NAMES])
    for name in NAMES:
        src = read_tar(Path(corpus.root) / "shards" / "train" / f"{name}.tar")
        out = read_tar(recaptioned / f"{name}.tar")
        assert [k for k, _ in out] == [k for k, _ in src]
        for (_, before), (_, after) in zip(src, out):
            assert list(after) == ["jpg", "txt", "json"]
            assert after["jpg"] == before["jpg"] and after["txt"] == before["txt"]
            meta, old = json.loads(after["json"]), json.loads(before["json"])
            assert meta["image_id"] == old["image_id"] and meta["url"] == old["url"]
            ranked = meta["ranked_captions"]
            scores = [c["score"] for c in ranked]
            assert scores == sorted(scores, reverse=True)
            assert meta["captions"] == [c["caption"] for c in ranked[:2]]
            web = [c for c in ranked if c["source"] == "web"]
            assert [c["caption"] for c in web] == [before["txt"].decode()]
            assert 2 <= len(ranked) <= 4 and len({c["caption"] for c in ranked}) == len(ranked)
        stats = json.loads((recaptioned / f"{name}_stats.json").read_text())
        assert stats["successes"] == 5 and stats["count"] == 5
        assert stats["capfilt"]["unreadable"] == 0 and stats["capfilt"]["truncated"] is None
        assert stats["capfilt"]["sampling"]["num_captions"] == 3 and stats["capfilt"]["keep"] == 2
    # the stored scores are CLIP's scores of exactly those captions with that image
    _, first = read_tar(recaptioned / "00002.tar")[3]
    ranked = json.loads(first["json"])["ranked_captions"]
    _, clip_pixels = capfilt.preprocess([decode_image(first, 10**6)])
    again = capfilt.scorer.score(clip_pixels, [[c["caption"] for c in ranked]])[0]
    assert np.allclose(again, [c["score"] for c in ranked], atol=1e-5)


def test_rerun_skips_done_shards(capfilt: CapFilt, corpus, recaptioned: Path) -> None:
    before = snapshot(recaptioned)
    summary = capfilt.run(corpus.shards("train"), recaptioned, progress=False)
    assert (summary.shards_written, summary.shards_skipped, summary.images) == (0, 4, 0)
    assert snapshot(recaptioned) == before


def test_shard_datamodule_streams_the_output(recaptioned: Path) -> None:
    top2: dict[str, list[str]] = {}
    for name in NAMES:
        for key, members in read_tar(recaptioned / f"{name}.tar"):
            top2[key] = [pre_caption(c, 30) for c in json.loads(members["json"])["captions"]]
    dm = ShardDataModule(sources=[ShardSource(urls=str(recaptioned / "*.tar"), name="capfilt")],
                         batch_size=5, num_workers=0, image_size=32, shuffle_block=8, seed=0)
    dm.setup("fit")
    assert dm.num_batches_per_epoch() == 4
    seen = set()
    for batch in dm.train_dataloader():
        assert batch["image"].shape == (5, 3, 32, 32) and batch["num_replaced"] == 0
        for key, text in zip(batch["key"], batch["text"]):
            sample = key.rsplit("#", 1)[1]
            assert text in top2[sample], (text, top2[sample])
            seen.add(sample)
    assert seen == set(top2)


def test_unreadable_image_passes_through_with_web_caption(capfilt: CapFilt, corpus, tmp_path: Path) -> None:
    samples = read_tar(Path(corpus.root) / "shards" / "train" / "00000.tar")
    samples[1][1]["jpg"] = b"\xff\xd8\xff not a jpeg"
    del samples[3][1]["jpg"]
    write_shard(tmp_path / "in" / "00007.tar", samples)
    summary = capfilt.run(str(tmp_path / "in" / "*.tar"), tmp_path / "out", progress=False)
    assert (summary.shards_written, summary.images, summary.unreadable) == (1, 5, 2)
    out = read_tar(tmp_path / "out" / "00007.tar")
    assert [k for k, _ in out] == [k for k, _ in samples]
    for index, (key, members) in enumerate(out):
        meta = json.loads(members["json"])
        web = samples[index][1]["txt"].decode()
        if index in (1, 3):
            assert meta["captions"] == [web]
            assert meta["ranked_captions"] == [{"caption": web, "score": None, "source": "web"}]
            assert members.get("jpg") == samples[index][1].get("jpg")  # passed through untouched
        else:
            assert len(meta["captions"]) == 2 and "capfilt_error" not in meta
    assert "no image member" in json.loads(out[3][1]["json"])["capfilt_error"]
    stats = json.loads((tmp_path / "out" / "00007_stats.json").read_text())
    assert stats["capfilt"]["unreadable"] == 2 and stats["successes"] == 5


def test_truncated_input_shard_is_written_with_what_it_has(capfilt: CapFilt, corpus, tmp_path: Path) -> None:
    samples = read_tar(Path(corpus.root) / "shards" / "train" / "00001.tar")
    write_shard(tmp_path / "in" / "00001.tar", samples[:3])
    (tmp_path / "in" / "00001_stats.json").write_text(json.dumps({"successes": 5}))
    summary = capfilt.run(str(tmp_path / "in" / "00001.tar"), tmp_path / "out", progress=False)
    assert (summary.shards_written, summary.images, summary.truncated_shards) == (1, 3, 1)
    stats = json.loads((tmp_path / "out" / "00001_stats.json").read_text())
    assert stats["successes"] == 3 and "says 5" in stats["capfilt"]["truncated"]


def test_resume_after_interruption_writes_every_shard_once(
    capfilt: CapFilt, corpus, recaptioned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = ShardWriter.commit
    committed: list[str] = []

    def crash_on_third(self: ShardWriter, stats: dict) -> None:
        if len(committed) == 2:
            raise KeyboardInterrupt("simulated kill")
        commit(self, stats)
        committed.append(self.name)

    monkeypatch.setattr(ShardWriter, "commit", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        capfilt.run(corpus.shards("train"), tmp_path, progress=False)
    assert committed == ["00000", "00001"]
    assert not glob.glob(str(tmp_path / "*.tmp-*"))  # the half-written shard was dropped
    # a killed process could not clean up: a stale temp file, and a tar moved in without its stats
    (tmp_path / "00002.tar.tmp-99999").write_bytes(b"partial")
    os.remove(tmp_path / "00001_stats.json")

    committed.clear()
    monkeypatch.setattr(ShardWriter, "commit", lambda self, stats: (commit(self, stats), committed.append(self.name)))
    summary = capfilt.run(corpus.shards("train"), tmp_path, progress=False)
    assert committed == ["00001", "00002", "00003"] and summary.shards_skipped == 1
    assert snapshot(tmp_path) == snapshot(recaptioned)  # identical to the uninterrupted run, byte for byte


def test_ranks_split_the_shards(capfilt: CapFilt, corpus, recaptioned: Path, tmp_path: Path) -> None:
    written = [capfilt.run(corpus.shards("train"), tmp_path, rank=r, world_size=2, progress=False).written for r in (0, 1)]
    assert written == [["00000", "00002"], ["00001", "00003"]]
    assert snapshot(tmp_path) == snapshot(recaptioned)
