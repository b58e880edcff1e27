"""The Q-Former's tokenizer: BERT's WordPiece vocabulary plus BLIP-2's ``[DEC]`` token.

``[DEC]`` starts the text of the image-grounded generation pass (ITG) in place of ``[CLS]``; it is
added as the tokenizer's ``bos_token`` and gets the id right after BERT's vocabulary
(bert-base-uncased: 30522, so 30523 tokens in all, the Q-Former's ``vocab_size``).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MIN_BERT_VOCAB = 1000
"""Below this many tokens a loaded 'BERT' vocabulary is taken for a failed (empty) load."""


def _advice(name_or_path: str) -> str:
    return (
        f"Without network access (or with HF_HUB_OFFLINE=1 and nothing cached) pass a local directory: save it "
        f"where the hub is reachable with AutoTokenizer.from_pretrained({name_or_path!r}).save_pretrained(dir), "
        f"or use a directory holding vocab.txt / tokenizer.json."
    )


def build_tokenizer(name_or_path: str | Path = "bert-base-uncased", expected_size: int | None = None) -> PreTrainedTokenizerBase:
    """Load BERT's tokenizer and add ``[DEC]`` as its ``bos_token``.

    Args:
        name_or_path: a hub id or a local directory with a BERT vocabulary.
        expected_size: the number of tokens after adding ``[DEC]`` (bert-base-uncased: 30523);
            None checks only that the vocabulary is a real one.

    Returns:
        The tokenizer (``len(tokenizer)`` = BERT's vocabulary + 1, ``bos_token == "[DEC]"``).

    Raises:
        OSError: the tokenizer cannot be loaded (offline, not cached, no such directory), or it
            loaded almost empty (some offline paths return a 5-token vocabulary instead of failing);
            the message says to pass a local directory.
    """
    name = str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load the tokenizer {name!r}: {err}. {_advice(name)}") from err
    vocab = tokenizer.get_vocab()
    absent = [tok for tok in BERT_SPECIAL_TOKENS if tok not in vocab]
    if len(vocab) < MIN_BERT_VOCAB or absent:
        raise OSError(
            f"the tokenizer loaded from {name!r} has {len(vocab)} tokens"
            + (f" and lacks {absent}" if absent else "")
            + f": not a BERT vocabulary (an offline load can come back almost empty). {_advice(name)}"
        )
    if DEC_TOKEN not in vocab:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    else:
        tokenizer.bos_token = DEC_TOKEN
    if expected_size is not None and len(tokenizer) != expected_size:
        raise OSError(f"the tokenizer from {name!r} has {len(tokenizer)} tokens with [DEC], expected {expected_size}")
    return tokenizer
