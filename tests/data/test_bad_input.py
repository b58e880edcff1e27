"""Bad input: each kind of bad sample is replaced deterministically and counted; bad locations
are clear errors at setup; odd-but-valid images decode to the right colours."""

import io
from collections import Counter
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qformer_lightning.data.image import BadSample, ImageTransform
from qformer_lightning.data.shard_datamodule import ShardDataModule, ShardSource
from qformer_lightning.data.shards import write_shard


def _encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _good_jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)))


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], claimed: int | None = None) -> None:
    write_shard(path, samples, None if claimed is None else {"successes": claimed})


def _good(i: int) -> tuple[str, dict[str, bytes]]:
    return f"{i:04d}", {"jpg": _good_jpeg(i), "txt": f"Caption {i}.".encode()}


BAD = {  # key -> (members, reason)
    "bad-corrupt": ({"jpg": b"this is not a jpeg", "txt": b"x"}, "bad_image"),
    "bad-truncjpg": ({"jpg": _good_jpeg(99, 64)[:300], "txt": b"x"}, "bad_image"),
    "bad-nocaption": ({"jpg": _good_jpeg(98)}, "missing_caption"),
    "bad-emptycaption": ({"jpg": _good_jpeg(97), "txt": b" ... "}, "empty_caption"),
    "bad-latin1": ({"jpg": _good_jpeg(96), "txt": "caf\xe9".encode("latin-1")}, "non_utf8_caption"),
    "bad-json": ({"jpg": _good_jpeg(95), "json": b"{not json", "txt": b"x"}, "bad_json"),
    "bad-noimage": ({"txt": b"a caption"}, "missing_image"),
    "bad-huge": ({"png": _encode(Image.new("RGB", (300, 300)), "PNG"), "txt": b"x"}, "image_too_large"),
}


@pytest.fixture
def bad_shard(tmp_path: Path) -> Path:
    """24 samples in file order: good, bad, good, bad, ... then good ones (keys sort in file order)."""
    samples = []
    bad = list(BAD.items())
    for i in range(24):
        if i % 2 == 1 and i // 2 < len(bad):
            key, (members, _) = bad[i // 2]
            samples.append((f"{i:04d}-{key}", members))
        else:
            samples.append(_good(i))
    _write_shard(tmp_path / "00000.tar", samples)
    return tmp_path / "00000.tar"


def _dm(urls: str, **kw) -> ShardDataModule:
    args = dict(sources=[ShardSource(urls)], val_sources=[ShardSource(urls)], batch_size=4, num_workers=0,
                image_size=16, max_image_pixels=200 * 200, interleave=2, shuffle_block=8)
    args.update(kw)
    dm = ShardDataModule(**args)
    dm.setup("fit")
    return dm


def test_each_bad_sample_is_replaced_by_the_next_good_one(bad_shard: Path) -> None:
    batches = list(_dm(str(bad_shard)).val_dataloader())  # file order
    assert len(batches) == 6 and all(len(b["key"]) == 4 for b in batches)
    keys = [k.split("#")[1] for b in batches for k in b["key"]]
    # slot 2k+1 (bad) takes slot 2k+2's sample; the last slot of a batch wraps to the batch's first
    expected = []
    for i in range(24):
        if i % 2 == 1 and i // 2 < len(BAD):
            j = i + 1 if (i + 1) % 4 else i - 3
            expected.append(f"{j:04d}")
        else:
            expected.append(f"{i:04d}")
    assert keys == expected
    total: dict[str, int] = {}
    for b in batches:
        assert b["num_replaced"] == sum(b["replaced"].values())
        for reason, n in b["replaced"].items():
            total[reason] = total.get(reason, 0) + n
    assert total == dict(Counter(reason for _, reason in BAD.values()))


def test_bad_samples_keep_training_counts_and_resume_exact(bad_shard: Path) -> None:
    dm = _dm(str(bad_shard))
    loader = dm.train_dataloader()
    epoch = list(loader)
    assert len(epoch) == 6 and sum(b["num_replaced"] for b in epoch) == len(BAD)
    resumed = _dm(str(bad_shard)).train_dataloader()
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "batches": 2})
    again = list(resumed)
    assert [b["key"] for b in again] == [b["key"] for b in epoch[2:]]
    assert [b["replaced"] for b in again] == [b["replaced"] for b in epoch[2:]]


def test_replacement_counts_reach_the_datamodule(bad_shard: Path) -> None:
    dm = _dm(str(bad_shard))
    for batch in dm.val_dataloader():
        dm.on_after_batch_transfer(batch, 0)
    assert dm.replaced_counts() == dict(Counter(reason for _, reason in BAD.values()))
    restored = _dm(str(bad_shard))
    restored.load_state_dict(dm.state_dict())
    assert restored.replaced_counts() == dm.replaced_counts()


def test_truncated_tar_is_replaced_sample_by_sample(tmp_path: Path) -> None:
    _write_shard(tmp_path / "00000.tar", [_good(i) for i in range(20)])
    _write_shard(tmp_path / "00001.tar", [_good(100 + i) for i in range(20)])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])  # stats still say 20
    dm = _dm(str(tmp_path / "{00000..00001}.tar"), batch_size=5)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batches = list(loader)
        assert len(batches) == 8
        lost = sum(b["replaced"].get("truncated_shard", 0) for b in batches)
        assert 8 <= lost <= 11  # about half of shard 1 (the sample cut in two included)
        keys = {k for b in batches for k in b["key"]}
        assert {f"{tmp_path}/00000.tar#{i:04d}" for i in range(20)} <= keys


def test_a_batch_with_no_good_sample_takes_the_spare(tmp_path: Path) -> None:
    _write_shard(tmp_path / "00000.tar", [_good(0), _good(1)] + [(f"{i:04d}", {"txt": b"x"}) for i in range(2, 6)])
    dm = _dm(str(tmp_path / "00000.tar"), batch_size=2, val_batch_size=2)
    batches = list(dm.val_dataloader())
    assert [b["num_replaced"] for b in batches] == [0, 2, 2]
    spare_key = f"{tmp_path}/00000.tar#0000"  # the first decodable sample of the epoch
    assert batches[1]["key"] == batches[2]["key"] == [spare_key, spare_key]


def _rgb(img: Image.Image, fmt: str) -> np.ndarray:
    return ImageTransform(8, train=False)(_encode(img, fmt)).reshape(-1, 3)


def test_image_modes_convert_to_rgb() -> None:
    assert np.abs(_rgb(Image.new("L", (20, 20), 100), "PNG") - 100).max() == 0
    cmyk = _rgb(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG")  # red in CMYK
    assert np.abs(cmyk.astype(int) - [255, 0, 0]).max() <= 3
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 20, 10))  # top half fully transparent -> white
    out = _rgb(rgba, "PNG").reshape(8, 8, 3)
    assert (out[0] == [255, 255, 255]).all() and (out[-1] == [0, 0, 255]).all()
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (np.abs(_rgb(palette, "PNG").astype(int) - [10, 200, 30]) <= 1).all()
    sixteen = Image.fromarray(np.full((20, 20), 257 * 40, dtype=np.uint16))
    assert (_rgb(sixteen, "PNG") == 40).all()


def test_very_large_jpeg_decodes_reduced_png_is_rejected() -> None:
    big = Image.new("RGB", (4000, 3000), (20, 120, 220))
    data = _encode(big)
    out = ImageTransform(32, train=True, max_image_pixels=1_000_000)(data, random.Random(0))
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - [20, 120, 220]).max() <= 3
    with pytest.raises(BadSample) as err:
        ImageTransform(32, train=False, max_image_pixels=10_000)(_encode(Image.new("RGB", (200, 200)), "PNG"))
    assert err.value.reason == "image_too_large"


def test_train_transform_is_a_function_of_the_rng() -> None:
    data = _good_jpeg(5, 64)
    t = ImageTransform(16, train=True)
    assert np.array_equal(t(data, random.Random(7)), t(data, random.Random(7)))
    assert not np.array_equal(t(data, random.Random(7)), t(data, random.Random(8)))
