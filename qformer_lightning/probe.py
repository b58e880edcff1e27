"""Does a trained generative model describe the image it is shown? The grounding probe.

Glossary: B batch, S image side.

:func:`probe` loads a stage-2, captioning or VQA checkpoint of this project (the task rebuilt from
the config the checkpoint stores, :func:`load_task`), runs it on the held-out TEST images of the
synthetic corpus (:mod:`qformer_lightning.data.synthetic`, whose ``scenes/test.json`` holds each
image's colour, shape, size, count and position) and measures:

- caption word accuracy per attribute (:func:`attribute_correct`): a caption is right for the
  colour, the shape or the count when it names the true value and no other value of that
  attribute; greedy and with the checkpoint's own beam settings (stage 2, captioning);
- distinct captions / distinct scenes (:func:`distinct_ratio`; scene = colour, shape, size,
  count, position): about 1 when each scene gets its own caption, small when every image gets
  the same few captions;
- VQA accuracy per question type (VQA checkpoints; the official accuracy of
  :mod:`qformer_lightning.metrics.vqa`, in percent);
- the grounding gap and prompt cosine of the test images (as
  :class:`~qformer_lightning.callbacks.GroundingMonitor` measures them at validation).

Command line: ``python tools/probe_grounding.py CKPT [--corpus data/synthetic]``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from qformer_lightning.data.synthetic import COLOURS, COUNT_WORDS, SHAPES, SIZES, SyntheticCorpus

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "count")
"""The caption attributes scored."""
QUESTION_KINDS: tuple[tuple[str, str], ...] = (
    ("what color", "colour"), ("how many", "count"), ("what shape", "shape"), ("where is", "position"),
    ("is the", "size"), ("are the", "size"),
)
"""(question prefix, question type) of the synthetic corpus' questions, first match wins."""


# ---------------------------------------------------------------------------- scoring


def words_of(text: str) -> list[str]:
    """Lower-case words and digit runs of a text (punctuation dropped)."""
    return re.findall(r"[a-z]+|\d+", text.lower())


def named_colours(words: Sequence[str]) -> set[str]:
    """The colour names among ``words``."""
    return {w for w in words if w in COLOURS}


def named_shapes(words: Sequence[str]) -> set[str]:
    """The shapes named among ``words``, singular or plural (``circles`` names ``circle``)."""
    return {shape for w in words for shape in SHAPES if w in (shape, shape + "s")}


def named_counts(words: Sequence[str]) -> set[int]:
    """The counts a caption states: number words or digits (``two``, ``2``), and one for ``a``/``an``
    followed by size and colour words and a singular shape (``a small red circle``)."""
    counts = {k for w in words for k, word in COUNT_WORDS.items() if w in (word, str(k))}
    for i, w in enumerate(words):
        if w not in ("a", "an"):
            continue
        j = i + 1
        while j < len(words) and (words[j] in SIZES or words[j] in COLOURS):
            j += 1
        if j < len(words) and words[j] in SHAPES:
            counts.add(1)
    return counts


def attribute_correct(caption: str, scene: dict[str, Any], attribute: str) -> bool:
    """Whether ``caption`` names the scene's true ``attribute`` (colour, shape or count) and no other
    value of it.

    Args:
        caption: generated text.
        scene: a ``scenes/{split}.json`` record (``colour``, ``shape``, ``count``, ...).
        attribute: one of :data:`ATTRIBUTES`.
    """
    words = words_of(caption)
    if attribute == "colour":
        named = named_colours(words)
    elif attribute == "shape":
        named = named_shapes(words)
    elif attribute == "count":
        named = named_counts(words)
    else:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return named == {scene[attribute]}


def scene_key(scene: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two synthetic scenes the same: colour, shape, size, count, position."""
    return scene["colour"], scene["shape"], scene["size"], scene["count"], scene["position"]


def distinct_ratio(captions: Sequence[str], scenes: Sequence[dict[str, Any]]) -> float:
    """Distinct captions (compared by their words, case and punctuation ignored) / distinct scenes.

    Raises:
        ValueError: no scene, or not one caption per scene record.
    """
    if not scenes or len(captions) != len(scenes):
        raise ValueError(f"need one caption per scene, got {len(captions)} captions for {len(scenes)} scenes")
    return len({" ".join(words_of(c)) for c in captions}) / len({scene_key(s) for s in scenes})


def caption_figures(captions: Sequence[str], scenes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{colour, shape, count}_acc`` (fractions of captions right) and ``distinct_ratio``."""
    figures = {f"{a}_acc": float(np.mean([attribute_correct(c, s, a) for c, s in zip(captions, scenes)])) for a in ATTRIBUTES}
    figures["distinct_ratio"] = distinct_ratio(captions, scenes)
    return figures


def question_kind(question: str) -> str:
    """The type of a synthetic-corpus question (:data:`QUESTION_KINDS`), ``other`` when none fits."""
    text = " ".join(words_of(question))
    return next((kind for prefix, kind in QUESTION_KINDS if text.startswith(prefix)), "other")


def vqa_figures(questions: Sequence[str], predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Official VQA accuracy (percent) per question type (``acc_<type>``) and over all (``acc``).

    Raises:
        ValueError: lists of different lengths or no question.
    """
    from qformer_lightning.metrics.vqa import vqa_accuracy

    if not questions or not len(questions) == len(predictions) == len(answers):
        raise ValueError(f"got {len(questions)} questions, {len(predictions)} predictions, {len(answers)} answer lists")
    by_kind: dict[str, list[float]] = defaultdict(list)
    for question, prediction, refs in zip(questions, predictions, answers):
        by_kind[question_kind(question)].append(vqa_accuracy(prediction, refs))
    figures = {f"acc_{kind}": 100.0 * float(np.mean(scores)) for kind, scores in sorted(by_kind.items())}
    figures["acc"] = 100.0 * float(np.mean([s for scores in by_kind.values() for s in scores]))
    return figures


# ---------------------------------------------------------------------------- the report


@dataclass
class ProbeReport:
    """What :func:`probe` measured.

    Attributes:
        checkpoint: the probed file.
        task: the task class name (``Stage2``, ``Caption``, ``VQA``).
        num_images: test images probed.
        num_scenes: distinct scenes among them.
        figures: ``greedy/{colour,shape,count}_acc``, ``greedy/distinct_ratio``, the same under
            ``beam/`` (captioning tasks; fractions), ``vqa/acc`` and ``vqa/acc_<type>`` (VQA;
            percent), ``grounding_gap`` (nats) and ``prompt_cosine``.
        beam_settings: the generation settings of the ``beam/`` figures (the checkpoint's own).
        examples: a few (scene, greedy caption or answer) pairs, for a look by eye.
    """

    checkpoint: str
    task: str
    num_images: int
    num_scenes: int
    figures: dict[str, float]
    beam_settings: dict[str, Any] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line with every figure."""
        shown = ", ".join(f"{name} {value:.3f}" for name, value in self.figures.items())
        return f"{Path(self.checkpoint).name} ({self.task}, {self.num_images} test images, {self.num_scenes} scenes): {shown}"

    def table(self) -> str:
        """A plain-text table of the figures, then the examples."""
        lines = [f"probe of {self.checkpoint} ({self.task}): {self.num_images} test images, {self.num_scenes} distinct scenes"]
        if self.beam_settings:
            lines.append(f"beam settings (the checkpoint's): {self.beam_settings}")
        lines += [f"  {name:<24} {value:8.3f}" for name, value in self.figures.items()]
        lines += ["examples (scene -> output):"] + [f"  {scene} -> {output!r}" for scene, output in self.examples]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- loading


def read_scenes(corpus: SyntheticCorpus, split: str = "test") -> list[dict[str, Any]]:
    """The ground truth of the split's images.

    Raises:
        FileNotFoundError: no corpus there, or no scenes file (a corpus generated before it existed).
    """
    path = corpus.scenes_json(split)
    if not (corpus.root / "meta.json").is_file():
        raise FileNotFoundError(
            f"no synthetic corpus at {corpus.root} (no meta.json): generate it with tools/make_synthetic_corpus.py "
            "or give its directory with --corpus"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the corpus at {corpus.root} predates the scenes files; regenerate it (delete the "
            "directory and run tools/make_synthetic_corpus.py, or any demo step)"
        )
    return json.loads(path.read_text())


def _missing_local(source: str) -> bool:
    from qformer_lightning.errors import looks_like_local_path

    return not Path(source).exists() and looks_like_local_path(source)


def check_sources(model_config: dict[str, Any]) -> None:
    """Fail early, naming the option, when a local weight file the task loads is missing.

    Raises:
        FileNotFoundError: a ``pretrained`` entry or the vision ``checkpoint_path`` is not there.
    """
    init = model_config.get("init_args", {})
    sources = init.get("pretrained") or []
    for source in [sources] if isinstance(sources, str) else sources:
        if _missing_local(source):
            raise FileNotFoundError(
                f"{source} not found (listed in the checkpoint's config as model.init_args.pretrained, relative to "
                f"{Path.cwd()}): run the probe from the directory the training ran in (the demo: the repository "
                "root), or give the sources with --pretrained"
            )
    vision = init.get("model", {}).get("init_args", {}).get("vision", {}).get("init_args", {})
    path = vision.get("checkpoint_path")
    if path and not Path(path).exists():
        raise FileNotFoundError(
            f"{path} not found (the image encoder's weights, model.init_args.model.init_args.vision.init_args."
            f"checkpoint_path in the checkpoint's config, relative to {Path.cwd()}): run the probe from the directory "
            "the training ran in (the demo: the repository root)"
        )


def build_task(model_config: dict[str, Any]) -> Any:
    """Instantiate the task of a ``model:`` config section (``class_path`` + ``init_args``)."""
    from jsonargparse import ArgumentParser

    from qformer_lightning.tasks.base import Blip2Task

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Blip2Task, "model")
    config = parser.parse_object({"model": model_config})
    return parser.instantiate_classes(config).model


def load_task(checkpoint: str | Path, pretrained: list[str] | None = None, device: str | torch.device = "cpu") -> Any:
    """Rebuild a stage-2, captioning or VQA task from a checkpoint of this project, in eval mode.

    The task is built from the config the checkpoint stores (``checkpoint["qformer_lightning"]["config"]``),
    its initial weights are loaded as training loaded them (``pretrained`` sources, the ViT's own
    file: they hold the frozen weights the checkpoint left out), then the checkpoint's weights.

    Args:
        checkpoint: a one-file ``.ckpt`` written by ``python -m qformer_lightning fit``.
        pretrained: replaces the config's ``pretrained`` sources (e.g. when they moved); ``[]``: none.
        device: where the task runs.

    Raises:
        FileNotFoundError: no such file, or a missing weight source (named).
        ValueError: not a checkpoint of this project, no stored config, not a generative task, or
            frozen weights left out of the checkpoint without a source to reload them from.
    """
    from qformer_lightning.tasks.stage2 import Stage2

    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"{path} is a directory (a sharded FSDP checkpoint): the probe reads one-file .ckpt checkpoints")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=False)
    meta = state.get("qformer_lightning") if isinstance(state, dict) else None
    if meta is None:
        raise ValueError(f"{path} was not written by qformer_lightning (no 'qformer_lightning' entry)")
    if not meta.get("config"):
        raise ValueError(f"{path} stores no run config: it was not written by a `python -m qformer_lightning fit` run")
    model_config = yaml.safe_load(meta["config"])["model"]
    if pretrained is not None:
        model_config.setdefault("init_args", {})["pretrained"] = list(pretrained) or None
    check_sources(model_config)
    task = build_task(model_config)
    if not isinstance(task, Stage2):
        raise ValueError(
            f"{path} is a {type(task).__name__} checkpoint: the probe generates text, it needs a stage-2, caption or VQA one"
        )
    if meta["dropped_frozen_keys"] and not task.frozen_weights_have_source():
        raise ValueError(
            f"{path} left out {len(meta['dropped_frozen_keys'])} frozen tensors (e.g. {meta['dropped_frozen_keys'][0]}) "
            "and the config now names no source for them: give the sources with --pretrained"
        )
    task.configure_model()
    task.on_load_checkpoint(state)  # same task, and the stored keys fit (the dropped ones come from their source)
    task.load_state_dict(state["state_dict"], strict=False)
    return task.to(device).eval()


# ---------------------------------------------------------------------------- running


def load_images(corpus: SyntheticCorpus, files: Sequence[str], encoder: Any) -> Tensor:
    """(B, 3, S, S) test images, resized and normalised as the evaluation transform does for ``encoder``."""
    from qformer_lightning.data.image import ImageTransform, normalize

    transform = ImageTransform(encoder.image_size, train=False)
    arrays = [transform((corpus.image_root / f).read_bytes()) for f in files]
    return normalize(torch.from_numpy(np.stack(arrays)), encoder.mean, encoder.std)


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


@torch.no_grad()
def generate_captions(task: Any, images: Tensor, settings: dict[str, Any]) -> list[str]:
    """Captions of (B, 3, S, S) images after the task's prompt, with generation ``settings``."""
    prompts = [task.prompt] * images.shape[0] if task.prompt else None
    return task.model.caption(images.to(task.device), prompts, **settings)


@torch.no_grad()
def gap_figures(task: Any, batches: list[dict[str, Any]]) -> dict[str, float]:
    """``grounding_gap`` (nats, weighted by batch size) and ``prompt_cosine`` over the batches, as the
    monitor measures them (:func:`~qformer_lightning.callbacks.grounding.measure_generative`)."""
    from qformer_lightning.callbacks.grounding import measure_generative, rolled_rows

    gap = weight = cosine = pairs = 0.0
    for index, batch in enumerate(batches):
        rows = rolled_rows(batch["image_id"], batch["image"].shape[0])
        if rows is None:
            continue
        m = measure_generative(task, batch, rows, index)
        size = batch["image"].shape[0]
        gap += float(m.rolled_loss - m.true_loss) * size
        weight += size
        cosine += float(m.cosine) * m.pairs
        pairs += m.pairs
    if weight == 0:
        raise ValueError("no batch with 2 distinct images: the grounding gap needs at least 2 test images")
    return {"grounding_gap": gap / weight, "prompt_cosine": cosine / pairs if pairs else float("nan")}


def _describe(scene: dict[str, Any]) -> str:
    where = f" {scene['position']}" if scene["position"] else ""
    return f"{scene['count']} {scene['size']} {scene['colour']} {scene['shape']}{where}"


def probe_captions(task: Any, corpus: SyntheticCorpus, scenes: list[dict[str, Any]], num_beams: int | None,
                   batch_size: int) -> tuple[dict[str, float], dict[str, Any], list[tuple[str, str]]]:
    """Caption figures (greedy and beam), the gap on the scenes' reference captions, examples."""
    from qformer_lightning.data.annotations import load_captions
    from qformer_lightning.data.text import pre_caption

    beam = dict(task.generation, num_beams=num_beams or task.generation["num_beams"])
    greedy = dict(task.generation, num_beams=1)
    references = {im.image_id: im.captions for im in load_captions(corpus.karpathy_json, ["test"])}
    figures: dict[str, float] = {}
    captions: dict[str, list[str]] = {"greedy": [], "beam": []}
    gap_batches = []
    for part in _batches(len(scenes), batch_size):
        chunk = scenes[part]
        images = load_images(corpus, [s["file"] for s in chunk], task.model.vision)
        captions["greedy"] += generate_captions(task, images, greedy)
        if beam["num_beams"] > 1:
            captions["beam"] += generate_captions(task, images, beam)
        ids = [s["image_id"] for s in chunk]
        # the k-th image's k-th template (cyclically): every caption template is represented
        texts = [pre_caption(references[i][(part.start + k) % len(references[i])]) for k, i in enumerate(ids)]
        gap_batches.append({"image": images.to(task.device), "text": texts, "image_id": torch.tensor(ids)})
    if not captions["beam"]:
        captions["beam"] = captions["greedy"]  # beam 1 is greedy
    for run in ("greedy", "beam"):
        figures.update({f"{run}/{name}": value for name, value in caption_figures(captions[run], scenes).items()})
    figures.update(gap_figures(task, gap_batches))
    examples = [(_describe(s), c) for s, c in zip(scenes[:8], captions["greedy"][:8])]
    return figures, beam, examples


def probe_vqa(task: Any, corpus: SyntheticCorpus, scenes: list[dict[str, Any]],
              batch_size: int) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """VQA figures on the test questions of the scenes' images, the gap on those questions, examples."""
    from qformer_lightning.data.annotations import load_vqa
    from qformer_lightning.data.text import pre_question

    keep = {s["image_id"] for s in scenes}
    questions = [q for q in load_vqa(corpus.vqa_questions("test"), corpus.vqa_annotations("test")) if q.image_id in keep]
    if not questions:
        raise ValueError(f"no test question about the {len(scenes)} probed images in {corpus.vqa_questions('test')}")
    predictions, gap_batches = [], []
    for part in _batches(len(questions), batch_size):
        chunk = questions[part]
        images = load_images(corpus, [q.image for q in chunk], task.model.vision).to(task.device)
        texts = [pre_question(q.question) for q in chunk]
        predictions += task.answer(images, texts)
        gap_batches.append({
            "image": images, "text": texts, "answers": [q.answers for q in chunk],
            "question_id": torch.tensor([q.question_id for q in chunk]), "image_id": torch.tensor([q.image_id for q in chunk]),
        })
    figures = {f"vqa/{k}": v for k, v in vqa_figures([q.question for q in questions], predictions, [q.answers for q in questions]).items()}
    figures.update(gap_figures(task, gap_batches))
    examples = [(q.question, p) for q, p in zip(questions[:8], predictions[:8])]
    return figures, examples


def probe(
    checkpoint: str | Path,
    corpus: str | Path = "data/synthetic",
    num_beams: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    pretrained: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> ProbeReport:
    """Probe a stage-2, captioning or VQA checkpoint on the synthetic corpus' test images (module docstring).

    Args:
        checkpoint: a one-file ``.ckpt`` of ``python -m qformer_lightning fit``.
        corpus: the synthetic corpus directory (with ``scenes/test.json``).
        num_beams: beams of the ``beam/`` figures (default: the checkpoint's setting).
        limit: probe only the first ``limit`` test images.
        batch_size: images (VQA: questions) per forward.
        pretrained: replaces the checkpoint config's ``pretrained`` sources (see :func:`load_task`).
        device: where the model runs.
    """
    from qformer_lightning.tasks.vqa import VQA

    if batch_size < 2 or (limit is not None and limit < 2) or (num_beams is not None and num_beams < 1):
        raise ValueError(f"need batch_size >= 2, limit >= 2 and num_beams >= 1, got {batch_size}, {limit}, {num_beams}")
    data = SyntheticCorpus(Path(corpus))
    scenes = read_scenes(data)[:limit]
    task = load_task(checkpoint, pretrained, device)
    if isinstance(task, VQA):
        figures, examples = probe_vqa(task, data, scenes, batch_size)
        beam = dict(task.generation)
    else:
        figures, beam, examples = probe_captions(task, data, scenes, num_beams, batch_size)
    return ProbeReport(str(checkpoint), type(task).__name__, len(scenes), len({scene_key(s) for s in scenes}),
                       figures, beam, examples)
