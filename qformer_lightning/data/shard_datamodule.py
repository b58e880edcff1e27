"""LightningDataModule streaming the CapFilt pretraining corpus from webdataset shards."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch

from qformer_lightning.data.base import ReplacementCounting
from qformer_lightning.data.image import CLIP_MEAN, CLIP_STD, ImageTransform
from qformer_lightning.data.plan import num_batches, rank_share, source_quota
from qformer_lightning.data.shard_index import read_shards_indexed
from qformer_lightning.data.shards import Shard
from qformer_lightning.data.stream import CaptionDecoder, ResumableShardLoader, ShardLoader, ShardStream
from qformer_lightning.data.synthetic import SyntheticCorpusConfig

log = logging.getLogger(__name__)


@dataclass
class ShardSource:
    """One dataset of the corpus (COCO, VG, CC3M, CC12M, SBU, LAION, ...).

    Args:
        urls: shard URL pattern(s): paths, globs, brace ranges, fsspec URLs or ``pipe:`` commands.
        weight: samples per epoch as a multiple of the source's size (1.0 = each sample once,
            2.0 = twice, 0.5 = a random half, a different half each epoch). The share of the
            source in the mix is ``weight * size / sum(weight * size)``.
        name: the source's name; sample ``image_id`` s are derived from (name, key). Defaults to
            ``source{index}``.
    """

    urls: str | list[str]
    weight: float = 1.0
    name: str = ""


class ShardDataModule(ReplacementCounting):
    """Image-text pretraining batches streamed from img2dataset shards, exactly resumable.

    Training batches mix all ``sources`` by weight, shuffle shards and samples per epoch from
    ``seed``, pick one of each sample's top ``caption_top_k`` captions at random (BLIP-2 CapFilt),
    clean it (BLIP ``pre_caption``) and augment the image (RandomResizedCrop + flip). Each rank
    gets the same number of full batches; ranks and workers read disjoint samples. The training
    loader's state (Lightning saves it in checkpoints) resumes on exactly the next batch.

    Batches: see ``qformer_lightning.data.batch`` (``image``, ``text``, ``image_id``, ``key``,
    ``num_replaced``, ``replaced``). :meth:`replaced_counts` holds this rank's running count of
    replaced bad samples per reason (saved in checkpoints).

    Args:
        sources: training shard sources.
        val_sources: validation shard sources (read in file order, eval transform, no shuffle).
        batch_size: training samples per batch and rank.
        val_batch_size: validation batch size (default ``batch_size``).
        num_workers: data-loader workers per rank (resume needs the same number).
        seed: shuffling and augmentation seed.
        image_size: image side S fed to the encoder.
        mean, std: the encoder's normalisation (OpenAI CLIP's by default, as EVA-CLIP).
        crop_scale: RandomResizedCrop area range.
        hflip: random horizontal flip in training (BLIP-2: on).
        hflip_swaps_text: swap "left"/"right" in the caption of a flipped image (spatial captions,
            e.g. the synthetic corpus); otherwise turn ``hflip`` off for such captions.
        max_words: captions are cut to this many words (BLIP: 30 for pretraining).
        caption_key: field of the sample ``.json`` holding the caption list (CapFilt); samples
            without it use their ``.txt``.
        caption_top_k: captions sampled from (the first k of the list).
        interleave: shards each worker reads concurrently (mixes shards within a batch).
        shuffle_block: samples shuffled together per worker (also its read-ahead, in samples).
        max_image_pixels: larger images are replaced (after JPEG draft reduction).
        pin_memory: pin batches; default: when CUDA is available.
        prefetch_factor: batches prefetched per worker.
        synthetic: generate the synthetic corpus here in ``prepare_data`` if it is missing
            (point ``sources`` at its shards, e.g. ``{root}/shards/train/*.tar``).
        on_layout_change: what a resume does when the data layout (shards and their sample
            counts, weights, shuffling, seeds, batch size, world size, workers) differs from the
            checkpoint's: ``"error"`` (default; the error names every changed field) or
            ``"fresh_epoch"`` (for a corpus changed on purpose: log the changes and start a fresh
            data epoch at the saved step).
        shard_index: a JSON index of the shards' sample counts, so that a restart reads no stats
            file again (``qformer_lightning.data.shard_index``): a path, ``True`` (default:
            ``shard_index.json`` in the trainer's ``default_root_dir``, beside the checkpoints;
            none without a trainer) or ``False`` (read every stats file at each start-up).
    """

    def __init__(
        self,
        sources: list[ShardSource],
        val_sources: list[ShardSource] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        image_size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        hflip_swaps_text: bool = False,
        max_words: int = 30,
        caption_key: str = "captions",
        caption_top_k: int = 2,
        interleave: int = 4,
        shuffle_block: int = 1000,
        max_image_pixels: int = 64_000_000,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        synthetic: SyntheticCorpusConfig | None = None,
        on_layout_change: Literal["error", "fresh_epoch"] = "error",
        shard_index: str | bool = True,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("ShardDataModule needs at least one source")
        self.sources = [ShardSource(**s) if isinstance(s, dict) else s for s in sources]
        self.val_sources = [ShardSource(**s) if isinstance(s, dict) else s for s in (val_sources or [])]
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_scale = tuple(crop_scale)
        self.hflip, self.hflip_swaps_text = hflip, hflip_swaps_text
        self.max_words = max_words
        self.caption_key, self.caption_top_k = caption_key, caption_top_k
        self.interleave, self.shuffle_block = interleave, shuffle_block
        self.max_image_pixels = max_image_pixels
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.synthetic = synthetic
        self.on_layout_change = on_layout_change
        self.shard_index = shard_index
        self._train: list[list[Shard]] | None = None
        self._val: list[list[Shard]] | None = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            self.synthetic.make()

    def shard_index_path(self) -> str | None:
        """Where the shard index is read and written (see ``shard_index``), or ``None``."""
        if isinstance(self.shard_index, str):
            return self.shard_index
        if not self.shard_index or self.trainer is None:
            return None
        return os.path.join(self.trainer.default_root_dir, "shard_index.json")

    def _read_shards(self, source: ShardSource) -> list[Shard]:
        """A source's shards and sample counts (stats files not in the index read concurrently;
        rank 0 updates the index)."""
        write = self.trainer is None or self.trainer.is_global_zero
        return read_shards_indexed(source.urls, self.shard_index_path(), write=write)

    def setup(self, stage: str | None = None) -> None:
        """Expand the URLs and get every shard's sample count (clear errors for missing data)."""
        if self._train is None:
            self._train = [self._read_shards(s) for s in self.sources]
            for source, shards in zip(self.sources, self._train):
                log.info("shard source %s: %d shards, %d samples", source.name or source.urls,
                         len(shards), sum(s.num_samples for s in shards))
        if self._val is None and self.val_sources:
            self._val = [self._read_shards(s) for s in self.val_sources]

    @staticmethod
    def _names(sources: list[ShardSource]) -> list[str]:
        return [s.name or f"source{i}" for i, s in enumerate(sources)]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _decoder(self, train: bool) -> CaptionDecoder:
        transform = ImageTransform(
            self.image_size, train, self.crop_scale, self.max_image_pixels, self.hflip, self.hflip_swaps_text
        )
        return CaptionDecoder(transform, self.max_words, self.caption_key, self.caption_top_k)

    def train_dataset(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The training stream of ``rank`` of ``world_size`` (after :meth:`setup`)."""
        if self._train is None:
            self.setup("fit")
        quotas = [source_quota(shards, s.weight) for shards, s in zip(self._train, self.sources)]
        return ShardStream(
            self._train, quotas, self._names(self.sources), self._decoder(True), self.batch_size,
            self.mean, self.std, self.seed, shuffle=True, drop_last=True, interleave=self.interleave,
            shuffle_block=self.shuffle_block, rank=rank, world_size=world_size, num_workers=self.num_workers,
        )

    def num_batches_per_epoch(self, world_size: int = 1) -> int:
        """Training batches per rank per epoch, from the stats files (use for schedules)."""
        if self._train is None:
            self.setup("fit")
        total = sum(source_quota(shards, s.weight) for shards, s in zip(self._train, self.sources))
        return num_batches(rank_share(total, world_size, self.batch_size, True), self.batch_size)

    def train_dataloader(self) -> ResumableShardLoader:
        """The resumable training loader; a loader rebuilt mid-fit (``reload_dataloaders_every_n_epochs``)
        continues at the trainer's epoch (a checkpoint's loader state, loaded after this, wins)."""
        rank, world = self._rank_world()
        loader = ResumableShardLoader(
            self.train_dataset(rank, world), self.pin_memory, self.prefetch_factor,
            weights=[s.weight for s in self.sources], on_layout_change=self.on_layout_change,
        )
        if self.trainer is not None:
            loader.epoch = self.trainer.current_epoch - 1  # the next iter() starts current_epoch
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        if not self.val_sources:
            return []
        if self._val is None:
            self.setup("validate")
        rank, world = self._rank_world()
        quotas = [source_quota(shards, 1.0) for shards in self._val]
        stream = ShardStream(
            self._val, quotas, self._names(self.val_sources), self._decoder(False), self.val_batch_size,
            self.mean, self.std, self.seed, shuffle=False, drop_last=False, rank=rank, world_size=world,
            num_workers=self.num_workers,
        )
        return ShardLoader(stream, self.pin_memory, self.prefetch_factor)
