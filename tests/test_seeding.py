"""The seed mixes give the numbers the call sites gave before they moved into seeding.py (pinned)."""

from __future__ import annotations

from qformer_lightning.capfilt.captioner import batch_seed
from qformer_lightning.seeding import digest_seed, mix_rng, mix_seed, seed_words, sequence_seed, splitmix_seed
from qformer_lightning.tasks.stage2 import split_seed


def test_each_mix_gives_its_pinned_seeds() -> None:
    # values computed with the code as it stood in tasks/base.py, tasks/stage2.py, data/plan.py,
    # data/batch.py and capfilt/captioner.py before the move
    assert mix_seed(7, 120, 1, 3, 1) == 1996124010192498617  # Blip2Task.step_seed
    assert mix_seed(-1, 2**40) == 8384732480442924441
    assert mix_rng(7, 1, 4, 1).integers(0, 1000, 5).tolist() == [786, 181, 664, 908, 798]  # shard order
    assert split_seed(7, 0, 120, 3, 1) == sequence_seed([7, 0, 120, 3, 1]) == 5780043113605973676
    assert splitmix_seed(7, 1, -1, 42) == 1725730267272339584  # per-sample augmentation
    assert batch_seed(0, "00001", 2) == digest_seed(0, "00001", 2) == 1061967881742891134


def test_seed_words_put_low_words_first() -> None:
    assert seed_words(1, 2**32 + 5, -1) == [1, 5, 0xFFFFFFFF, 0, 1, 0xFFFFFFFF]
    assert 0 <= mix_seed(2**63 - 1, -(2**63)) < 2**63
