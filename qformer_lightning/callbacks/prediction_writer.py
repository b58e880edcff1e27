"""Write ``predict`` outputs as JSON Lines, one line per request, in input order.

Each line is the record a task's ``predict_step`` returns (the request: ``image``, ``task``,
``question`` / ``prompt`` / ``text``, ``id``; and the outputs: ``output`` + ``llm_prompt`` for
generation, ``itc`` + ``itm`` for scores) with ``index``, the request's position. A request whose
image could not be read has an ``error`` instead of outputs.

With several processes each rank writes ``OUTPUT.rankR`` and rank 0 merges them into ``OUTPUT``
(sorted by ``index``, the repeats a distributed sampler pads with dropped).

The final report counts skipped files, not lines: each unreadable image once by its reason
(``bad_image``, ``missing_image``, ``image_too_large``), however many requests named it, and the
entries of the image folders that were not predicted for (``not_an_image``, ``sub_folder``: the data
module's ``skipped_files``), each reason with a few example names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from qformer_lightning.data.predict import summarize_skips


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python values, for ``json.dumps``."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def prediction_lines(batch: dict[str, Any], records: Sequence[dict[str, Any]], batch_indices: Sequence[int] | None) -> list[dict[str, Any]]:
    """The output lines of one batch, records and skipped requests together, in ``index`` order.

    Args:
        batch: the batch (``index`` (B,) request positions when it has them, ``skipped``).
        records: the B records ``predict_step`` returned.
        batch_indices: the sampler's indices of the batch (used when the batch has no ``index``).

    Raises:
        ValueError: ``predict_step`` returned something other than one dict per request.
    """
    if not isinstance(records, (list, tuple)) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"JsonlPredictionWriter needs predict_step to return a list of dicts, got {type(records).__name__}")
    if "index" in batch:
        indices = [int(i) for i in _plain(batch["index"])]
    else:
        indices = list(batch_indices) if batch_indices is not None else [None] * len(records)
    if len(indices) != len(records):
        raise ValueError(f"predict_step returned {len(records)} records for a batch of {len(indices)} requests")
    lines = [{"index": i, **{k: _plain(v) for k, v in r.items()}} for i, r in zip(indices, records)]
    lines.extend(dict(item) for item in batch.get("skipped", []))
    return sorted(lines, key=lambda line: (line.get("index") is None, line.get("index") or 0))


class UnreadableImages:
    """The distinct images behind the ``error`` lines, by reason, and the number of such lines."""

    def __init__(self) -> None:
        self.by_reason: dict[str, dict[str, None]] = {}  # reason -> image paths, in first-seen order
        self.num_lines = 0

    def add(self, line: dict[str, Any]) -> None:
        """Count one output line (lines without ``error`` are ignored)."""
        if "error" not in line:
            return
        self.num_lines += 1
        reason = str(line["error"]).split(":", 1)[0]
        self.by_reason.setdefault(reason, {})[str(line.get("image"))] = None

    @classmethod
    def from_jsonl(cls, path: Path) -> UnreadableImages:
        """The tally of a written JSONL file."""
        tally = cls()
        with path.open(encoding="utf-8") as f:
            for line in f:
                tally.add(json.loads(line))
        return tally

    def files(self) -> dict[str, list[str]]:
        """Per reason, the distinct image paths."""
        return {reason: list(paths) for reason, paths in self.by_reason.items()}


def skip_report(unreadable: UnreadableImages, skipped_files: dict[str, list[str]]) -> str:
    """What was skipped, for the final line: ``""`` when nothing was, else e.g. ``", 4 of them with
    'error' (requests on unreadable images); skipped 2 file(s): unreadable image: 1 (a.jpg); not an
    image: 1 (notes.txt)"`` (unreadable images first, then the folder entries not predicted for)."""
    files = {**unreadable.files(), **{reason: list(names) for reason, names in skipped_files.items() if names}}
    total = sum(len(names) for names in files.values())
    if not total:
        return ""
    errors = f", {unreadable.num_lines} of them with 'error' (requests on unreadable images)" if unreadable.num_lines else ""
    return f"{errors}; skipped {total} file(s): {summarize_skips(files)}"


def merge_parts(parts: Sequence[Path], output: Path) -> int:
    """Merge per-rank JSONL files into ``output`` sorted by ``index``, keeping the first line of each index.

    Returns:
        the number of lines written.
    """
    by_index: dict[Any, str] = {}
    unindexed: list[str] = []
    for part in parts:
        with part.open(encoding="utf-8") as f:
            for line in f:
                index = json.loads(line).get("index")
                if index is None:
                    unindexed.append(line)
                else:
                    by_index.setdefault(index, line)
    with output.open("w", encoding="utf-8") as f:
        for index in sorted(by_index):
            f.write(by_index[index])
        f.writelines(unindexed)
    return len(by_index) + len(unindexed)


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes every ``predict`` batch to a JSONL file as it is produced (module docstring).

    Add it in YAML (``trainer.callbacks``) or use ``configs/predict/jsonl.yaml``::

        - class_path: qformer_lightning.callbacks.JsonlPredictionWriter
          init_args: {output: predictions.jsonl}

    Args:
        output: the JSONL file (its folder is created).
        overwrite: replace an existing file; ``False`` stops with an error instead.
    """

    def __init__(self, output: str = "predictions.jsonl", overwrite: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.overwrite = overwrite
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self.num_written = 0
        self.unreadable = UnreadableImages()
        self.report = ""
        """The final summary line (rank 0), also logged."""

    def _part(self, trainer: pl.Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.name}.rank{trainer.global_rank}")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.output.exists() and not self.overwrite:
            raise FileExistsError(f"prediction file {str(self.output)!r} exists (overwrite: false); choose another output")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._path = self._part(trainer)
        self._file = self._path.open("w", encoding="utf-8")
        self.num_written = 0
        self.unreadable = UnreadableImages()
        self.report = ""

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._file is None:
            raise RuntimeError("JsonlPredictionWriter: the output file is not open (on_predict_start did not run)")
        for line in prediction_lines(batch, prediction, batch_indices):
            self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.num_written += 1
            self.unreadable.add(line)
        self._file.flush()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if trainer.world_size > 1:
            trainer.strategy.barrier("jsonl_prediction_writer")
            if trainer.is_global_zero:
                parts = [self.output.with_name(f"{self.output.name}.rank{r}") for r in range(trainer.world_size)]
                self.num_written = merge_parts(parts, self.output)
                for part in parts:
                    part.unlink()
                self.unreadable = UnreadableImages.from_jsonl(self.output)  # every rank's, padding repeats dropped
            trainer.strategy.barrier("jsonl_prediction_writer_merged")
        if trainer.is_global_zero:
            skipped_files = getattr(trainer.datamodule, "skipped_files", None) or {}
            skipped = skip_report(self.unreadable, skipped_files)
            self.report = f"wrote {self.num_written} prediction line(s) to {self.output}{skipped}"
            rank_zero_info(self.report)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
