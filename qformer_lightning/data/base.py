"""What every data module shares: counting the bad samples that were replaced."""

from __future__ import annotations

from collections import Counter

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from qformer_lightning.data.batch import accumulate_replaced
from qformer_lightning.data.datasets import BatchCollate, _ImageDataset


class ReplacementCounting(pl.LightningDataModule):
    """Adds a running per-reason count of replaced samples (this rank; saved in checkpoints).

    Each batch carries its own ``num_replaced`` / ``replaced``; this base sums them on the
    device side (``on_after_batch_transfer``) so a task can log :meth:`replaced_counts`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._replaced: Counter = Counter()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        accumulate_replaced(self._replaced, batch)
        return batch

    def replaced_counts(self) -> dict[str, int]:
        """Replaced bad samples per reason seen by this rank so far."""
        return dict(self._replaced)

    def state_dict(self) -> dict:
        return {"replaced": dict(self._replaced)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._replaced = Counter(state_dict.get("replaced", {}))


def annotation_loader(
    dataset: _ImageDataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pin_memory: bool,
) -> DataLoader:
    """A DataLoader over a map-style annotation dataset with the shared batch layout.

    Lightning adds a DistributedSampler under DDP (padding the last eval batches with repeats).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=BatchCollate(dataset, mean, std),
        pin_memory=pin_memory,
        persistent_workers=False,
    )
