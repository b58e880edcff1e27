"""Shard locations: brace ranges, globs, pipe: commands, fsspec URLs, and setup errors naming the path."""

import json
import shutil
from pathlib import Path

import fsspec
import pytest

from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.shards import expand_urls, read_shards, stats_url


def _keys(dm: ShardDataModule) -> list[str]:
    return sorted(k.split("#")[1] for b in dm.train_dataloader() for k in b["key"])


def _dm(urls, **kw) -> ShardDataModule:
    dm = ShardDataModule(sources=[ShardSource(urls)], batch_size=10, num_workers=0, image_size=8, **kw)
    dm.setup("fit")
    return dm


def test_brace_ranges_and_globs(corpus) -> None:
    directory = Path(corpus.shards("train")).parent
    braces = expand_urls(str(directory / "{00001..00003}.tar"))
    assert [Path(u).name for u in braces] == ["00001.tar", "00002.tar", "00003.tar"]
    assert expand_urls(corpus.shards("train")) == [str(directory / f"{i:05d}.tar") for i in range(6)]
    assert [s.num_samples for s in read_shards(braces)] == [20, 20, 20]
    assert stats_url("pipe:aws s3 cp s3://b/x/00001.tar -") == "pipe:aws s3 cp s3://b/x/00001_stats.json -"


def test_pipe_and_fsspec_urls_read_the_same_samples(corpus) -> None:
    directory = Path(corpus.shards("train")).parent
    local = _keys(_dm(str(directory / "{00000..00001}.tar")))
    piped = _keys(_dm(f"pipe:cat {directory}/{{00000..00001}}.tar"))
    fs = fsspec.filesystem("memory")
    for name in ("00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"):
        fs.pipe(f"/shards/{name}", (directory / name).read_bytes())
    # fsspec's memory filesystem hands out one shared file object per path: read one stream at a time
    remote = _keys(_dm("memory://shards/{00000..00001}.tar", interleave=1))
    globbed = _keys(_dm("memory://shards/*.tar", interleave=1))
    through_fsspec = _keys(_dm(f"local://{directory}/{{00000..00001}}.tar"))
    assert len(local) == 40 and piped == local and remote == local and globbed == local and through_fsspec == local


def test_missing_shard_is_an_error_naming_it(corpus) -> None:
    directory = Path(corpus.shards("train")).parent
    with pytest.raises(FileNotFoundError, match="00009.tar"):
        _dm(str(directory / "{00004..00009}.tar"))


def test_empty_glob_is_an_error(corpus) -> None:
    pattern = str(Path(corpus.shards("train")).parent / "*.tgz")
    with pytest.raises(FileNotFoundError, match=r"\*\.tgz.*matches no file"):
        _dm(pattern)


def test_missing_or_unreadable_root_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/absent"):
        _dm(str(tmp_path / "absent" / "{00000..00003}.tar"))
    (tmp_path / "locked").mkdir()
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda p, mode: False if str(p).endswith("locked") else real_access(p, mode))
    with pytest.raises(PermissionError, match="locked.*not readable"):
        _dm(str(tmp_path / "locked" / "*.tar"))


def test_missing_or_bad_stats_file_is_an_error(corpus, tmp_path: Path) -> None:
    source = Path(corpus.shards("train")).parent
    shutil.copy(source / "00000.tar", tmp_path / "00000.tar")
    with pytest.raises(FileNotFoundError, match="00000_stats.json"):
        _dm(str(tmp_path / "00000.tar"))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 20}))
    with pytest.raises(ValueError, match="no integer 'successes'"):
        _dm(str(tmp_path / "00000.tar"))


def test_synthetic_corpus_is_generated_on_demand(tmp_path: Path) -> None:
    from qformer_lightning.data.synthetic import SyntheticCorpusConfig

    config = SyntheticCorpusConfig(root=str(tmp_path / "syn"), num_train=40, num_val=8, num_test=8,
                                   image_size=16, shard_size=20)
    dm = ShardDataModule(sources=[ShardSource(str(tmp_path / "syn/shards/train/*.tar"))], batch_size=8,
                         num_workers=0, image_size=8, synthetic=config)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_batches_per_epoch() == 5
