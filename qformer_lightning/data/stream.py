"""Streaming image-text batches from img2dataset shards, with exact mid-epoch resume.

:class:`ShardStream` is an ``IterableDataset`` that yields whole batches (dicts, see
``qformer_lightning.data.batch``): each data-loader worker computes its share of the epoch from
``qformer_lightning.data.plan`` and reads only the shards of that share. Its position, (epoch,
batches already consumed by this rank), is set by the loader before each ``iter()``.

:class:`ResumableShardLoader` is what the data module hands to Lightning: sized (``__len__`` =
batches per rank per epoch), it advances the epoch when an iteration yields its first batch
(so Lightning's iterability check, an ``iter()`` never advanced, changes nothing), and its
``state_dict()`` is the global position ``{"epoch", "batches"}`` (plus the data-layout
fingerprint it is valid for, :func:`layout_fingerprint`), the same on every rank, so the rank-0 state that Lightning saves restores every rank.
After skipping S batches, physical worker w acts as logical worker ``(w + S) mod W``, because
PyTorch's round-robin over workers restarts at worker 0.

Sample-level randomness (caption choice, crop, flip) is seeded by (seed, epoch, global position)
and so does not depend on the number of ranks or workers. The order of samples does: resuming
requires the same data layout (checked, with an error naming each changed field).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qformer_lightning.data.batch import Failed, ReplacementLog, Sample, assemble_batch, normalize_batch, stable_id
from qformer_lightning.data.image import BadSample, ImageTransform
from qformer_lightning.data.plan import Task, WorkerPlan, epoch_tasks, num_batches, rank_share, worker_plan
from qformer_lightning.data.shards import Shard, TruncatedAt, _is_remote, iter_tar_samples, open_url
from qformer_lightning.data.text import pre_caption
from qformer_lightning.seeding import splitmix_seed

log = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class CaptionDecoder:
    """A shard sample's members -> (image (S, S, 3) uint8, cleaned caption); raises ``BadSample``.

    The caption candidates are the first ``caption_top_k`` entries of the list (or string) under
    ``caption_key`` in the sample's ``.json`` (CapFilt: the two best of BLIP's synthetic captions
    and the web caption); without that field, the ``.txt`` member. Candidates that are empty after
    cleanup are dropped; one of the rest is drawn with ``rng``. A flipped image gets its caption's
    left/right swapped when the transform says so (``ImageTransform.hflip_swaps_text``).
    """

    transform: ImageTransform
    max_words: int = 30
    caption_key: str = "captions"
    caption_top_k: int = 2

    def captions(self, members: dict[str, bytes]) -> list[str]:
        """Raw caption candidates of a sample."""
        if self.caption_key and "json" in members:
            try:
                meta = json.loads(members["json"])
            except UnicodeDecodeError as err:
                raise BadSample("non_utf8_caption", f".json is not UTF-8: {err}") from err
            except ValueError as err:
                raise BadSample("bad_json", str(err)) from err
            value = meta.get(self.caption_key) if isinstance(meta, dict) else None
            if isinstance(value, str):
                value = [value]
            if isinstance(value, list) and value:
                return [c for c in value[: self.caption_top_k] if isinstance(c, str)]
        if "txt" in members:
            try:
                return [members["txt"].decode("utf-8")]
            except UnicodeDecodeError as err:
                raise BadSample("non_utf8_caption", f".txt is not UTF-8: {err}") from err
        raise BadSample("missing_caption", f"no .txt and no {self.caption_key!r} in .json (members {sorted(members)})")

    def __call__(self, members: dict[str, bytes], rng: random.Random) -> tuple[np.ndarray, str]:
        data = next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
        if data is None:
            raise BadSample("missing_image", f"no image member among {sorted(members)}")
        cleaned = [c for c in (pre_caption(c, self.max_words) for c in self.captions(members)) if c]
        if not cleaned:
            raise BadSample("empty_caption", "caption empty after cleanup")
        text = cleaned[int(rng.random() * len(cleaned))]
        return self.transform.with_caption(data, text, rng)


class _TarStream:
    """Forward-only reader of one shard from a given ordinal; remembers where it broke. With
    ``expected`` (the stats count), samples past it are not read but reported (``iter_tar_samples``)."""

    def __init__(self, url: str, start: int, expected: int | None = None) -> None:
        self.url = url
        self.file = open_url(url)
        seekable = not url.startswith("pipe:") and not _is_remote(url)
        self.samples = iter_tar_samples(self.file, start, seekable=seekable, expected=expected, url=url)
        self.last = start - 1
        self.broken_at: int | None = None
        self.detail = ""

    def next(self) -> tuple[int, str, dict[str, bytes]] | None:
        """The next sample, or ``None`` once the tar has ended or broken (``broken_at`` set)."""
        if self.broken_at is not None:
            return None
        item = next(self.samples, None)
        if item is None or isinstance(item, TruncatedAt):
            self.broken_at = self.last + 1 if item is None else max(item.ordinal, self.last + 1)
            self.detail = "the tar ended" if item is None else item.detail
            return None
        self.last = item[0]
        return item

    def close(self) -> None:
        self.file.close()


class ShardStream(IterableDataset):
    """Batches of (image, caption) from weighted shard sources; see the module docstring.

    Args:
        sources: per source, its shards with sample counts.
        quotas: per source, samples per epoch (``plan.source_quota``).
        names: per source, a name (part of ``image_id``: ids are stable per (name, key)).
        decoder: sample members -> (image, caption).
        batch_size: samples per batch (B).
        mean, std: image normalisation.
        seed: run seed.
        shuffle: shuffle shards and samples, interleave shards (train) or keep file order (eval).
        drop_last: equal full batches on every rank (train) or a short last batch (eval).
        interleave: shards read concurrently per worker (lanes) when shuffling.
        shuffle_block: samples permuted together per worker when shuffling (read-ahead buffer).
        rank, world_size: this process's rank and the number of ranks.
        num_workers: data-loader workers (0 = in the main process).
    """

    def __init__(
        self,
        sources: list[list[Shard]],
        quotas: list[int],
        names: list[str],
        decoder: CaptionDecoder,
        batch_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        interleave: int = 4,
        shuffle_block: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        if not (len(sources) == len(quotas) == len(names)):
            raise ValueError("sources, quotas and names must have the same length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sources, self.quotas, self.names = sources, quotas, names
        self.decoder = decoder
        self.batch_size, self.mean, self.std, self.seed = batch_size, mean, std, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.interleave, self.shuffle_block = interleave, shuffle_block
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.total = sum(quotas)
        self.epoch = 0
        self.skip = 0
        self.replacement_log = ReplacementLog()
        self.defer_normalise = False  # set by ShardLoader when workers send uint8 batches
        if len(self) == 0:
            raise ValueError(
                f"an epoch of {self.total} samples gives no batch of {batch_size} per rank on "
                f"{world_size} rank(s); use more data or a smaller batch"
            )

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        return num_batches(rank_share(self.total, self.world_size, self.batch_size, self.drop_last), self.batch_size)

    def set_position(self, epoch: int, skip: int) -> None:
        """Start the next iteration in ``epoch`` after this rank's first ``skip`` batches."""
        if not 0 <= skip <= len(self):
            raise ValueError(f"cannot skip {skip} batches of an epoch of {len(self)}")
        self.epoch, self.skip = epoch, skip

    def tasks(self, epoch: int) -> list[Task]:
        """The epoch's tasks (see ``plan.epoch_tasks``)."""
        return epoch_tasks(self.sources, self.quotas, self.seed, epoch, self.shuffle)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = max(1, self.num_workers)
        physical = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != workers:
            raise RuntimeError(
                f"ShardStream was built for {self.num_workers} workers but runs in "
                f"{0 if info is None else info.num_workers}; build the loader with the same num_workers"
            )
        logical = (physical + self.skip) % workers
        tasks = self.tasks(self.epoch)
        plan = worker_plan(
            tasks, self.rank, self.world_size, logical, workers, self.batch_size, self.drop_last,
            self.shuffle, self.interleave, self.shuffle_block, self.seed, self.epoch,
        )
        done = len(range(logical, self.skip, workers))  # this worker's batches among the skipped
        raw = self._read(tasks, plan, plan.items_before(done))
        spare: list[Sample] = []

        def get_spare() -> Sample:
            if not spare:
                spare.append(self._spare(tasks))
            return spare[0]

        for size in plan.batch_sizes(done):
            items = [self._decode(task, item, position) for position, task, item in itertools.islice(raw, size)]
            if len(items) != size:
                raise RuntimeError(f"internal error: the worker's plan ran out after {len(items)} of {size} samples")
            yield assemble_batch(items, self.mean, self.std, get_spare, self.replacement_log, not self.defer_normalise)

    def _url(self, task: Task) -> str:
        return self.sources[task.source][task.shard].url

    def _decode(self, task: Task, item: tuple[str, dict[str, bytes]] | Failed, position: int) -> Sample | Failed:
        if isinstance(item, Failed):
            return item
        key, members = item
        full_key = f"{self._url(task)}#{key}"
        rng = random.Random(splitmix_seed(self.seed, self.epoch, position))
        try:
            image, text = self.decoder(members, rng)
        except BadSample as err:
            return Failed(full_key, err)
        return Sample(image, text, stable_id(f"{self.names[task.source]}/{key}"), full_key)

    def _read(
        self, tasks: list[Task], plan: WorkerPlan, first: int
    ) -> Iterator[tuple[int, Task, tuple[str, dict[str, bytes]] | Failed]]:
        """Yield ``(position, task, (key, members) or Failed)`` for the plan's items ``first ..``.

        A reader stream is one (lane, task) pair, opened at its first needed ordinal and closed
        after the block holding its last item. Items are read block by block (``plan.block_at``);
        an item read ahead of its turn waits in a buffer until it is due, which never takes more
        than one block.
        """
        streams: dict[tuple[int, int], _TarStream] = {}
        try:
            index = first
            while index < plan.count:
                block = plan.block_at(index)
                a = index - block.index
                keys = list(zip(block.lanes[a:].tolist(), block.tasks[a:].tolist()))
                ordinals = block.ordinals[a:].tolist()
                needed = set(zip(keys, ordinals))
                first_needed: dict[tuple[int, int], int] = {}
                for key, o in zip(keys, ordinals):
                    first_needed[key] = min(o, first_needed.get(key, o))
                buffer: dict[tuple[tuple[int, int], int], tuple[str, dict[str, bytes]] | Failed] = {}
                for key, o, position in zip(keys, ordinals, block.positions[a:].tolist()):
                    task = tasks[key[1]]
                    if (key, o) not in buffer:
                        if key not in streams:
                            shard = self.sources[task.source][task.shard]
                            streams[key] = _TarStream(shard.url, first_needed[key], shard.num_samples)
                        self._fill(streams[key], key, o, needed, buffer, task)
                    yield position, task, buffer.pop((key, o))
                ended = zip(block.lanes[block.stream_ends].tolist(), block.tasks[block.stream_ends].tolist())
                for key in ended:
                    if key in streams:
                        streams.pop(key).close()
                index = block.index + len(block.positions)
        finally:
            for stream in streams.values():
                stream.close()

    def _fill(
        self,
        stream: _TarStream,
        s: tuple[int, int],
        target: int,
        needed: set[tuple[int, int]],
        buffer: dict,
        task: Task,
    ) -> None:
        """Read ``stream`` forward until ordinal ``target`` is in ``buffer``."""
        while True:
            if stream.broken_at is not None and target >= stream.broken_at:
                shard = self.sources[task.source][task.shard]
                buffer[(s, target)] = Failed(
                    f"{stream.url}#{target}",
                    BadSample(
                        "truncated_shard",
                        f"{stream.detail} at sample {stream.broken_at}; its stats file says {shard.num_samples}",
                    ),
                )
                return
            item = stream.next()
            if item is None:
                if stream.broken_at is not None and target >= stream.broken_at:
                    log.warning(
                        "shard %s broke or ended at sample %d (%s); its stats file says %d samples: "
                        "the rest of it is replaced",
                        stream.url, stream.broken_at, stream.detail,
                        self.sources[task.source][task.shard].num_samples,
                    )
                    continue
                raise RuntimeError(f"internal error: sample {target} of {stream.url} was passed over")
            ordinal, key, members = item
            if (s, ordinal) in needed:
                buffer[(s, ordinal)] = (key, members)
            if ordinal == target:
                return
            if ordinal > target:
                raise RuntimeError(f"internal error: sample {target} of {stream.url} was passed over")

    def _spare(self, tasks: list[Task]) -> Sample:
        """A deterministic replacement for a batch without a single good sample: the first
        decodable sample of the epoch's tasks (tried for at most 1000 samples)."""
        tried = 0
        for task in tasks:
            url = self._url(task)
            with open_url(url) as f:
                seekable = not url.startswith("pipe:") and not _is_remote(url)
                for item in iter_tar_samples(f, task.start, seekable=seekable):
                    if isinstance(item, TruncatedAt):
                        break
                    ordinal, key, members = item
                    rng = random.Random(splitmix_seed(self.seed, self.epoch, -1, ordinal))
                    try:
                        image, text = self.decoder(members, rng)
                        return Sample(image, text, stable_id(f"{self.names[task.source]}/{key}"), f"{url}#{key}")
                    except BadSample:
                        tried += 1
                        if tried >= 1000:
                            raise RuntimeError(f"no decodable sample among the first {tried} of the epoch's shards")
        raise RuntimeError("no decodable sample in any shard of the epoch")


class ShardLoader:
    """A sized iterable of batches of a :class:`ShardStream` (one fixed epoch; for evaluation).

    Args:
        dataset: the stream; its ``num_workers`` is the loader's.
        pin_memory: pin batches (for CUDA).
        prefetch_factor: batches prefetched per worker.
    """

    def __init__(self, dataset: ShardStream, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self) -> DataLoader:
        workers = self.dataset.num_workers
        # worker processes send uint8 images (4x fewer bytes); the main process normalises them
        self.dataset.defer_normalise = workers > 0
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[dict]:
        """The epoch's batches. A generator: nothing starts (no worker, no position change) before
        the first ``next()``, because Lightning calls ``iter()`` once only to check iterability."""
        self.dataset.set_position(0, 0)
        yield from self._normalised(iter(self._loader()))

    def _normalised(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            yield normalize_batch(batch, self.dataset.mean, self.dataset.std)


#: Version of the epoch order (``plan.py``; 2: lanes of equal length +-1, one generator per shuffle
#: block); a checkpoint of another version cannot resume exactly.
PLAN_VERSION = 2

LAYOUT_CHANGES: tuple[str, ...] = ("error", "fresh_epoch")


def layout_fingerprint(stream: ShardStream, weights: Sequence[float] | None = None) -> dict[str, object]:
    """Everything the epoch order depends on, as ``{field: JSON-able value}``.

    Per source: its name, its shards (count, samples and a SHA-256 of the URL and sample count of
    every shard, in order), its weight and samples per epoch; then the shuffling settings, the data
    seed, ``seed_everything`` (Lightning's ``PL_GLOBAL_SEED``), batch size, world size, workers and
    the plan version.
    """
    out: dict[str, object] = {"plan_version": PLAN_VERSION, "num_sources": len(stream.sources)}
    for i, (shards, quota, name) in enumerate(zip(stream.sources, stream.quotas, stream.names)):
        digest = hashlib.sha256("".join(f"{s.url}\t{s.num_samples}\n" for s in shards).encode()).hexdigest()
        samples = sum(s.num_samples for s in shards)
        out[f"sources[{i}].name"] = name
        out[f"sources[{i}].shards"] = f"{len(shards)} shards, {samples} samples, sha256 {digest[:16]}"
        out[f"sources[{i}].weight"] = None if weights is None else float(weights[i])
        out[f"sources[{i}].samples_per_epoch"] = quota
    global_seed = os.environ.get("PL_GLOBAL_SEED")
    out.update(
        shuffle_block=stream.shuffle_block,
        interleave=stream.interleave,
        seed=stream.seed,
        seed_everything=None if global_seed is None else int(global_seed),
        batch_size=stream.batch_size,
        world_size=stream.world_size,
        num_workers=stream.num_workers,
        samples_per_epoch=stream.total,
    )
    return out


def layout_changes(saved: dict, current: dict[str, object]) -> list[str]:
    """``"field: saved X now Y"`` for every field that ``saved`` (a loader state) and ``current``
    disagree on (a field the checkpoint lacks is ``not recorded``, one it alone has is ``absent``)."""
    changes = [f"{key}: saved {saved.get(key, 'not recorded')} now {value}"
               for key, value in current.items() if saved.get(key, "not recorded") != value]
    position = ("epoch", "batches")
    changes += [f"{key}: saved {value} now absent" for key, value in saved.items()
                if key not in current and key not in position]
    return changes


class ResumableShardLoader(ShardLoader):
    """A :class:`ShardLoader` that advances the epoch on every iteration and saves its position.

    ``state_dict()`` -> ``{"epoch", "batches", **layout}``: the epoch of the latest iteration and
    the batches this rank has consumed in it (equal on all ranks), plus the data-layout fingerprint
    (:func:`layout_fingerprint`) it is valid for. ``load_state_dict`` makes the next ``iter()``
    continue there (or start the next epoch if that epoch was complete). If the layout changed it
    raises, naming every changed field with its saved and current value; with
    ``on_layout_change="fresh_epoch"`` it logs them instead and the next iteration starts a fresh
    data epoch (saved epoch + 1) from its first batch.

    Args:
        dataset, pin_memory, prefetch_factor: see :class:`ShardLoader`.
        weights: per source, its weight (recorded in the fingerprint).
        on_layout_change: ``"error"`` (default) or ``"fresh_epoch"``.
    """

    def __init__(
        self,
        dataset: ShardStream,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        weights: Sequence[float] | None = None,
        on_layout_change: str = "error",
    ) -> None:
        super().__init__(dataset, pin_memory, prefetch_factor)
        if on_layout_change not in LAYOUT_CHANGES:
            raise ValueError(f"on_layout_change must be one of {LAYOUT_CHANGES}, got {on_layout_change!r}")
        if weights is not None and len(weights) != len(dataset.sources):
            raise ValueError(f"{len(weights)} weights for {len(dataset.sources)} sources")
        self.weights = None if weights is None else list(weights)
        self.on_layout_change = on_layout_change
        self.epoch = -1
        self.batches = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[dict]:
        """The next epoch's batches (or the rest of the resumed one). A generator: the epoch
        advances and the workers start at the first ``next()``, not at ``iter()``, so Lightning's
        iterability check (an ``iter()`` never advanced) neither skips data epoch 0 nor starts a
        set of workers for nothing."""
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if skip >= len(self):
                epoch, skip = epoch + 1, 0
        else:
            epoch, skip = self.epoch + 1, 0
        self.epoch, self.batches = epoch, skip
        self.dataset.set_position(epoch, skip)
        for batch in self._normalised(iter(self._loader())):
            self.batches += 1
            yield batch

    def _layout(self) -> dict[str, object]:
        return layout_fingerprint(self.dataset, self.weights)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        changes = layout_changes(state, self._layout())
        if changes and self.on_layout_change == "error":
            raise ValueError(
                "cannot resume the shard stream exactly: the data layout changed since the checkpoint ("
                + "; ".join(changes) + "). Resume with the same data settings, or set "
                "data.init_args.on_layout_change: fresh_epoch to start a fresh data epoch at the saved step"
            )
        if changes:
            log.warning(
                "the data layout changed since the checkpoint (%s); on_layout_change=fresh_epoch: "
                "data epoch %d starts from its first batch at the saved step",
                "; ".join(changes), epoch + 1,
            )
            epoch, batches = epoch + 1, 0
        self._resume = (epoch, batches)
        self.epoch, self.batches = epoch, batches
