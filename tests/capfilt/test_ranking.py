"""Ranking follows the scores, duplicates are kept once, the top two become the training captions."""

from __future__ import annotations

import json

import pytest

from qformer_lightning.capfilt.captioner import SamplingConfig, batch_seed, strip_prompt
from qformer_lightning.capfilt.pipeline import assign_shards, caption_sample, passthrough_sample
from qformer_lightning.capfilt.batches import ShardJob, web_caption
from qformer_lightning.capfilt.ranking import ScoredCaption, rank_captions, top_captions
from qformer_lightning.capfilt.shardio import output_name, output_names


def test_rank_orders_by_descending_score() -> None:
    ranked = rank_captions(["web", "a", "b", "c"], [0.1, 0.5, -0.2, 0.3], ["web", "synthetic", "synthetic", "synthetic"])
    assert [c.caption for c in ranked] == ["a", "c", "web", "b"]
    assert [c.score for c in ranked] == [0.5, 0.3, 0.1, -0.2]
    assert ranked[2] == ScoredCaption("web", 0.1, "web")
    assert top_captions(ranked) == ["a", "c"]
    assert top_captions(ranked, 1) == ["a"]
    assert top_captions(ranked[:1], 2) == ["a"]
    assert ScoredCaption("x", 0.123456789, "web").to_json() == {"caption": "x", "score": 0.123457, "source": "web"}


def test_rank_keeps_first_duplicate_and_stable_ties() -> None:
    ranked = rank_captions(["dog", " dog ", "cat", "", "bird"], [0.2, 0.2, 0.2, 0.9, 0.4],
                           ["web", "synthetic", "synthetic", "synthetic", "synthetic"])
    assert [(c.caption, c.source) for c in ranked] == [("bird", "synthetic"), ("dog", "web"), ("cat", "synthetic")]


def test_rank_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 captions, 1 scores"):
        rank_captions(["a", "b"], [0.1], ["web", "web"])
    with pytest.raises(ValueError, match="k must be"):
        top_captions([], 0)


def test_caption_sample_json() -> None:
    meta = caption_sample({"key": "7", "captions": ["old"]}, "a web caption", ["s1", "s2", "s3"],
                          [0.25, 0.3, 0.1, 0.28], keep=2)
    assert meta["key"] == "7"
    assert meta["captions"] == ["s1", "s3"]  # the old list is replaced
    assert [c["caption"] for c in meta["ranked_captions"]] == ["s1", "s3", "a web caption", "s2"]
    assert meta["ranked_captions"][2] == {"caption": "a web caption", "score": 0.25, "source": "web"}
    json.dumps(meta)  # serialisable
    # without a web caption the scores are the synthetic captions' only
    assert caption_sample({}, "", ["x", "y"], [0.1, 0.2], keep=2)["captions"] == ["y", "x"]


def test_passthrough_sample_keeps_web_caption_only() -> None:
    meta = passthrough_sample({"key": "1"}, "web text", "cannot identify image file")
    assert meta["captions"] == ["web text"]
    assert meta["ranked_captions"] == [{"caption": "web text", "score": None, "source": "web"}]
    assert meta["capfilt_error"] == "cannot identify image file"
    assert passthrough_sample({}, "", "bad")["captions"] == []


def test_web_caption_from_txt_then_json() -> None:
    assert web_caption({"txt": b" A dog. ", "json": b'{"caption": "other"}'}) == "A dog."
    assert web_caption({"json": b'{"caption": "from json"}'}) == "from json"
    assert web_caption({"json": b"not json"}) == ""
    assert web_caption({"jpg": b""}) == ""


def test_assign_shards_partitions_by_rank() -> None:
    jobs = [ShardJob(f"/d/{i:05d}.tar", f"{i:05d}", 3) for i in (4, 0, 3, 1, 2)]
    shares = [[j.name for j in assign_shards(jobs, r, 2)] for r in range(2)]
    assert shares == [["00000", "00002", "00004"], ["00001", "00003"]]
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        assign_shards(jobs, 2, 2)


def test_output_names() -> None:
    assert output_name("/data/cc3m/00012.tar") == "00012"
    assert output_name("pipe:aws s3 cp s3://b/laion/00012.tar -") == "00012"
    assert output_name("s3://bucket/x/shard-3.tar") == "shard-3"
    with pytest.raises(ValueError, match="both write 00001.tar"):
        output_names(["/a/00001.tar", "/b/00001.tar"])
    with pytest.raises(ValueError, match="has no '.tar'"):
        output_name("/a/00001.zip")


def test_seeds_and_prompt() -> None:
    assert batch_seed(0, "00001", 2) == batch_seed(0, "00001", 2)
    assert len({batch_seed(0, "00001", 2), batch_seed(1, "00001", 2), batch_seed(0, "00002", 2),
                batch_seed(0, "00001", 3)}) == 4
    assert 0 <= batch_seed(5, "x", 0) < 2**63
    assert strip_prompt("A picture of a red circle ", "a picture of ") == "a red circle"
    assert strip_prompt("two dogs", "a picture of ") == "two dogs"
    assert strip_prompt(" two dogs", "") == "two dogs"
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="min_length 40 exceeds"):
        SamplingConfig(min_length=40)
