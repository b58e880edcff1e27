"""Seed mixing: the one place where a run seed and a position (step, batch, sample, shard) become a seed.

Every random draw that must repeat after a resume takes its seed from the position it is drawn at,
mixed here. Three mixes are in use; each keeps the exact numbers it has always given (exact-resume
tests and saved runs depend on them), so they are not merged into one:

- :func:`mix_seed` / :func:`mix_rng`: numpy's ``SeedSequence`` over the parts' 32-bit words
  (:func:`seed_words`), as a 63-bit seed (the training step's global generators,
  ``Blip2Task.step_seed``) or as a numpy Generator (shard and sample order, :mod:`~qformer_lightning.data.plan`).
- :func:`sequence_seed`: numpy's ``SeedSequence`` over the given non-negative integers as they are
  (stage 2's prefix/suffix split points, ``split_seed``).
- :func:`splitmix_seed`: splitmix64 steps, in pure Python (per-sample augmentation in the data
  workers, :mod:`~qformer_lightning.data.stream`).
- :func:`digest_seed`: SHA-256 of the parts written out, for parts that are names (CapFilt's
  sampling seed of a shard's batch, ``capfilt.captioner.batch_seed``).
"""

from __future__ import annotations

from collections.abc import Sequence

import hashlib

import numpy as np

_WORD = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15

__all__ = ["digest_seed", "mix_rng", "mix_seed", "seed_words", "sequence_seed", "splitmix_seed"]


def seed_words(*parts: int) -> list[int]:
    """The 32-bit words of up to 64-bit integers: every part's low word, then every part's high word.

    Negative parts are taken modulo 2**64, so any int64 (a position, -1 for "none") is welcome.
    """
    return [p & _WORD for p in parts] + [p >> 32 & _WORD for p in parts]


def sequence_seed(entropy: Sequence[int]) -> int:
    """A 63-bit seed from numpy's ``SeedSequence(entropy)`` (two 32-bit words folded together).

    Args:
        entropy: non-negative integers, of any size (``SeedSequence`` splits them into words).
    """
    words = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers such as ``(seed, step, epoch, batch, rank)``: ``sequence_seed(seed_words(*parts))``."""
    return sequence_seed(seed_words(*parts))


def mix_rng(*parts: int) -> np.random.Generator:
    """A numpy Generator seeded from the same words as :func:`mix_seed` (``default_rng(seed_words(*parts))``)."""
    return np.random.default_rng(seed_words(*parts))


def splitmix_seed(*parts: int) -> int:
    """Mix integers (seed, epoch, position, ...) into one 64-bit seed (splitmix64 steps, one a part)."""
    x = _GOLDEN64
    for p in parts:
        x = (x ^ (p & _MASK64)) & _MASK64
        x = (x + _GOLDEN64) & _MASK64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        x = z ^ (z >> 31)
    return x


def digest_seed(*parts: int | str) -> int:
    """A 63-bit seed from the SHA-256 of the parts joined by ``/`` (names welcome: ``(seed, shard, batch)``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
