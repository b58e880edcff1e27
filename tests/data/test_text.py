"""BLIP caption/question cleanup, against hand-computed outputs of BLIP's pre_caption/pre_question."""

from qformer_lightning.data.text import pre_caption, pre_question


def test_pre_caption_matches_blip() -> None:
    assert pre_caption("A man (riding) a WAVE!  on a board.") == "a man riding a wave on a board"
    assert pre_caption("It's a dog, isn't it?") == "it's a dog, isn't it?"  # , ' ? are kept
    assert pre_caption('"Quoted"; #tag: ~x*') == "quoted tag x"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("tab\tinside") == "tab\tinside"  # a single whitespace char is not collapsed
    assert pre_caption("a\n\nb\n") == "a b"
    assert pre_caption(" ... ") == ""


def test_pre_question_matches_blip() -> None:
    assert pre_question("What color is the (big) car?") == "what color is the big car?"
    assert pre_question("Is it a dog.  ") == "is it a dog"
    assert pre_question("a b c d", max_words=3) == "a b c"
