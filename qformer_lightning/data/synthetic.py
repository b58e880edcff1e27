"""A learnable synthetic captioned-image world, written in the real data formats.

Each image shows 1-3 copies of one shape (circle, square, triangle) in one of six colours and
two sizes on a light background; a single shape also has one of nine positions (3 x 3 grid).
Everything a caption or an answer says is visible, so a tiny model can learn it.

:func:`make_synthetic_corpus` writes, under ``root``:

- ``images/{split}/COCO_{split}_{id:012d}.jpg`` (splits ``train``, ``val``, ``test``)
- ``karpathy/dataset_synthetic.json``: Karpathy's original format (``images`` with ``split``,
  ``sentences``, ``cocoid``), 5 captions per image
- ``karpathy/synthetic_karpathy_{split}.json``: the BLIP/LAVIS list format (train: one entry per
  caption; val/test: one entry per image with its list of captions)
- ``vqa/{split}_questions.json`` + ``vqa/{split}_annotations.json``: VQAv2 format
  (``data_subtype`` = split), 10 human answers per question
- ``shards/{split}/{00000..}.tar`` + ``{shard}_stats.json`` for train and val: img2dataset layout,
  ``KEY.jpg``, ``KEY.txt`` (first caption) and ``KEY.json`` (``captions``: all five captions,
  CapFilt-style; a loader with ``caption_top_k: 5`` draws among all of them, as the test split
  uses all five templates)
- ``scenes/{split}.json``: the ground truth of every image (``image_id``, ``file`` under ``images/``,
  ``colour``, ``shape``, ``size``, ``count``, ``position`` or null), for probes of what a model sees
- ``meta.json``: the generation parameters; a later call with the same parameters reuses the
  corpus, with different ones it refuses to overwrite.

Generation is deterministic for a seed (identical bytes) and takes a few seconds for a few
thousand images.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 180),
    "orange": (240, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.30}  # shape side as a fraction of the image side
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
SPLITS: tuple[str, ...] = ("train", "val", "test")
SHARD_SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class Scene:
    """What one synthetic image shows."""

    image_id: int
    colour: str
    shape: str
    size: str
    count: int
    cells: tuple[tuple[int, int], ...]

    @property
    def position(self) -> str | None:
        """Position name of a single shape (``None`` for 2-3 shapes)."""
        return POSITIONS[self.cells[0]] if self.count == 1 else None


@dataclass(frozen=True)
class SyntheticCorpus:
    """Paths of a generated corpus (see the module docstring)."""

    root: Path

    @property
    def image_root(self) -> Path:
        return self.root / "images"

    @property
    def karpathy_json(self) -> Path:
        return self.root / "karpathy" / "dataset_synthetic.json"

    def karpathy_split_json(self, split: str) -> Path:
        return self.root / "karpathy" / f"synthetic_karpathy_{split}.json"

    def scenes_json(self, split: str) -> Path:
        return self.root / "scenes" / f"{split}.json"

    def vqa_questions(self, split: str) -> Path:
        return self.root / "vqa" / f"{split}_questions.json"

    def vqa_annotations(self, split: str) -> Path:
        return self.root / "vqa" / f"{split}_annotations.json"

    def shards(self, split: str) -> str:
        """A glob of the split's shards."""
        return str(self.root / "shards" / split / "*.tar")


def make_scene(image_id: int, rng: random.Random) -> Scene:
    """Draw a random scene."""
    count = rng.choices((1, 2, 3), weights=(2, 1, 1))[0]
    cells = tuple(rng.sample(sorted(POSITIONS), count))
    return Scene(image_id, rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(sorted(SIZES)), count, cells)


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Render a scene as an RGB image of ``image_size`` pixels per side."""
    tint = rng.randint(-12, 12)
    background = (228 + tint, 228 + tint, 222 + tint)
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    side = SIZES[scene.size] * image_size
    for row, col in scene.cells:
        slack = cell - side
        x0 = col * cell + rng.uniform(0, slack)
        y0 = row * cell + rng.uniform(0, slack)
        box = (x0, y0, x0 + side, y0 + side)
        colour = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=colour)
    return img


def captions(scene: Scene) -> list[str]:
    """Five raw captions (capitalised, with a full stop, like COCO's)."""
    c, s, z = scene.colour, scene.shape, scene.size
    if scene.count == 1:
        where = PHRASES[scene.position]
        a_c = "an" if c[0] in "aeiou" else "a"
        texts = [
            f"a {z} {c} {s} {where}",
            f"{a_c} {c} {s} {where}",
            f"a picture of a {z} {c} {s}",
            f"there is {a_c} {c} {s} {where}",
            f"a {z} {s} that is {c}",
        ]
    else:
        n = COUNT_WORDS[scene.count]
        texts = [
            f"{n} {z} {c} {s}s",
            f"{n} {c} {s}s",
            f"a picture of {n} {c} {s}s",
            f"there are {n} {z} {s}s",
            f"{n} {s}s that are {c}",
        ]
    return [t[0].upper() + t[1:] + "." for t in texts]


def questions(scene: Scene) -> list[tuple[str, str, str, list[str]]]:
    """(question, answer, answer_type, wrong answers to draw noise from) for a scene."""
    s = scene.shape
    plural = scene.count > 1
    out = [
        (
            f"What color {'are' if plural else 'is'} the {s}{'s' if plural else ''}?",
            scene.colour, "other", [c for c in sorted(COLOURS) if c != scene.colour],
        ),
        (f"How many {s}s are there?", str(scene.count), "number", [str(k) for k in (1, 2, 3) if k != scene.count]),
        ("What shape is shown?", s, "other", [x for x in SHAPES if x != s]),
        (f"Is the {s} large?" if not plural else f"Are the {s}s large?", "yes" if scene.size == "large" else "no",
         "yes/no", ["no" if scene.size == "large" else "yes"]),
    ]
    if scene.position is not None:
        out.append((f"Where is the {s}?", scene.position, "other", [p for p in PHRASES if p != scene.position]))
    return out


def human_answers(answer: str, wrong: list[str], rng: random.Random) -> list[str]:
    """Ten annotator answers: mostly ``answer``, sometimes 1-2 from ``wrong``."""
    noisy = rng.choices((0, 1, 2), weights=(7, 2, 1))[0]
    answers = [answer] * (10 - noisy) + [rng.choice(wrong) for _ in range(noisy)]
    rng.shuffle(answers)
    return answers


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical bytes on every run
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def make_synthetic_corpus(
    root: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 250,
    jpeg_quality: int = 90,
) -> SyntheticCorpus:
    """Generate the corpus under ``root`` (module docstring), or reuse it if already there.

    Raises:
        FileExistsError: ``root`` exists and is not a corpus made with these parameters.
    """
    root = Path(root)
    params = {
        "num_train": num_train, "num_val": num_val, "num_test": num_test, "image_size": image_size,
        "seed": seed, "shard_size": shard_size, "jpeg_quality": jpeg_quality, "version": 4,
    }
    meta = root / "meta.json"
    if root.exists():
        if meta.is_file() and json.loads(meta.read_text()) == params:
            return SyntheticCorpus(root)
        if any(root.iterdir()):
            raise FileExistsError(
                f"{root} exists and is not a synthetic corpus with parameters {params}; "
                "choose another directory or delete it"
            )
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _generate(tmp, params)
    _write_json(tmp / "meta.json", params)
    if root.exists():
        root.rmdir()  # empty (checked above)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (meta.is_file() and json.loads(meta.read_text()) == params):
            raise
    return SyntheticCorpus(root)


def _generate(out: Path, params: dict) -> None:
    rng = random.Random(params["seed"])
    corpus = SyntheticCorpus(out)
    sizes = {"train": params["num_train"], "val": params["num_val"], "test": params["num_test"]}
    karpathy_images, sentence_id, image_index, next_id = [], 0, 0, 1
    for split in SPLITS:
        lavis, questions_json, annotations_json, scenes_json = [], [], [], []
        shard_samples: list[tuple[str, bytes, list[str], int, str]] = []
        # progress on a terminal only (disable=None): logs and tests stay quiet
        for _ in tqdm(range(sizes[split]), desc=f"synthetic corpus: {split}", unit="img", disable=None):
            scene = make_scene(next_id, rng)
            next_id += 1
            buf = io.BytesIO()
            render(scene, params["image_size"], rng).save(buf, format="JPEG", quality=params["jpeg_quality"])
            data = buf.getvalue()
            filename = f"COCO_{split}_{scene.image_id:012d}.jpg"
            path = out / "images" / split / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            caps = captions(scene)
            rel = f"{split}/{filename}"
            karpathy_images.append({
                "filepath": split, "filename": filename, "imgid": image_index, "split": split,
                "cocoid": scene.image_id,
                "sentids": list(range(sentence_id, sentence_id + len(caps))),
                "sentences": [
                    {"raw": c, "tokens": c.lower().rstrip(".").split(), "imgid": image_index, "sentid": sentence_id + k}
                    for k, c in enumerate(caps)
                ],
            })
            sentence_id += len(caps)
            image_index += 1
            if split == "train":
                lavis.extend({"caption": c, "image": rel, "image_id": f"synthetic_{scene.image_id}"} for c in caps)
            else:
                lavis.append({"image": rel, "caption": caps})
            for k, (question, answer, answer_type, wrong) in enumerate(questions(scene)):
                qid = scene.image_id * 10 + k
                answers = human_answers(answer, wrong, rng)
                questions_json.append({"image_id": scene.image_id, "question": question, "question_id": qid})
                annotations_json.append({
                    "question_id": qid, "image_id": scene.image_id, "answer_type": answer_type,
                    "question_type": " ".join(question.lower().split()[:3]),
                    "multiple_choice_answer": max(set(answers), key=answers.count),
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
                    ],
                })
            shard_samples.append((f"{scene.image_id:09d}", data, caps, scene.image_id, rel))
            scenes_json.append({
                "image_id": scene.image_id, "file": rel, "colour": scene.colour, "shape": scene.shape,
                "size": scene.size, "count": scene.count, "position": scene.position,
            })
        _write_json(corpus.karpathy_split_json(split), lavis)
        _write_json(corpus.scenes_json(split), scenes_json)
        info = {"description": "qformer_lightning synthetic corpus", "version": "1"}
        _write_json(corpus.vqa_questions(split), {
            "info": info, "task_type": "Open-Ended", "data_type": "synthetic", "license": {},
            "data_subtype": split, "questions": questions_json,
        })
        _write_json(corpus.vqa_annotations(split), {
            "info": info, "license": {}, "data_type": "synthetic", "data_subtype": split,
            "annotations": annotations_json,
        })
        if split in SHARD_SPLITS:
            _write_shards(out / "shards" / split, shard_samples, params["shard_size"])
    _write_json(corpus.karpathy_json, {"dataset": "synthetic", "images": karpathy_images})


def _write_shards(directory: Path, samples: list[tuple[str, bytes, list[str], int, str]], shard_size: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, lo in enumerate(range(0, len(samples), shard_size)):
        chunk = samples[lo : lo + shard_size]
        name = f"{index:05d}"
        with tarfile.open(directory / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, caps, image_id, rel in chunk:
                meta = {"key": key, "url": rel, "image_id": image_id, "captions": caps, "status": "success"}
                _tar_add(tar, f"{key}.jpg", data)
                _tar_add(tar, f"{key}.txt", caps[0].encode("utf-8"))
                _tar_add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        stats = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_resize": 0}
        _write_json(directory / f"{name}_stats.json", stats)


@dataclass
class SyntheticCorpusConfig:
    """Where and how to generate the synthetic corpus when a data module needs it.

    Args:
        root: corpus directory; generated (once) if missing.
        num_train, num_val, num_test: images per split.
        image_size: image side in pixels.
        seed: generation seed.
        shard_size: samples per shard.
    """

    root: str = "data/synthetic"
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 200
    image_size: int = 64
    seed: int = 0
    shard_size: int = 250

    def make(self) -> SyntheticCorpus:
        """Generate the corpus if it is not there yet; returns its paths."""
        return make_synthetic_corpus(**asdict(self))
