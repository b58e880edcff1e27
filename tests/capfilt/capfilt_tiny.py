"""Constants and shard helpers shared by the CapFilt tests."""

from __future__ import annotations

import tarfile
from pathlib import Path

from qformer_lightning.capfilt import SamplingConfig
from qformer_lightning.data import shards

IMAGE = 32
TINY_SAMPLING = SamplingConfig(num_captions=3, max_length=12, min_length=8)

# A WordPiece vocabulary of the synthetic corpus' words: a 64-token LM head keeps sampling cheap.
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a an the of picture there is are that at on in top bottom left right center one two three small large "
    "red green blue yellow purple orange circle square triangle circles squares triangles . , ' dog cat"
).split()


def tiny_tokenizer(blip: bool = False):
    """A lower-casing BERT tokenizer over :data:`WORDS`; ``blip`` adds BLIP's [DEC] (bos) and [ENC]."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(SPECIALS + WORDS)}, do_lower_case=True)
    if blip:
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def read_tar(path: str | Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar, in order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write an img2dataset-layout tar and its ``_stats.json``."""
    shards.write_shard(path, samples, {"count": len(samples), "failed_to_download": 0})
