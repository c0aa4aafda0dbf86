"""Finding the digits of a number: touching digits split, broken strokes merged, no model needed."""

import io

import numpy as np
import pytest
from PIL import Image

from deepdigits.errors import DeepDigitsError
from deepdigits.recognize import read_digits, read_number
from deepdigits.segment import find_digits, segment_digits
from deepdigits.synthetic import render_number


def test_touching_digits_are_split(mnist):
    # two digits pasted so their strokes overlap by a few pixels
    a, b = (np.asarray(Image.fromarray(255 - mnist.x_test[i]).resize((120, 120))) for i in (1, 3))  # 2 and 0
    canvas = np.full((200, 300), 255, np.uint8)
    canvas[40:160, 30:150] = np.minimum(canvas[40:160, 30:150], a)
    canvas[40:160, 128:248] = np.minimum(canvas[40:160, 128:248], b)
    reading = read_number(canvas)
    assert reading.number == "20"


def test_finding_digits_needs_no_model_and_reading_them_matches_read_number(mnist):
    # the server cuts digits out before it takes the inference lock, so this split must not change answers
    rng = np.random.default_rng(3)
    image = render_number([mnist.x_test[i] for i in (0, 1, 2)], rng)  # 7 2 1
    found = find_digits(image)
    assert found.crops.shape == (3, 28, 28) and found.crops.dtype == np.uint8
    assert found.size == Image.open(io.BytesIO(image)).size
    whole = read_number(image)
    assert read_digits(found).to_dict() == whole.to_dict() and whole.number == "721"
    assert [d.box for d in whole.digits] == found.boxes
    with pytest.raises(DeepDigitsError, match="blank"):
        find_digits(np.full((50, 80), 255, np.uint8), name="empty.png")


def test_broken_stroke_is_merged(mnist):
    digit = np.asarray(Image.fromarray(mnist.x_test[15]).resize((140, 140))).copy()  # a 5
    digit[52:56, :] = 0  # cut the 5's flag off horizontally
    pieces = segment_digits(np.pad(digit, 30).astype(np.float32) / 255)
    assert len(pieces) == 1
