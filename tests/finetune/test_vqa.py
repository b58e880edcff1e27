"""VQA task: the question reaches the Q-Former, the answer never reaches the LLM's input side,
evaluation end to end (Trainer + VQADataModule + gathering + results JSON) equals a hand count,
deterministic generation, zero-shot settings, training step."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from finetune_tiny import BERT, IMAGE_SIZE, tiny_model

from qformer_lightning.data import VQADataModule
from qformer_lightning.data.vqa_datamodule import VQAFiles
from qformer_lightning.metrics.vqa import vqa_accuracy
from qformer_lightning.tasks.base import Optimization
from qformer_lightning.tasks.vqa import OPT_VQA_PROMPT, VQA, dedupe_records, most_common_answer

IMAGES = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def _task(kind: str = "t5", **kwargs) -> VQA:
    task = VQA(tiny_model(kind, text_ffn=True), tokenizer=BERT, max_question_length=16, **kwargs)
    task.configure_model()
    return task.eval()


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )


def test_paper_defaults_and_validation() -> None:
    task = VQA(tiny_model("t5", text_ffn=True), tokenizer=BERT)
    assert task.prompt == "Question: {} Short answer:" and task.question_to_qformer
    assert task.generation == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.0)
    assert task.llm_prompts(["what is it?"]) == ["Question: what is it? Short answer:"]
    assert OPT_VQA_PROMPT == "Question: {} Answer:"
    with pytest.raises(ValueError, match="text_ffn"):
        VQA(tiny_model("t5", text_ffn=False))
    with pytest.raises(ValueError, match="exactly one"):
        VQA(tiny_model("t5", text_ffn=True), prompt="Question: Answer:")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        VQA(tiny_model("t5", text_ffn=True), max_question_length=64)
    zero_shot = VQA(tiny_model("t5"), question_to_qformer=False)  # no text parts needed
    assert zero_shot.qformer_question(["what?"]) is None


def test_question_tokens_reach_the_qformer() -> None:
    task = _task()
    model = task.model
    a = model.query_outputs(IMAGES, task.qformer_question(["what color is the circle?"] * 2))
    b = model.query_outputs(IMAGES, task.qformer_question(["how many squares are there?"] * 2))
    assert a.shape == (2, 4, 32)  # only the Q query positions
    assert (a - b).abs().max() > 1e-4  # same images, only the question differs
    again = model.query_outputs(IMAGES, task.qformer_question(["what color is the circle?"] * 2))
    torch.testing.assert_close(a, again)
    # padding a question does not change its queries (mask honoured): batch with a longer question
    mixed = model.query_outputs(IMAGES, task.qformer_question(["what color is the circle?", "how many big red squares are on the left?"]))
    torch.testing.assert_close(mixed[0], a[0], atol=1e-5, rtol=1e-5)
    # zero-shot: the queries do not depend on the question
    plain = model.query_outputs(IMAGES)
    assert (plain - a).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["t5", "opt"])
def test_answer_never_enters_the_llm_input_or_the_qformer(kind: str, monkeypatch) -> None:
    task = _task(kind)
    llm = task.model.llm
    seen = {}
    layout, tokenize = llm.training_inputs, task.qformer_question

    def spy_layout(*args, **kwargs):
        seen["inputs"] = layout(*args, **kwargs)
        return seen["inputs"]

    def spy_question(questions):
        seen["questions"] = list(questions)
        return tokenize(questions)

    monkeypatch.setattr(llm, "training_inputs", spy_layout)
    monkeypatch.setattr(task, "qformer_question", spy_question)
    batch = {
        "image": IMAGES, "text": ["what is on the water", "what color is the sky"],
        "answers": [["boat"] * 6 + ["bike"] * 4, ["blue", "blue", "red"]], "question_id": torch.tensor([7, 8]),
    }
    loss = task.compute_loss(batch)
    assert torch.isfinite(loss)
    assert seen["questions"] == ["what is on the water", "what color is the sky"]  # the Q-Former sees questions only
    inputs = seen["inputs"]
    prompt_ids = llm.prompt_ids(task.llm_prompts(batch["text"]))
    answer_ids = llm.target_ids(["boat", "blue"])  # most common answers + stop token
    for row in range(2):
        ids = inputs.input_ids[row].tolist()
        if kind == "t5":  # encoder input: exactly the prompt (then padding); the answer is the decoder target
            real = ids[: len(prompt_ids[row])]
            assert real == prompt_ids[row]
            assert all(t == llm.pad_token_id for t in ids[len(real):])
            labels = [t for t in inputs.labels[row].tolist() if t != -100]
        else:  # decoder-only: [prompt | answer | pad], labels only on the answer
            labels_row = inputs.labels[row, -len(ids):].tolist()
            start = next(i for i, t in enumerate(labels_row) if t != -100)
            assert ids[:start] == prompt_ids[row]
            labels = [t for t in labels_row if t != -100]
        assert labels == answer_ids[row]
        answer_token = answer_ids[row][0]
        assert answer_token not in prompt_ids[row]


def test_most_common_answer_and_dedupe() -> None:
    assert most_common_answer(["2", "two", "two", "2", "3"]) == "2"  # tie: first listed
    assert most_common_answer(["yes"]) == "yes"
    with pytest.raises(ValueError, match="question 5"):
        most_common_answer([], 5)
    records = [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"}, {"question_id": 1, "answer": "c"}]
    assert dedupe_records(records) == records[:2]


def test_generation_is_deterministic() -> None:
    task = _task("opt", num_beams=3, max_new_tokens=4)
    questions = ["what color is the circle?", "how many squares are there?"]
    first = task.answer(IMAGES, questions)
    assert task.answer(IMAGES, questions) == first and len(first) == 2


# ------------------------------------------------------------------ end to end evaluation

# question -> (prediction, human answers); accuracies by hand (official leave-one-out, min(1, m/3)):
#  "two" -> "2": all 10 answers match, each left-out set has 9 matches -> 1
#  "red" vs 2 x red + 8 x blue: a left-out red leaves 1 match (1/3), a left-out blue 2 (2/3):
#     (2 * 1/3 + 8 * 2/3) / 10 = 0.6
#  "the circle." -> "circle" vs 3 x circle + 7 x square: left-out circle 2 (2/3), square 3 (1):
#     (3 * 2/3 + 7 * 1) / 10 = 0.9
#  "green" vs 10 x yellow -> 0
CASES = {
    "how many circles are there?": ("two", ["2"] * 10),
    "what color is the square?": ("red", ["red"] * 2 + ["blue"] * 8),
    "what shape is it?": ("the circle.", ["circle"] * 3 + ["square"] * 7),
    "what color is the triangle?": ("green", ["yellow"] * 10),
}
HAND_COUNT = 100 * (1 + 0.6 + 0.9 + 0) / 4


def _vqa_files(corpus, tmp_path) -> VQAFiles:
    """Four questions on the corpus's val images, in the official VQAv2 format."""
    val = json.loads(corpus.vqa_questions("val").read_text())
    image_ids = sorted({q["image_id"] for q in val["questions"]})
    questions, annotations = [], []
    for n, (question, (_, answers)) in enumerate(CASES.items()):
        qid = 1000 + n
        questions.append({"image_id": image_ids[n % len(image_ids)], "question": question, "question_id": qid})
        annotations.append({
            "question_id": qid, "image_id": image_ids[n % len(image_ids)], "answer_type": "other",
            "question_type": "what", "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        })
    header = {k: v for k, v in val.items() if k != "questions"}
    (tmp_path / "q.json").write_text(json.dumps({**header, "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"data_subtype": val["data_subtype"], "annotations": annotations}))
    return VQAFiles(str(tmp_path / "q.json"), str(corpus.image_root), str(tmp_path / "a.json"))


def test_evaluation_accuracy_equals_hand_count(corpus, tmp_path, monkeypatch) -> None:
    task = _task("t5", results_dir=str(tmp_path / "results"))
    files = _vqa_files(corpus, tmp_path)
    data = VQADataModule(test=files, batch_size=3, num_workers=0, image_size=IMAGE_SIZE)
    by_question = {q: prediction for q, (prediction, _) in CASES.items()}
    generated = task.model.caption

    def answers_for(images, prompts, question, **settings):
        assert settings == task.generation and question is not None
        generated(images, prompts, question, **settings)  # the real generation runs too
        return [by_question[p[len("Question: "): -len(" Short answer:")]] for p in prompts]

    monkeypatch.setattr(task.model, "caption", answers_for)
    logged = _trainer(tmp_path).test(task, datamodule=data, verbose=False)[0]
    assert logged["test/vqa_acc"] == pytest.approx(HAND_COUNT, abs=1e-9)
    assert HAND_COUNT == pytest.approx(sum(vqa_accuracy(p, a) for p, a in CASES.values()) * 25)
    results = json.loads((tmp_path / "results" / "vqa_test_step0.json").read_text())
    assert results == [{"question_id": 1000 + n, "answer": p} for n, (p, _) in enumerate(CASES.values())]


def test_evaluation_with_real_generation_and_no_answers(corpus, tmp_path) -> None:
    """Generated answers are scored as the metric scores the results file; questions without
    answers (test-dev) give a results file and no accuracy."""
    task = _task("opt", num_beams=2, max_new_tokens=3, results_dir=str(tmp_path / "results"))
    files = VQAFiles(str(corpus.vqa_questions("val")), str(corpus.image_root), str(corpus.vqa_annotations("val")))
    data = VQADataModule(test=files, batch_size=8, num_workers=0, image_size=IMAGE_SIZE)
    data.setup()
    questions = data.eval_dataset("test").questions[:10]
    data.eval_dataset("test").questions = questions
    logged = _trainer(tmp_path).test(task, datamodule=data, verbose=False)[0]
    results = json.loads((tmp_path / "results" / "vqa_test_step0.json").read_text())
    assert [r["question_id"] for r in results] == [q.question_id for _, q in questions]
    expected = 100 * sum(vqa_accuracy(r["answer"], q.answers) for r, (_, q) in zip(results, questions)) / len(questions)
    assert logged["test/vqa_acc"] == pytest.approx(expected, abs=1e-9)

    no_answers = VQAFiles(str(corpus.vqa_questions("val")), str(corpus.image_root))
    data = VQADataModule(test=no_answers, batch_size=8, num_workers=0, image_size=IMAGE_SIZE)
    data.setup()
    data.eval_dataset("test").questions = data.eval_dataset("test").questions[:4]
    logged = _trainer(tmp_path).test(task, datamodule=data, verbose=False)[0]
    assert "test/vqa_acc" not in logged
    assert len(json.loads((tmp_path / "results" / "vqa_test_step0.json").read_text())) == 4


def test_finetune_fit_updates_vit_and_qformer_text_parts(corpus, tmp_path) -> None:
    task = VQA(tiny_model("t5", text_ffn=True), tokenizer=BERT, max_question_length=16,
               optim=Optimization(lr=1e-3, warmup_steps=0, total_steps=2))
    task.configure_model()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    files = VQAFiles(str(corpus.vqa_questions("train")), str(corpus.image_root), str(corpus.vqa_annotations("train")))
    data = VQADataModule(train=[files], batch_size=4, num_workers=0, image_size=IMAGE_SIZE)
    _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(task, datamodule=data)
    changed = {n for n, p in task.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "model.vision.vit.blocks.0.attn.qkv.weight" in changed
    assert "model.qformer.layers.0.text_ffn.fc1.weight" in changed and "model.qformer.word_embeddings.weight" in changed
    assert not any(n.startswith("model.llm.") for n in changed)


def test_predict_on_user_requests_feeds_questions_to_the_qformer() -> None:
    """`predict` with PredictDataModule batches: a question is answered as in evaluation (question to
    the Q-Former too), a caption request in the same batch takes the generic stage-2 path."""
    task = _task("opt", prompt=OPT_VQA_PROMPT, num_beams=1, max_new_tokens=4)
    batch = {
        "image": IMAGES,
        "request": [{"image": "a.jpg", "task": "question", "question": "what color is the circle?"},
                    {"image": "b.jpg", "task": "caption"}],
    }
    records = task.predict_step(batch, 0)
    assert [r["image"] for r in records] == ["a.jpg", "b.jpg"]
    assert records[0]["llm_prompt"] == "Question: what color is the circle? Answer:"
    assert records[0]["output"] == task.answer(IMAGES[:1], ["what color is the circle?"])[0]
    assert records[1]["task"] == "caption" and isinstance(records[1]["output"], str)


def test_question_ids_beyond_the_qformer_vocabulary_are_refused() -> None:
    task = _task("t5")
    task.model.qformer.word_embeddings = torch.nn.Embedding(100, 32)  # a Q-Former built for another tokenizer
    with pytest.raises(ValueError, match=r"gives id \d+ but the Q-Former has vocab_size=100"):
        task.qformer_question(["what is on the water"])
