"""The grounding probe: its scoring against hand-made captions, the distinct ratio, VQA accuracy per
question type, clear errors, and one end-to-end run on a tiny caption checkpoint written by a tiny
``fit`` over a tiny generated corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "predict"))
from predict_tiny import VISION, llm_overrides, qformer, save_tokenizer, stage1_config, write_config  # noqa: E402
from stage2_tiny import word_tokenizer  # noqa: E402  (on the path through predict_tiny)

from qformer_lightning.data.synthetic import make_synthetic_corpus  # noqa: E402
from qformer_lightning.data.text import pre_question  # noqa: E402
from qformer_lightning.probe import (  # noqa: E402
    attribute_correct,
    distinct_ratio,
    load_images,
    load_task,
    named_counts,
    probe,
    question_kind,
    read_scenes,
    vqa_figures,
    words_of,
)

ROOT = Path(__file__).resolve().parents[2]
ONE = {"image_id": 1, "file": "test/a.jpg", "colour": "red", "shape": "circle", "size": "small", "count": 1, "position": "top left"}
TWO = {"image_id": 2, "file": "test/b.jpg", "colour": "orange", "shape": "triangle", "size": "large", "count": 2, "position": None}


# ---------------------------------------------------------------------------- scoring by hand


@pytest.mark.parametrize("caption, scene, attribute, right", [
    ("A small red circle at the top left.", ONE, "colour", True),
    ("a small blue circle", ONE, "colour", False),  # wrong colour
    ("a red and blue circle", ONE, "colour", False),  # the true colour and another
    ("a circle", ONE, "colour", False),  # no colour named
    ("Two orange triangles.", TWO, "colour", True),
    ("a small red circle", ONE, "shape", True),
    ("red circles", ONE, "shape", True),  # the plural names the shape
    ("a red circle next to a square", ONE, "shape", False),  # two shapes
    ("two large orange triangles", TWO, "shape", True),
    ("a picture of two squares", TWO, "shape", False),
    ("a small red circle", ONE, "count", True),  # "a" + singular shape: one
    ("There is a red circle", ONE, "count", True),
    ("one red circle", ONE, "count", True),
    ("an orange triangle", TWO, "count", False),  # "an" + singular: one, the scene has two
    ("two orange triangles", TWO, "count", True),
    ("2 orange triangles", TWO, "count", True),  # a digit names the count too
    ("a picture of two orange triangles", TWO, "count", True),  # "a picture" is no count
    ("three orange triangles", TWO, "count", False),
    ("orange triangles", TWO, "count", False),  # a plural without a number names no count
    ("a red circle and two circles", ONE, "count", False),  # one and two
    ("a picture of a picture of a picture of", ONE, "count", False),
])
def test_attribute_scoring_by_hand(caption: str, scene: dict, attribute: str, right: bool) -> None:
    assert attribute_correct(caption, scene, attribute) is right


def test_counts_and_words() -> None:
    assert words_of("Two RED circles, 3!") == ["two", "red", "circles", "3"]
    assert named_counts(words_of("a large orange square")) == {1}
    assert named_counts(words_of("a square and three circles")) == {1, 3}
    with pytest.raises(ValueError, match="attribute must be one of"):
        attribute_correct("a red circle", ONE, "size")


def test_distinct_ratio() -> None:
    scenes = [ONE, ONE, TWO, {**TWO, "position": None, "size": "small"}]  # 3 distinct scenes
    assert distinct_ratio(["a red circle", "A red circle.", "x", "y"], scenes) == 1.0  # case, punctuation ignored
    assert distinct_ratio(["same"] * 4, scenes) == pytest.approx(1 / 3)
    assert distinct_ratio(["a", "b", "c", "d"], scenes) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="one caption per scene, got 1 captions for 2 scenes"):
        distinct_ratio(["a"], [ONE, TWO])


def test_vqa_accuracy_per_question_type() -> None:
    questions = ["What color is the circle?", "How many circles are there?", "What shape is shown?",
                 "Is the circle large?", "Where is the circle?", "What color are the squares?"]
    answers = [["red"] * 10, ["2"] * 10, ["circle"] * 10, ["no"] * 10, ["top left"] * 10, ["blue"] * 8 + ["green"] * 2]
    predictions = ["red", "two", "square", "no", "top left", "green"]  # "two" normalises to "2"
    figures = vqa_figures(questions, predictions, answers)
    # colour: 1 and, for "green" (2 of 10 annotators), mean over left-out answers of min(1, matches / 3):
    # 8 x 2/3 (a "blue" left out) + 2 x 1/3 (a "green" left out), over 10
    green = (8 * 2 / 3 + 2 * 1 / 3) / 10
    assert figures["acc_colour"] == pytest.approx(100 * (1 + green) / 2)
    assert figures["acc_count"] == 100 and figures["acc_shape"] == 0 and figures["acc_size"] == 100
    assert figures["acc_position"] == 100
    assert figures["acc"] == pytest.approx(100 * (1 + green + 1 + 0 + 1 + 1) / 6)
    assert question_kind("Are the squares large?") == "size" and question_kind("Why?") == "other"
    with pytest.raises(ValueError, match="got 1 questions, 2 predictions"):
        vqa_figures(["q"], ["a", "b"], [["a"]])


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return make_synthetic_corpus(tmp_path_factory.mktemp("probe") / "synthetic", num_train=16, num_val=4, num_test=10,
                                 image_size=28, shard_size=8)


def _caption_config(corpus, tokenizer_dir: Path, run: Path) -> dict:
    vocab = len(word_tokenizer("opt"))
    split = lambda name: {"annotations": str(corpus.karpathy_json), "image_root": str(corpus.image_root), "splits": [name]}  # noqa: E731
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "max_steps": 2, "limit_val_batches": 0, "default_root_dir": str(run),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(run / "ckpt"), "save_last": True}}]},
        "model": {
            "class_path": "qformer_lightning.tasks.caption.Caption",
            "init_args": {
                "prompt": "a photo of", "num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 1, "metrics": ["bleu"],
                "optim": {"lr": 1e-4, "warmup_steps": 0},
                "model": {"class_path": "qformer_lightning.models.blip2_llm.Blip2LLMModel", "init_args": {
                    "vision": VISION, "qformer": qformer(False),
                    "llm": {"class_path": "qformer_lightning.encoders.llm.LanguageModel", "init_args": {
                        "random_init": True, "config_overrides": llm_overrides(vocab), "tokenizer": str(tokenizer_dir),
                        "dtype": "float32", "max_text_length": 8, "max_prompt_length": 16}},
                }},
            },
        },
        "data": {"class_path": "qformer_lightning.data.CaptionDataModule", "init_args": {
            "train": split("train"), "batch_size": 4, "num_workers": 0, "image_size": 28}},
    }


def _fit(config: Path) -> None:
    from qformer_lightning.cli import Blip2CLI

    with mock.patch.object(sys, "argv", sys.argv[:1]):  # pytest's own arguments are not the CLI's
        Blip2CLI(args=["fit", "--config", str(config)])


@pytest.fixture(scope="module")
def caption_checkpoint(corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m qformer_lightning fit`` (in process) of a tiny captioner, 2 steps: ``last.ckpt``."""
    run = tmp_path_factory.mktemp("caption_run")
    config = write_config(run / "caption.yaml", _caption_config(corpus, save_tokenizer(run / "tok"), run))
    _fit(config)
    return run / "ckpt" / "last.ckpt"


def test_probe_of_a_tiny_caption_checkpoint(caption_checkpoint: Path, corpus) -> None:
    report = probe(caption_checkpoint, corpus.root, limit=8, batch_size=4)
    scenes = read_scenes(corpus)[:8]
    assert report.task == "Caption" and report.num_images == 8
    assert report.num_scenes == len({(s["colour"], s["shape"], s["size"], s["count"], s["position"]) for s in scenes})
    expected = {f"{run}/{name}" for run in ("greedy", "beam") for name in ("colour_acc", "shape_acc", "count_acc", "distinct_ratio")}
    assert set(report.figures) == expected | {"grounding_gap", "prompt_cosine"}
    for name, value in report.figures.items():
        if name.endswith("_acc"):
            assert 0.0 <= value <= 1.0, name
    for run in ("greedy", "beam"):
        assert 0 < report.figures[f"{run}/distinct_ratio"] <= 8 / report.num_scenes
    assert -1.0 <= report.figures["prompt_cosine"] <= 1.0 and torch.isfinite(torch.tensor(report.figures["grounding_gap"]))
    assert report.beam_settings["num_beams"] == 2 and len(report.examples) == 8
    line = report.summary()
    assert "\n" not in line and "Caption" in line and "greedy/colour_acc" in line and "grounding_gap" in line
    # the task was rebuilt with the checkpoint's weights: its greedy captions are the report's examples
    task = load_task(caption_checkpoint)
    state = torch.load(caption_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(task.model.projection.weight, state["model.projection.weight"])


def test_probe_tool_prints_the_figures(caption_checkpoint: Path, corpus) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "probe_grounding.py"), str(caption_checkpoint), "--corpus",
                          str(corpus.root), "--limit", "4", "--num-beams", "1", "--json", str(caption_checkpoint.parent / "p.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "greedy/colour_acc" in out.stdout and "grounding_gap" in out.stdout
    figures = json.loads((caption_checkpoint.parent / "p.json").read_text())["figures"]
    assert figures["beam/colour_acc"] == figures["greedy/colour_acc"]  # --num-beams 1: the beam run is greedy


def test_clear_errors(caption_checkpoint: Path, corpus, tmp_path) -> None:
    old = tmp_path / "old"
    with pytest.raises(FileNotFoundError, match="no synthetic corpus at .*old"):
        probe(caption_checkpoint, old)
    old.mkdir()
    (old / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="predates the scenes files; regenerate it"):
        probe(caption_checkpoint, old)
    with pytest.raises(FileNotFoundError, match="missing.ckpt not found .*model.init_args.pretrained"):
        load_task(caption_checkpoint, pretrained=["runs/nowhere/missing.ckpt"])
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.ckpt not found"):
        load_task(tmp_path / "nothing.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ValueError, match="not written by qformer_lightning"):
        load_task(plain)


def test_a_stage1_checkpoint_is_refused(corpus, tmp_path) -> None:
    config = stage1_config()
    config["trainer"].update(max_steps=1, limit_val_batches=0, default_root_dir=str(tmp_path),
                             enable_checkpointing=True, callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                                     "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}])
    config["data"] = {"class_path": "qformer_lightning.data.CaptionDataModule", "init_args": {
        "train": {"annotations": str(corpus.karpathy_json), "image_root": str(corpus.image_root), "splits": ["train"]},
        "batch_size": 4, "num_workers": 0, "image_size": 28}}
    _fit(write_config(tmp_path / "s1.yaml", config))
    with pytest.raises(ValueError, match="is a Stage1 checkpoint: the probe generates text"):
        load_task(tmp_path / "ckpt" / "last.ckpt")


def test_vqa_figures_of_a_tiny_vqa_task(corpus) -> None:
    """The VQA branch on a tiny task (question through the Q-Former): every question type of the
    probed images is scored, with the task's own answers."""
    sys.path.insert(0, str(ROOT / "tests" / "finetune"))
    from finetune_tiny import BERT, tiny_model

    from qformer_lightning.probe import probe_vqa
    from qformer_lightning.tasks.vqa import VQA

    task = VQA(tiny_model("opt", text_ffn=True), tokenizer=BERT, max_question_length=16, num_beams=1, max_new_tokens=2)
    task.configure_model()
    scenes = read_scenes(corpus)[:3]
    figures, examples = probe_vqa(task.eval(), corpus, scenes, batch_size=4)
    kinds = {"colour", "count", "shape", "size"} | ({"position"} if any(s["position"] for s in scenes) else set())
    assert {f"vqa/acc_{k}" for k in kinds} | {"vqa/acc", "grounding_gap", "prompt_cosine"} == set(figures)
    assert all(0.0 <= figures[f"vqa/acc_{k}"] <= 100.0 for k in kinds)
    question, answer = examples[0]
    with torch.no_grad():
        images = load_images(corpus, [scenes[0]["file"]], task.model.vision)
        assert task.answer(images, [pre_question(question)]) == [answer]
