"""Caption and question cleanup, reproducing BLIP's ``pre_caption`` / ``pre_question``.

BLIP (and LAVIS's ``BlipCaptionProcessor`` / ``BlipQuestionProcessor``) clean text like this:

- caption: lowercase; each of ``. ! " ( ) * # : ; ~`` becomes a space (commas, apostrophes,
  question marks and other characters stay); runs of two or more whitespace characters become one
  space; trailing newlines and surrounding spaces are stripped; the caption is cut to ``max_words``
  words (split on single spaces).
- question: lowercase; the same characters are deleted (not replaced by a space); trailing spaces
  are stripped; cut to ``max_words`` words.

A single tab or newline inside a caption is kept, exactly as BLIP does (only runs of two or more
whitespace characters are collapsed).
"""

from __future__ import annotations

import re

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean ``caption`` as BLIP's ``pre_caption`` (module docstring); may return ``""``."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean ``question`` as BLIP's ``pre_question`` (module docstring)."""
    question = _PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question
