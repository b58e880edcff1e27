"""The CapFilt run: re-caption input shards into output shards, restartable, split across ranks.

For every sample: sample ``num_captions`` captions from the captioner, score them and the web
caption with CLIP, rank them, and write the sample again with the same key and members, its
``.json`` extended by

- ``captions``: the top ``keep`` captions (what ``ShardDataModule`` trains on, one drawn per step),
- ``ranked_captions``: every distinct candidate as ``{"caption", "score", "source"}``, best first.

An unreadable image passes through with ``captions = [web caption]`` (``[]`` without one),
``ranked_captions`` holding the web caption with score ``None``, and ``capfilt_error`` saying
why; it is counted. Each output ``_stats.json`` holds the input stats, ``successes`` and a
``capfilt`` entry (models, sampling, counts).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from qformer_lightning.capfilt.batches import ImagePreprocessor, ShardBatches, ShardJob
from qformer_lightning.capfilt.captioner import DEFAULT_CAPTIONER, Captioner, SamplingConfig, batch_seed
from qformer_lightning.capfilt.ranking import SYNTHETIC, WEB, ScoredCaption, rank_captions, top_captions
from qformer_lightning.capfilt.scorer import DEFAULT_CLIP, ClipScorer
from qformer_lightning.capfilt.shardio import ShardWriter, is_done, output_names, remove_stale
from qformer_lightning.data.shards import open_url, read_shards, stats_url

log = logging.getLogger(__name__)


@dataclass
class CapfiltSummary:
    """Counts of one rank's run (add them over ranks for the whole run)."""

    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    unreadable: int = 0
    truncated_shards: int = 0
    written: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"capfilt: {self.shards_written} shards written, {self.shards_skipped} already done, "
            f"{self.images} images, {self.unreadable} unreadable (passed through with their web caption), "
            f"{self.truncated_shards} truncated input shards"
        )


def assign_shards(jobs: Sequence[ShardJob], rank: int, world_size: int) -> list[ShardJob]:
    """This rank's share: jobs ``rank, rank + world_size, ...`` of the sorted-by-name list."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return sorted(jobs, key=lambda j: j.name)[rank::world_size]


def caption_sample(
    meta: dict, web: str, synthetic: Sequence[str], scores: Sequence[float], keep: int
) -> dict:
    """``meta`` extended with ``captions`` (top ``keep``) and ``ranked_captions``.

    ``scores``: one per candidate, the web caption's first when ``web`` is non-empty.
    """
    texts = ([web] if web else []) + list(synthetic)
    sources = ([WEB] if web else []) + [SYNTHETIC] * len(synthetic)
    ranked = rank_captions(texts, scores, sources)
    return {**meta, "captions": top_captions(ranked, keep), "ranked_captions": [c.to_json() for c in ranked]}


def passthrough_sample(meta: dict, web: str, error: str) -> dict:
    """``meta`` of an unreadable image: its web caption only, and why it was not captioned."""
    ranked = [ScoredCaption(web, None, WEB).to_json()] if web else []
    return {**meta, "captions": [web] if web else [], "ranked_captions": ranked, "capfilt_error": error}


def _meta(members: dict[str, bytes]) -> dict:
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _input_stats(url: str) -> dict:
    try:
        with open_url(stats_url(url)) as f:
            stats = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return stats if isinstance(stats, dict) else {}


class CapFilt:
    """Re-captions shards with a captioner and a CLIP scorer.

    Args:
        captioner: samples the synthetic captions.
        scorer: ranks candidates by image-text similarity.
        preprocess: images -> captioner and CLIP pixels (run in the loader workers).
        keep: captions kept for training (BLIP-2: 2).
        batch_size: images per generation batch.
        num_workers: data-loader workers decoding images.
        seed: sampling seed; batch b of shard NAME samples with ``batch_seed(seed, NAME, b)``,
            so a shard's output does not depend on the rank, worker or restart that wrote it
            (it does depend on ``batch_size``).
        max_image_pixels: larger images count as unreadable.
        description: written into every output ``_stats.json`` under ``capfilt`` (models, sampling).
    """

    def __init__(
        self,
        captioner: Captioner,
        scorer: ClipScorer,
        preprocess: ImagePreprocessor,
        keep: int = 2,
        batch_size: int = 32,
        num_workers: int = 4,
        seed: int = 0,
        max_image_pixels: int = 64_000_000,
        description: dict | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.captioner, self.scorer, self.preprocess = captioner, scorer, preprocess
        self.keep, self.batch_size, self.num_workers = keep, batch_size, num_workers
        self.seed, self.max_image_pixels = seed, max_image_pixels
        self.description = {
            "keep": keep, "seed": seed, "batch_size": batch_size,
            "sampling": asdict(captioner.sampling), **(description or {}),
        }

    @classmethod
    def from_pretrained(
        cls,
        captioner: str = DEFAULT_CAPTIONER,
        clip: str = DEFAULT_CLIP,
        sampling: SamplingConfig = SamplingConfig(),
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> CapFilt:
        """Load both models and their image processors from hub ids or directories.

        ``kwargs`` go to the constructor (``keep``, ``batch_size``, ``num_workers``, ``seed``, ...).
        """
        from transformers import AutoImageProcessor

        preprocess = ImagePreprocessor(AutoImageProcessor.from_pretrained(captioner), AutoImageProcessor.from_pretrained(clip))
        description = {"captioner": captioner, "clip": clip, "dtype": str(dtype).removeprefix("torch.")}
        return cls(
            Captioner.from_pretrained(captioner, sampling, dtype, device),
            ClipScorer.from_pretrained(clip, dtype, device),
            preprocess,
            description=description,
            **kwargs,
        )

    def jobs(self, urls: str | Sequence[str]) -> list[ShardJob]:
        """All input shards with their output names and sample counts (from their stats files)."""
        shards = read_shards(urls)
        names = output_names([s.url for s in shards])
        return [ShardJob(s.url, name, s.num_samples) for s, name in zip(shards, names)]

    def run(
        self,
        urls: str | Sequence[str],
        out_dir: str | os.PathLike,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> CapfiltSummary:
        """Write this rank's share of the output shards that are not done yet; returns its counts."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        summary = CapfiltSummary()
        todo = []
        for job in assign_shards(self.jobs(urls), rank, world_size):
            if is_done(out_dir, job.name):
                summary.shards_skipped += 1
            else:
                for path in remove_stale(out_dir, job.name):
                    log.info("removed %s left by an interrupted run", path)
                todo.append(job)
        if summary.shards_skipped:
            log.info("rank %d: %d shards already done, %d to write", rank, summary.shards_skipped, len(todo))
        if not todo:
            return summary
        dataset = ShardBatches(todo, self.preprocess, self.batch_size, self.num_workers, self.max_image_pixels)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        writers: dict[int, ShardWriter] = {}
        unreadable: dict[int, int] = {}
        bar = tqdm(
            total=sum(j.num_samples for j in todo), unit="img", dynamic_ncols=True,
            disable=not progress, desc=f"capfilt rank {rank}",
        )
        try:
            for batch in loader:
                index = batch["shard"]
                job = todo[index]
                if index not in writers:
                    writers[index] = ShardWriter(out_dir, job.name)
                    unreadable[index] = 0
                unreadable[index] += self._write_batch(batch, job, writers[index])
                summary.images += len(batch["keys"])
                summary.unreadable += batch["readable"].count(False)
                if batch["last"]:
                    stats = {
                        **_input_stats(job.url),
                        "capfilt": {
                            **self.description, "input": job.url, "unreadable": unreadable[index],
                            "truncated": batch["truncated"],
                        },
                    }
                    writers[index].commit(stats)
                    del writers[index]
                    summary.shards_written += 1
                    summary.truncated_shards += batch["truncated"] is not None
                    summary.written.append(job.name)
                bar.update(len(batch["keys"]))
                bar.set_postfix(unreadable=summary.unreadable, shards=summary.shards_written, refresh=False)
        finally:
            bar.close()
            for writer in writers.values():
                writer.abort()
        log.info("rank %d: %s", rank, summary.line())
        return summary

    def _write_batch(self, batch: dict, job: ShardJob, writer: ShardWriter) -> int:
        """Caption, score and write one batch; returns its number of unreadable images."""
        readable: list[bool] = batch["readable"]
        good = [i for i, ok in enumerate(readable) if ok]
        synthetic = self.captioner.generate(batch["caption_pixels"], batch_seed(self.seed, job.name, batch["batch"]))
        candidates = [([batch["web"][i]] if batch["web"][i] else []) + [c for c in caps if c]
                      for i, caps in zip(good, synthetic)]
        scores = self.scorer.score(batch["clip_pixels"], candidates) if good else []
        by_sample = {i: (caps, s) for i, caps, s in zip(good, synthetic, scores)}
        for i, (key, members) in enumerate(zip(batch["keys"], batch["members"])):
            web = batch["web"][i]
            if i in by_sample:
                caps, s = by_sample[i]
                meta = caption_sample(_meta(members), web, [c for c in caps if c], s, self.keep)
            else:
                meta = passthrough_sample(_meta(members), web, batch["errors"][i])
            out = dict(members)
            out["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            writer.add(key, out)
        return len(readable) - len(good)
