import io
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from conftest import json_lines
from deepdigits.cli import main
from deepdigits.errors import DeepDigitsError
from deepdigits.linereader import LineReading
from deepdigits.predictor import BUILTIN_MODEL, builtin_model
from deepdigits.preprocess import to_mnist
from deepdigits.recognize import DigitPrediction, NumberReading, combine, predict_digit, read_digits, read_number
from deepdigits.segment import FoundDigits, find_digits
from deepdigits.synthetic import render_digit, render_number


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- the built-in model


def test_builtin_model_is_small_accurate_and_documented(mnist):
    size = sum(p.stat().st_size for p in BUILTIN_MODEL.iterdir())
    assert size < 5_000_000
    meta = json.loads((BUILTIN_MODEL / "model.json").read_text())
    assert meta["command"].startswith("deepdigits train --recipe best")
    assert meta["dataset"]["name"] == "mnist" and meta["metrics"]["accuracy"] >= 0.995
    accuracy = float((builtin_model().predict(mnist.x_test) == mnist.y_test).mean())
    assert accuracy == pytest.approx(meta["metrics"]["accuracy"], abs=1e-4) and accuracy >= 0.995


# --------------------------------------------------------------------------- realistic photos


def test_photos_of_digits_are_recognised(mnist):
    rng = np.random.default_rng(1)
    indices = rng.choice(len(mnist.x_test), 150, replace=False)
    right = sum(predict_digit(render_digit(mnist.x_test[i], rng)).digit == mnist.y_test[i] for i in indices)
    # benchmarks/recognition.py measured 99.2% (496 of 500) with the built-in model; chance is 10%
    assert right / len(indices) >= 0.95


def test_numbers_are_read(mnist):
    rng = np.random.default_rng(2)
    exact, digits_right, digits_total = 0, 0, 0
    trials = 40
    for _ in range(trials):
        count = int(rng.integers(2, 7))
        picks = rng.choice(len(mnist.x_test), count, replace=False)
        truth = "".join(str(mnist.y_test[i]) for i in picks)
        reading = read_number(render_number([mnist.x_test[i] for i in picks], rng))
        exact += reading.number == truth
        if len(reading.number) == len(truth):
            digits_right += sum(a == b for a, b in zip(reading.number, truth, strict=True))
        digits_total += len(truth)
        boxes = [d.box for d in reading.digits]
        assert boxes == sorted(boxes, key=lambda b: b[0])  # left to right
    # benchmarks/recognition.py, clean numbers of 2-6 digits: 208 of 215 read exactly (96.7%)
    assert exact / trials >= 0.85
    assert digits_right / digits_total >= 0.9


# --------------------------------------------------------------------------- the segmenter and the line reader


@dataclass
class _Told(LineReading):
    """A line reading that scores every other number as it is told."""

    others: float = 0.0

    def log_likelihood(self, number: str) -> float:
        return self.others


class _Line:
    """A line reader that reads what it is told: ``combine``'s rules checked without a network."""

    def __init__(self, number: str, probabilities: list[list[float]], log_probability: float,
                 others: float, combine: dict, marks: bool = False) -> None:
        self.number, self.probabilities, self.log_probability = number, np.array(probabilities), log_probability
        self.others, self.document = others, {"combine": combine, "marks": marks}
        self.marks = None

    def read(self, ink, box=None):
        columns = [(10 * k, 10 * k + 8) for k in range(len(self.number))]
        return _Told(self.number, self.probabilities, columns, self.log_probability, None, self.marks,
                     others=self.others)


def _one_hot(digit: int, sure: float) -> list[float]:
    p = [(1 - sure) / 9] * 10
    p[digit] = sure
    return p


def _found_and_reading(digits: list[tuple[int, float]], rejected: int | None = None, apart: bool = False):
    ink = np.zeros((30, 10 * len(digits) + 10), np.float32)
    boxes = [(10 * k, 5, 10 * k + 8, 25) for k in range(len(digits))]
    if apart:  # each piece its own mark
        for left, top, right, bottom in boxes:
            ink[top:bottom, left + 1 : right - 1] = 1.0
    else:  # one run of ink, as digits that touch
        ink[5:25, 2:-2] = 1.0
    found = FoundDigits(np.zeros((len(digits), 28, 28), np.uint8), boxes, (ink.shape[1], ink.shape[0]), ink, 1.0)
    predictions = []
    for k, (digit, sure) in enumerate(digits):
        refused = k == rejected
        predictions.append(DigitPrediction(None if refused else digit, sure, _one_hot(digit, sure), [(digit, sure)],
                                           False, boxes[k], None if refused else str(digit), refused,
                                           "a letter or symbol" if refused else None))
    number = "".join("?" if d.not_a_digit else d.class_name for d in predictions)
    return found, NumberReading(number, predictions, found.size)


def test_the_same_count_read_differently_pools_each_digits_probabilities():
    found, mine = _found_and_reading([(1, 0.6), (7, 0.99)])
    line = _Line("77", [_one_hot(7, 0.9), _one_hot(7, 0.99)], -0.2, -2.0, {"segmenter": 1.0, "line": 1.0, "margin": 0})
    combined = combine(mine, found, line)
    expected = np.array(_one_hot(1, 0.6)) * np.array(_one_hot(7, 0.9))
    assert combined.number == "77"
    assert combined.digits[0].confidence == pytest.approx(expected[7] / expected.sum(), abs=1e-6)
    assert combined.digits[0].box == found.boxes[0] and not combined.unsure
    # a piece the digit model refused stays refused: the line reader never saw a letter
    found, mine = _found_and_reading([(1, 0.6), (7, 0.99)], rejected=0)
    assert combine(mine, found, line).number == "?7"


def test_another_count_is_taken_only_past_the_fitted_margin():
    found, mine = _found_and_reading([(2, 0.9)])  # the segmenter saw one wide digit where two touch
    line = _Line("20", [_one_hot(2, 0.95), _one_hot(0, 0.97)], -0.3, -4.0, {"segmenter": 1, "line": 1, "margin": 2})
    combined = combine(mine, found, line)
    assert combined.number == "20" and [d.digit for d in combined.digits] == [2, 0]
    assert [d.box[0] for d in combined.digits] == sorted(d.box[0] for d in combined.digits)
    assert combined.digits[1].confidence == pytest.approx(0.97)
    line.others = -2.0  # 1.7 more likely, under the margin of 2: the segmenter's reading stands
    assert combine(mine, found, line).number == "2"
    line.others = -4.0
    # a refused piece written apart is a letter: never read as digits; one cut out of touching ink may be
    refused_found, refused = _found_and_reading([(2, 0.9)], rejected=0, apart=True)
    assert combine(refused, refused_found, line).number == "?"
    refused_found, refused = _found_and_reading([(2, 0.9)], rejected=0)
    assert combine(refused, refused_found, line).number == "20"
    line.document = {}  # no fitted combination: never another count
    line.others = -40.0
    assert combine(mine, found, line).number == "2"


def test_digits_cut_as_one_refused_piece_are_read_by_a_sure_line_reader():
    found, _ = _found_and_reading([(3, 0.6)])  # one piece of blank crop: refused by the model's checks
    assert read_digits(found, line_reader=False).not_a_digit
    line = _Line("39", [_one_hot(3, 0.99), _one_hot(9, 0.98)], -0.01, -50.0, {}, marks=True)
    reading = read_digits(found, line_reader=line)
    assert reading.number == "39" and not reading.not_a_digit and [d.digit for d in reading.digits] == [3, 9]
    assert reading.digits[1].confidence == pytest.approx(0.98)
    for number, log_probability in (("3?", -0.01), ("39", math.log(0.8)), ("3", -0.01)):
        line.number, line.log_probability = number, log_probability  # a mark; unsure; no more digits than pieces
        line.probabilities = np.array([_one_hot(3, 0.99), _one_hot(9, 0.98)][: len(number)])
        assert read_digits(found, line_reader=line).not_a_digit


def test_a_reader_trained_on_marks_decides_refused_pieces_with_the_segmenter():
    even = {"segmenter": 1.0, "line": 1.0, "margin": 2.0}
    # refused by the digit model, read by the reader as the digit the model would have named: a digit
    found, mine = _found_and_reading([(1, 0.6), (7, 0.99)], rejected=0)
    line = _Line("17", [_one_hot(1, 0.99), _one_hot(7, 0.99)], -0.1, -50.0, even, marks=True)
    combined = combine(mine, found, line)
    assert combined.number == "17" and combined.digits[0].digit == 1 and not combined.digits[0].not_a_digit
    line.number = "47"  # another digit than the model's: stays refused
    assert combine(mine, found, line).number == "?7"
    line.number = "?7"  # the reader sees a mark too
    assert combine(mine, found, line).number == "?7"
    # a mark where the model named a digit: "?" only where the model was unsure
    found, mine = _found_and_reading([(1, 0.4), (7, 0.99)])
    line.number = "?7"
    combined = combine(mine, found, line)
    assert combined.number == "?7" and combined.digits[0].reason == "a letter or symbol" and combined.unsure
    line.number = "1?"
    assert combine(mine, found, line).number == "17"
    # the reader sure of its mark (at least the fitted level) outweighs a digit the model was sure of
    line.number, line.marks = "1?", np.array([0.0, 0.97])
    line.document["combine"] = {**even, "mark": 0.95}
    assert combine(mine, found, line).number == "1?"
    line.marks = np.array([0.0, 0.9])
    assert combine(mine, found, line).number == "17"
    line.marks = None
    # another count: the reader's reading with its mark, past the margin, even where the refused piece stands apart
    found, mine = _found_and_reading([(2, 0.9)], rejected=0, apart=True)
    line = _Line("2?", [_one_hot(2, 0.95), _one_hot(0, 0.5)], -0.3, -4.0, even, marks=True)
    combined = combine(mine, found, line)
    assert combined.number == "2?" and combined.digits[1].not_a_digit and combined.digits[0].digit == 2
    line.number = "??"  # no digit at all: not a number
    combined = combine(mine, found, line)
    assert combined.number == "" and combined.not_a_digit and combined.reason == "a letter or symbol"


@pytest.mark.parametrize(("seed", "alone"), [(0, "54710"), (1, "631181"), (8, "11765"), (10, "34763")])
def test_the_line_reader_mends_touching_digits_the_segmenter_cuts_wrong(mnist, seed, alone):
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(mnist.x_test), 6, replace=False)
    truth = "".join(str(mnist.y_test[i]) for i in picks)
    found = find_digits(render_number([mnist.x_test[i] for i in picks], rng, touching=1.0), predictor=builtin_model())
    assert read_digits(found, line_reader=False).number == alone  # a digit too few, or one misread
    reading = read_digits(found)
    assert reading.number == truth and len(reading.digits) == 6
    boxes = [d.box for d in reading.digits]
    assert boxes == sorted(boxes) and all(0 <= b[0] < b[2] <= found.size[0] for b in boxes)


def test_without_a_line_reader_the_segmenter_reads_alone(mnist):
    rng = np.random.default_rng(0)
    image = render_number([mnist.x_test[i] for i in (0, 1, 2)], rng)
    found = find_digits(image, predictor=builtin_model())
    assert read_digits(found, line_reader=False).number == read_number(image).number == "721"


# --------------------------------------------------------------------------- ONNX


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def photos(mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(4):
        (folder / f"digit{i}.jpg").write_bytes(render_digit(mnist.x_test[i], rng))
    (folder / "number.jpg").write_bytes(render_number([mnist.x_test[i] for i in (0, 1, 2)], rng))
    return folder


def test_predict_files_table_and_json(capsys, photos):
    code, out, _ = run(capsys, "predict", *(photos / f"digit{i}.jpg" for i in range(4)), "--top", "2")
    assert code == 0
    rows = out.strip().splitlines()[1:]
    assert [r.split()[1] for r in rows] == ["7", "2", "1", "0"]
    code, out, _ = run(capsys, "predict", photos / "digit0.jpg", "--json")
    (row,) = json_lines(out)
    assert set(row) == {"file", "digit", "confidence", "top", "unsure", "not_a_digit", "reason", "probabilities"}
    assert row["digit"] == 7 and len(row["top"]) == 3 and row["unsure"] is False
    assert row["not_a_digit"] is False and row["reason"] is None


def test_predict_glob_and_dir(capsys, photos):
    code, out, _ = run(capsys, "predict", str(photos / "digit*.jpg"), "--json")
    assert code == 0 and [r["digit"] for r in json_lines(out)] == [7, 2, 1, 0]
    code, out, _ = run(capsys, "predict", photos, "--json")
    assert len(json_lines(out)) == 5


def test_min_confidence_marks_unsure(capsys, photos):
    code, out, _ = run(capsys, "predict", photos / "digit1.jpg", "--min-confidence", "1.0", "--json")
    assert code == 0 and json_lines(out)[0]["unsure"] is True
    _, out, _ = run(capsys, "predict", photos / "digit1.jpg", "--min-confidence", "1.0")
    assert out.strip().endswith("unsure")


def test_bad_files_fail_alone(capsys, photos, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("shopping list")
    cut = (photos / "digit2.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(cut[: len(cut) // 3])
    code, out, err = run(capsys, "predict", photos / "digit0.jpg", tmp_path / "empty.png", tmp_path / "notes.png",
                         tmp_path / "cut.jpg", tmp_path / "missing.png", "--json")
    assert code == 1
    assert [r["digit"] for r in json_lines(out)] == [7]
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("deepdigits: error: ") for line in lines)
    assert "empty.png: empty file" in err and "notes.png: not an image" in err
    assert "cut.jpg: damaged or truncated image" in err and "missing.png: no such file" in err


def test_predict_number_with_overlay(capsys, photos, tmp_path):
    overlay = tmp_path / "boxes.png"
    code, out, _ = run(capsys, "predict", "--number", photos / "number.jpg", "--overlay", overlay, "--json")
    (row,) = json_lines(out)
    assert code == 0 and row["number"] == "721" and len(row["digits"]) == 3
    assert all(len(d["box"]) == 4 for d in row["digits"])
    with Image.open(overlay) as image:
        assert image.mode == "RGB" and image.size == Image.open(photos / "number.jpg").size


def test_predict_runtime_onnx_agrees(capsys, photos):
    _, torch_out, _ = run(capsys, "predict", photos, "--json")
    code, onnx_out, _ = run(capsys, "predict", photos, "--json", "--runtime", "onnx")
    assert code == 0
    for a, b in zip(json_lines(torch_out), json_lines(onnx_out), strict=True):
        assert a["digit"] == b["digit"] and abs(a["confidence"] - b["confidence"]) < 1e-4


def test_export_and_preprocess_commands(capsys, photos, tmp_path):
    code, out, _ = run(capsys, "export", "--onnx", tmp_path / "m.onnx")
    assert code == 0 and "ONNX Runtime matches PyTorch within" in out
    code, out, _ = run(capsys, "predict", photos / "digit3.jpg", "--model", tmp_path / "m.onnx", "--json")
    assert json_lines(out)[0]["digit"] == 0
    code, out, _ = run(capsys, "preprocess", photos / "digit0.jpg", "--out", tmp_path / "seen.png")
    with Image.open(tmp_path / "seen.png") as seen:
        assert seen.size == (280, 280)
        small = np.asarray(seen.resize((28, 28), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(small, to_mnist(photos / "digit0.jpg"))


def test_predict_usage_errors(capsys):
    code, _, err = run(capsys, "predict")
    assert code == 1 and "no images given" in err
    code, _, err = run(capsys, "predict", "x.png", "--min-confidence", "2")
    assert code == 1 and "--min-confidence: expected a probability" in err


def test_predict_from_bytes_and_pil(mnist):
    image = Image.fromarray(255 - mnist.x_test[0]).resize((100, 100))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert predict_digit(buffer.getvalue()).digit == 7 and predict_digit(image).digit == 7


def test_overflowing_weights_are_an_error_never_nan(mnist, tmp_path, capsys):
    import torch

    from deepdigits import Classifier
    from deepdigits.recognize import predict_arrays

    clf = Classifier("tutorial-002", seed=0)
    with torch.no_grad():
        for p in clf.network.parameters():
            p.fill_(3e38)  # finite, so the bundle loads; the logits overflow to inf and softmax to NaN
    with pytest.raises(DeepDigitsError, match="non-finite probabilities"):
        predict_arrays(mnist.x_test[:2], clf)
    clf.save(tmp_path / "huge")
    Image.fromarray(255 - mnist.x_test[0]).save(tmp_path / "seven.png")
    code, out, err = run(capsys, "predict", tmp_path / "seven.png", "--model", tmp_path / "huge", "--json")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "non-finite" in err
