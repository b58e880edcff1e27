"""COCO caption metrics with pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr and optional SPICE.

The protocol is the one of ``pycocoevalcap.eval.COCOEvalCap`` (used by BLIP / LAVIS): references
and predictions are tokenised separately with the Stanford PTB tokenizer (lower-cased,
punctuation dropped), then each scorer runs over the images that have a prediction. Scores are
returned as pycocoevalcap reports them (fractions: CIDEr 1.458 is the paper's 145.8).

Java must be on PATH (PTB tokenizer, METEOR, SPICE). SPICE additionally needs the Stanford
CoreNLP 3.6.0 jars in pycocoevalcap's ``spice/lib`` folder, which pycocoevalcap downloads on
first use; offline that download fails, so SPICE is only run when the jars are present (see
:func:`spice_missing_message` for how to install them).

Glossary: B captions in a batch, U total UTF-8 bytes of a batch's captions.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from qformer_lightning.distributed import is_global_zero

__all__ = [
    "CAPTION_METRICS",
    "CaptionMetric",
    "CaptionScorer",
    "load_coco_references",
    "load_coco_results",
    "score_captions",
    "spice_available",
    "spice_jar_dir",
    "spice_missing_message",
    "write_coco_results",
]

log = logging.getLogger(__name__)

# Scorers that run offline with Java; SPICE is controlled separately by `use_spice`.
CAPTION_METRICS = ("bleu", "meteor", "rouge", "cider")
# The jars pycocoevalcap's SPICE looks for (spice/get_stanford_models.py).
_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

PathLike = str | Path
Prediction = dict[str, Any]  # {"image_id": int, "caption": str}


# ----------------------------------------------------------------------------- SPICE detection
def spice_jar_dir() -> Path:
    """pycocoevalcap's ``spice/lib`` folder, where SPICE expects the Stanford CoreNLP jars."""
    from pycocoevalcap.spice import spice as spice_module

    return Path(spice_module.__file__).resolve().parent / "lib"


def spice_available() -> bool:
    """True when both Stanford CoreNLP 3.6.0 jars SPICE needs are present (no download)."""
    lib = spice_jar_dir()
    return all((lib / jar).is_file() for jar in _CORENLP_JARS)


def spice_missing_message() -> str:
    """Why SPICE cannot run offline and how to enable it."""
    lib = spice_jar_dir()
    missing = [jar for jar in _CORENLP_JARS if not (lib / jar).is_file()]
    return (
        f"SPICE needs the Stanford CoreNLP 3.6.0 jars in {lib}, missing: {', '.join(missing)}. "
        "To enable it, run once with internet access: python -c \"from "
        "pycocoevalcap.spice.get_stanford_models import get_stanford_models; get_stanford_models()\" "
        "(downloads stanford-corenlp-full-2015-12-09.zip), or copy both jars from that archive into "
        f"{lib}. Then pass use_spice=True (or leave it None to use SPICE whenever the jars are there)."
    )


def _resolve_spice(use_spice: bool | None) -> bool:
    """Decide whether SPICE runs: None = when available (logs why not), True = required."""
    if use_spice is False:
        return False
    if spice_available():
        return True
    if use_spice is True:
        raise RuntimeError(f"use_spice=True but SPICE is not installed. {spice_missing_message()}")
    log.warning("Skipping SPICE. %s", spice_missing_message())
    return False


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "pycocoevalcap's PTB tokenizer, METEOR and SPICE run Java, but no `java` is on PATH: "
            "install a Java runtime (e.g. apt-get install default-jre-headless)."
        )


# ----------------------------------------------------------------------------- files
def _load_json(source: PathLike, what: str) -> Any:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def load_coco_references(annotation: dict[str, Any] | PathLike) -> dict[Any, list[str]]:
    """Reference captions per image id from a COCO-format annotation (dict or JSON path).

    The annotation needs ``"annotations"``: a list of ``{"image_id", "caption"}``; ``"images"``
    is optional (images listed there without captions are not scoreable and are left out).
    """
    source = annotation if isinstance(annotation, dict) else _load_json(annotation, "caption annotation")
    name = "annotation dict" if isinstance(annotation, dict) else str(annotation)
    if not isinstance(source, dict) or "annotations" not in source:
        raise ValueError(f"{name} is not COCO caption format: expected a dict with an 'annotations' list")
    references: dict[Any, list[str]] = {}
    for index, entry in enumerate(source["annotations"]):
        if "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise ValueError(f"{name}: annotations[{index}] needs 'image_id' and a string 'caption', got {entry!r}")
        references.setdefault(entry["image_id"], []).append(entry["caption"])
    if not references:
        raise ValueError(f"{name} has no reference captions")
    return references


def _check_predictions(predictions: Iterable[Prediction], name: str) -> dict[Any, str]:
    """{image_id: caption}; rejects missing fields and duplicate image ids."""
    by_image: dict[Any, str] = {}
    for index, entry in enumerate(predictions):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise ValueError(f"{name}[{index}] must be a dict with 'image_id' and a string 'caption', got {entry!r}")
        image_id = entry["image_id"]
        if image_id in by_image:
            raise ValueError(
                f"{name} has more than one caption for image_id {image_id!r} (entry {index}); "
                "the COCO results format allows one caption per image"
            )
        by_image[image_id] = entry["caption"]
    return by_image


def load_coco_results(results: Sequence[Prediction] | PathLike) -> dict[Any, str]:
    """{image_id: caption} from a COCO results list or JSON file; duplicates are an error."""
    if isinstance(results, (str, Path)):
        return _check_predictions(_load_json(results, "caption results"), str(results))
    return _check_predictions(results, "predictions")


def write_coco_results(predictions: Sequence[Prediction], path: PathLike) -> Path:
    """Write ``[{"image_id", "caption"}, ...]`` (COCO results format) to ``path``.

    Raises:
        ValueError: on a missing field or a duplicate image id (one caption per image).
    """
    by_image = _check_predictions(predictions, "predictions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"image_id": image_id, "caption": caption} for image_id, caption in by_image.items()]
    with path.open("w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False)
    return path


# ----------------------------------------------------------------------------- scoring
class CaptionScorer:
    """Scores generated captions against fixed COCO-format references.

    Build once per evaluation split; each call tokenises only references it has not seen yet.
    """

    def __init__(
        self,
        annotation: dict[str, Any] | PathLike,
        use_spice: bool | None = None,
        metrics: Sequence[str] = CAPTION_METRICS,
    ) -> None:
        """Args:
        annotation: COCO-format dict or path (see :func:`load_coco_references`).
        use_spice: None = run SPICE when its jars are present, else log how to enable it;
            True = require it (RuntimeError when missing); False = never.
        metrics: subset of ``("bleu", "meteor", "rouge", "cider")`` to compute.
        """
        unknown = sorted(set(metrics) - set(CAPTION_METRICS))
        if unknown:
            raise ValueError(f"unknown caption metrics {unknown}; choose from {CAPTION_METRICS}")
        self.references = load_coco_references(annotation)
        self.metrics = tuple(metrics)
        self.use_spice = _resolve_spice(use_spice)
        self._tokenized_references: dict[Any, list[str]] = {}

    def _tokenize(self, captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        from qformer_lightning.console import subprocess_stderr_to_log

        with subprocess_stderr_to_log(log, logging.DEBUG):  # Java's "PTBTokenizer tokenized N tokens ..."
            return PTBTokenizer().tokenize({key: [{"caption": c} for c in caps] for key, caps in captions.items()})

    def _scorers(self) -> list[tuple[Any, list[str], dict[str, Any]]]:
        """(scorer, score names, compute_score keyword arguments) of the selected metrics."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge

        factories = {
            "bleu": lambda: (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], {"verbose": 0}),
            "meteor": lambda: (Meteor(), ["METEOR"], {}),
            "rouge": lambda: (Rouge(), ["ROUGE_L"], {}),
            "cider": lambda: (Cider(), ["CIDEr"], {}),
        }
        scorers = [factories[name]() for name in CAPTION_METRICS if name in self.metrics]
        if self.use_spice:
            from pycocoevalcap.spice.spice import Spice

            scorers.append((Spice(), ["SPICE"], {}))
        return scorers

    def __call__(self, predictions: Sequence[Prediction] | PathLike) -> dict[str, float]:
        """Score ``predictions`` (COCO results list or JSON path) over the images they cover.

        Returns:
            ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}`` (selected ones) as floats.
        """
        by_image = load_coco_results(predictions)
        if not by_image:
            raise ValueError("no predictions to score")
        unknown = [image_id for image_id in by_image if image_id not in self.references]
        if unknown:
            raise ValueError(
                f"{len(unknown)} predicted image ids have no reference captions, e.g. {unknown[:5]}"
            )
        if len(by_image) < len(self.references):
            log.warning("Scoring captions of %d of the %d annotated images", len(by_image), len(self.references))
        _require_java()
        new = {key: self.references[key] for key in by_image if key not in self._tokenized_references}
        if new:
            self._tokenized_references.update(self._tokenize(new))
        gts = {key: self._tokenized_references[key] for key in by_image}
        res = self._tokenize({key: [caption] for key, caption in by_image.items()})
        result: dict[str, float] = {}
        for scorer, names, options in self._scorers():
            score, _ = scorer.compute_score(gts, res, **options)
            values = score if isinstance(score, list) else [score]
            result.update({name: float(value) for name, value in zip(names, values)})
        return result


def score_captions(
    results: Sequence[Prediction] | PathLike,
    annotation: dict[str, Any] | PathLike,
    use_spice: bool | None = None,
) -> dict[str, float]:
    """One-shot :class:`CaptionScorer`: ``CaptionScorer(annotation, use_spice)(results)``."""
    return CaptionScorer(annotation, use_spice=use_spice)(results)


# ----------------------------------------------------------------------------- torchmetrics
class CaptionMetric(torchmetrics.Metric):
    """Accumulates (image_id, caption) pairs across ranks and scores them in ``compute()``.

    torchmetrics can only synchronise tensors, so captions are stored as UTF-8 bytes: per
    ``update`` one flat uint8 tensor (U,) of the concatenated captions, their byte lengths (B,)
    and the image ids (B,), all list states concatenated across ranks. Duplicate image ids
    (e.g. from a distributed sampler padding the last batch) keep the first caption seen, in rank
    order, unless ``on_duplicate="error"``.

    Call ``update`` (not ``forward``): ``compute`` runs the Java scorers (seconds) on every rank.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    image_ids: list[Tensor]
    caption_bytes: list[Tensor]
    caption_lengths: list[Tensor]

    _STATE_DTYPES = {"image_ids": torch.int64, "caption_bytes": torch.uint8, "caption_lengths": torch.int64}

    def __init__(
        self,
        annotation: dict[str, Any] | PathLike,
        use_spice: bool | None = None,
        metrics: Sequence[str] = CAPTION_METRICS,
        on_duplicate: Literal["keep_first", "error"] = "keep_first",
        results_path: PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Args:
        annotation, use_spice, metrics: see :class:`CaptionScorer`.
        on_duplicate: what to do with a second caption for an image id.
        results_path: when set, ``compute`` also writes the COCO results JSON there (rank 0).
        kwargs: passed to ``torchmetrics.Metric``.
        """
        super().__init__(**kwargs)
        if on_duplicate not in ("keep_first", "error"):
            raise ValueError(f"on_duplicate must be 'keep_first' or 'error', got {on_duplicate!r}")
        self.scorer = CaptionScorer(annotation, use_spice=use_spice, metrics=metrics)
        self.on_duplicate = on_duplicate
        self.results_path = None if results_path is None else Path(results_path)
        for name in self._STATE_DTYPES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_ids: Sequence[int] | Tensor, captions: Sequence[str]) -> None:
        """Add B captions: ``captions[b]`` generated for image ``image_ids[b]`` (integer ids)."""
        ids = torch.as_tensor(image_ids).reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"image_ids must be integers, got {ids.dtype}")
        if isinstance(captions, str) or len(captions) != ids.numel():
            raise ValueError(f"got {ids.numel()} image ids but captions={captions!r}")
        encoded = [caption.encode("utf-8") for caption in captions]
        flat = b"".join(encoded)
        data = torch.frombuffer(bytearray(flat), dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8)
        self.image_ids.append(ids.to(device=self.device, dtype=torch.int64))
        self.caption_bytes.append(data.to(self.device))  # (U,)
        self.caption_lengths.append(torch.tensor([len(e) for e in encoded], dtype=torch.int64, device=self.device))

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        """torchmetrics' sync, but a rank without updates sends typed empty tensors.

        torchmetrics would send a float32 placeholder, which breaks the uint8/int64 all-gather.
        """
        for name, dtype in self._STATE_DTYPES.items():
            if len(getattr(self, name)) == 0:
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    @staticmethod
    def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
        if isinstance(state, Tensor):  # after a sync, torchmetrics leaves a single tensor
            return state
        return torch.cat(state) if state else torch.empty(0, dtype=dtype)

    def predictions(self) -> list[Prediction]:
        """Decode the current state to ``[{"image_id", "caption"}]``, one per image id.

        Inside ``compute()`` the state is the one synchronised across ranks.
        """
        ids = self._cat(self.image_ids, torch.int64).cpu().tolist()
        lengths = self._cat(self.caption_lengths, torch.int64).cpu().tolist()
        data = bytes(self._cat(self.caption_bytes, torch.uint8).cpu().numpy().tobytes())
        if len(ids) != len(lengths) or sum(lengths) != len(data):
            raise RuntimeError(
                f"inconsistent caption state: {len(ids)} ids, {len(lengths)} lengths, "
                f"{sum(lengths)} expected bytes vs {len(data)}"
            )
        captions: dict[int, str] = {}
        offset = 0
        for image_id, length in zip(ids, lengths):
            caption = data[offset : offset + length].decode("utf-8")
            offset += length
            if image_id in captions:
                if self.on_duplicate == "error":
                    raise ValueError(f"image_id {image_id} received more than one caption")
                continue
            captions[image_id] = caption
        return [{"image_id": image_id, "caption": caption} for image_id, caption in captions.items()]

    def compute(self) -> dict[str, Tensor]:
        """Caption scores (float64 scalars) of all captions gathered so far, keyed as pycocoevalcap."""
        predictions = self.predictions()
        if self.results_path is not None and is_global_zero():
            write_coco_results(predictions, self.results_path)
        scores = self.scorer(predictions)
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in scores.items()}
