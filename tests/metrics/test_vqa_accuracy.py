"""VQA accuracy: official normalisation rules and the leave-one-out score, by hand."""

from __future__ import annotations

import random

import pytest
import torch

from qformer_lightning.metrics.vqa import (
    VQAAccuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number word -> digit after lower-casing
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten (and none) are mapped
        ("none", "0"),
        ("the cat.", "cat"),  # trailing period removed, article dropped
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("whats up?", "what's up"),
        ("Im", "im"),  # the table's capitalised keys never match lower-cased words
        ("somebody'd", "somebodyd"),  # reversed entry of the official table
        ("1,000", "1000"),  # digit-comma-digit: marks are deleted, not spaced
        ("1,000 dogs!", "1000 dogs"),  # ... for every mark of the answer
        ("yes!", "yes"),
        ("t-shirt", "t shirt"),  # no space next to the mark: replaced by a space
        ("red,white", "red white"),
        ("red, white", "red white"),  # space next to the mark: deleted
        ("3.5", "3.5"),  # period before a digit kept
        ("5.", "5"),
        ("a.m.", "am"),
        ("(left)", "left"),
        ("  hello\tworld\n", "hello world"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_punctuation_quirks() -> None:
    assert process_punctuation("yes!") == "yes "  # no strip in step 1
    assert process_punctuation("a, b") == "a b"
    assert process_punctuation("it's") == "it's"  # apostrophes and colons are not in the list
    assert process_punctuation("10:30") == "10:30"
    # re.UNICODE (32) lands on re.sub's count: only 32 periods are removed.
    assert process_punctuation("." * 40) == "." * 8
    assert process_digit_article("The  TWO  an") == "2"


def _brute_force(prediction: str, answers: list[str]) -> float:
    """Leave-one-out reference written from the protocol text."""
    predicted = normalize_answer(prediction)
    refs = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    scores = []
    for left_out in range(len(refs)):
        matches = sum(1 for j, ref in enumerate(refs) if j != left_out and ref == predicted)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize(
    ("num_matching", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # left out: 0; the 9 others: 1/3 each -> 3/10
        (2, 0.6),  # 2 x 1/3 + 8 x 2/3 = 6 -> 6/10
        (3, 0.9),  # 3 x 2/3 + 7 x 1 = 9 -> 9/10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_accuracy_hand_computed(num_matching: int, expected: float) -> None:
    answers = ["cat"] * num_matching + ["dog"] * (10 - num_matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_prediction_normalised_answers_only_punctuated() -> None:
    assert vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("The cat!", ["cat"] * 10) == 1.0
    # The human answers never get number words or articles mapped (official behaviour).
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    assert vqa_accuracy("the cat", ["the cat"] * 3 + ["dog"] * 7) == 0.0
    # Disagreeing annotators: their punctuation is processed ("t-shirt" -> "t shirt").
    assert vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # Agreeing annotators are used verbatim.
    assert vqa_accuracy("t shirt", ["t-shirt"] * 10) == 0.0


def test_fewer_answers() -> None:
    # OK-VQA: 5 answers each repeated twice; "cat" given by 1 of the 5 annotators -> 2 of 10.
    okvqa = [a for a in ["cat", "dog", "pet", "animal", "kitten"] for _ in range(2)]
    assert vqa_accuracy("cat", okvqa) == pytest.approx(0.6)
    # GQA: one answer = exact match after normalising both sides.
    assert vqa_accuracy("The Cat.", ["cat"]) == 1.0
    assert vqa_accuracy("two", ["Two"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    # Three answers: leave-one-out over 3. Two say "cat": left-out cat -> 1/3, dog -> 2/3.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_random_against_brute_force() -> None:
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "the cat", "cat", "cat.", "yes!", "red, white", "red,white", "1,000"]
    for _ in range(2000):
        answers = [rng.choice(pool) for _ in range(rng.choice([2, 3, 5, 10, 10, 23]))]
        prediction = rng.choice(pool)
        assert vqa_accuracy(prediction, answers) == pytest.approx(_brute_force(prediction, answers), abs=1e-8)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="no human answers"):
        vqa_accuracy("cat", [])
    with pytest.raises(TypeError, match="sequence of strings"):
        vqa_accuracy("cat", "cat")
    with pytest.raises(ValueError, match="2 predictions but 1"):
        VQAAccuracy().update(["a", "b"], [["a"]])


def test_metric_percent_and_merge() -> None:
    batches = [
        (["cat", "Two"], [["cat"] * 3 + ["dog"] * 7, ["2"] * 10]),  # 0.9, 1.0
        (["no"], [["yes"] * 9 + ["no"]]),  # 0.3
    ]
    expected = 100 * (0.9 + 1.0 + 0.3) / 3
    single = VQAAccuracy()
    for predictions, answers in batches:
        single.update(predictions, answers)
    assert single.compute().item() == pytest.approx(expected, abs=1e-9)

    first, second = VQAAccuracy(), VQAAccuracy()
    first.update(*batches[0])
    second.update(*batches[1])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(expected, abs=1e-9)
    assert int(first.count) == 3


def test_metric_state_survives_bf16_cast() -> None:
    metric = VQAAccuracy().to(torch.bfloat16)  # what a bf16-true LightningModule cast does
    for _ in range(1000):
        metric.update(["cat"], [["cat"] * 3 + ["dog"] * 7])
    metric.update(["cat"], [["dog"] * 10])
    assert metric.score_units.dtype == torch.int64
    assert metric.compute().item() == pytest.approx(100 * 900 / 1001, abs=1e-9)
