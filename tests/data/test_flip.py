"""Caption-aware horizontal flip (``ImageTransform.hflip_swaps_text``)."""

import io
import random

import numpy as np
from PIL import Image

from qformer_lightning.data.image import ImageTransform, swap_left_right


def test_swap_left_right_whole_words_and_case() -> None:
    assert swap_left_right("a red circle on the left") == "a red circle on the right"
    assert swap_left_right("Left and RIGHT, bright lefty") == "Right and LEFT, bright lefty"
    assert swap_left_right("at the top right.") == "at the top left."


def _png() -> bytes:
    """An 8 x 8 PNG, red on its left half, grey on the right."""
    pixels = np.full((8, 8, 3), 230, dtype=np.uint8)
    pixels[:, :4] = (220, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_with_caption_draws_as_call_and_swaps_only_flipped() -> None:
    transform = ImageTransform(8, True, (1.0, 1.0), hflip_swaps_text=True)
    flipped = 0
    for seed in range(20):
        image, text = transform.with_caption(_png(), "red on the left", random.Random(seed))
        np.testing.assert_array_equal(image, transform(_png(), random.Random(seed)))  # same random draws
        red_on_left = image[:, :4, 1].mean() + 50 < image[:, 4:, 1].mean()  # red: low green channel
        assert text == ("red on the left" if red_on_left else "red on the right")
        flipped += not red_on_left
    assert 0 < flipped < 20
    plain = ImageTransform(8, True, (1.0, 1.0))
    assert all(plain.with_caption(_png(), "on the left", random.Random(s))[1] == "on the left" for s in range(20))
