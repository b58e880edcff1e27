"""VQA accuracy under the official VQAv2 protocol (``vqaEval.py`` of the VQA evaluation tools).

Answer normalisation, reproduced rule for rule (including the quirks, so numbers match the
official server and LAVIS):

1. ``process_punctuation``: for each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: if the
   *original* text contains that mark followed or preceded by a space, or contains a digit-comma-
   digit pattern anywhere (``1,000``), the mark is deleted; otherwise it is replaced by a space
   (``t-shirt`` -> ``t shirt``, ``yes!`` -> ``yes `` with a trailing space). Then every period
   not followed by a digit is deleted (``3.5`` keeps its period); the official code passes
   ``re.UNICODE`` (= 32) where ``re.sub`` expects ``count``, so at most 32 periods go.
2. ``process_digit_article``: lower-case, split on whitespace, number words ``none``/``zero`` ..
   ``ten`` -> digits (``none`` -> ``0``), articles ``a an the`` dropped, missing apostrophes
   restored (``dont`` -> ``don't``), joined with single spaces.

Scoring one question with answers ``a_1..a_n`` and prediction ``p``:

- ``p`` is stripped (newlines/tabs -> spaces) and fully normalised (steps 1 and 2).
- The human answers are used as given, except that when the annotators disagree
  (``len(set(answers)) > 1``) each one goes through step 1 only (no lower-casing, no number
  words, no articles).
- Each answer is left out in turn (by position, as the official code does by answer id):
  ``acc_i = min(1, #{j != i : a_j == p} / 3)``; the question scores ``mean_i acc_i``.

Datasets with fewer answers:

- OK-VQA: its annotation file (VQA format) already lists 10 answers per question, the 5 raw
  answers each repeated twice; pass those 10 unchanged and the score is the official one.
- GQA: one answer. Leave-one-out is undefined for one answer, so a single answer means exact
  match after full normalisation (steps 1 and 2) of both the prediction and the answer, scoring
  0 or 1. LAVIS' GQA task differs: it normalises only the prediction and compares it with the raw
  answer, so an answer that normalisation changes (an article, a number word, punctuation) can
  never match there and may match here.
- Any other count ``n >= 2`` uses the leave-one-out rule above with ``n`` answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torchmetrics
from torch import Tensor

__all__ = [
    "VQAAccuracy",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
]

# Marks handled by the space rule, in the official order (order matters only for identical marks).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A comma between two digits switches every mark to deletion for the whole answer.
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Official pattern "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) look-ahead that never
# fails in front of a period, so it is exactly "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): re.UNICODE lands on `count`.
_MAX_PERIODS_REMOVED = int(re.UNICODE)

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less spellings -> official spelling. Entries with capitals never match (words are
# lower-cased first) and "somebody'd" -> "somebodyd" is reversed: both kept as in the official table.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

# Per-question scores are accumulated as integers in units of 1 / _UNITS: a question with n
# answers scores sum_i min(3, m_i) / (3 n), an exact multiple of 1 / _UNITS for every n that
# divides lcm(1..20). Integer state is exact, order-independent and immune to the dtype casts
# Lightning applies to a module (bf16-true would otherwise cast a float sum to bfloat16).
_LCM = math.lcm(*range(1, 21))
_UNITS = 3 * _LCM


def process_punctuation(text: str) -> str:
    """Step 1 of the official normalisation (see the module docstring); does not strip."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Step 2 of the official normalisation: lower-case, number words, articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Full normalisation applied to a predicted answer: whitespace, punctuation, digits/articles.

    Examples: ``"Two"`` -> ``"2"``, ``"the cat."`` -> ``"cat"``, ``"dont"`` -> ``"don't"``,
    ``"1,000"`` -> ``"1000"``, ``"yes!"`` -> ``"yes"``.
    """
    cleaned = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(cleaned))


def _score_units(prediction: str, answers: Sequence[str]) -> int:
    """Per-question accuracy in units of 1 / ``_UNITS`` (see :func:`vqa_accuracy`)."""
    if isinstance(answers, str):
        raise TypeError(f"answers must be a sequence of strings, got the string {answers!r}")
    num = len(answers)
    if num == 0:
        raise ValueError(f"no human answers given for the prediction {prediction!r}")
    predicted = normalize_answer(prediction)
    if num == 1:  # GQA: exact match after full normalisation of both sides (LAVIS: of the prediction only).
        return _UNITS if normalize_answer(answers[0]) == predicted else 0
    references = list(answers)
    if len(set(references)) > 1:
        references = [process_punctuation(answer) for answer in references]
    total = sum(answer == predicted for answer in references)
    # Leaving answer i out leaves total - [a_i == p] matches among the others.
    capped = sum(min(3, total - (answer == predicted)) for answer in references)
    # capped / (3 num) in units of 1 / (3 L) is capped * L / num: exact when num divides L.
    if _LCM % num == 0:
        return capped * (_LCM // num)
    return round(capped * _LCM / num)  # e.g. more than 20 answers: rounded to 1 / _UNITS


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one question, in [0, 1].

    Args:
        prediction: the model's answer (raw text; it is normalised here).
        answers: the human answers as given in the annotation (10 for VQAv2 / OK-VQA; one means
            exact match, GQA style). See the module docstring for the exact rules.

    Returns:
        mean over left-out answers of ``min(1, matches among the others / 3)``.
    """
    return _score_units(prediction, answers) / _UNITS


class VQAAccuracy(torchmetrics.Metric):
    """Mean official VQA accuracy over questions, in percent, synchronised across ranks.

    ``update(predictions, answers)``: ``predictions`` is a list of B answer strings, ``answers``
    a list of B lists of human answers (see :func:`vqa_accuracy`). ``compute()`` returns a
    float64 scalar tensor ``100 * sum(acc) / #questions``.

    States (both int64, summed across ranks): ``score_units``, the sum of per-question accuracies
    in exact units of ``1 / 3 lcm(1..20)``, and ``count``, the number of questions.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    score_units: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        """Args: kwargs are passed to ``torchmetrics.Metric`` (``sync_on_compute``, ...)."""
        super().__init__(**kwargs)
        self.add_state("score_units", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        """Add B questions: ``predictions[b]`` scored against ``answers[b]``."""
        if len(predictions) != len(answers):
            raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists")
        units = sum(_score_units(prediction, refs) for prediction, refs in zip(predictions, answers))
        self.score_units += units
        self.count += len(predictions)

    def compute(self) -> Tensor:
        """Accuracy in percent (float64 scalar); NaN when no question was seen."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.score_units.double() * (100.0 / _UNITS) / self.count.double()
