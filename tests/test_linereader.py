"""The line reader: its input image, CTC decoding, checked loading, and reading photographed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepdigits.errors import BundleError
from deepdigits.linereader import (
    DOCUMENT_FILE,
    FORMAT,
    FORMAT_VERSION,
    MARK,
    MAX_CHANGED_DIGITS,
    MAX_LINE_WIDTH,
    WEIGHTS_FILE,
    LineNet,
    LineReader,
    builtin_reader,
    check_document,
    greedy_decode,
    line_image,
)
from deepdigits.linetrain import save_reader
from deepdigits.preprocess import ink_map, read_image
from deepdigits.synthetic import render_number


def test_line_image_scales_the_ink_to_28_of_32_rows():
    ink = np.zeros((100, 300), np.float32)
    ink[20:80, 50:250] = 0.8
    line = line_image(ink)
    assert line.shape == (32, round(200 * 28 / 60) + 4) and line.dtype == np.uint8
    assert line[:2].max() == 0 and line[30:].max() == 0 and line[2:30, 2:-2].min() == 255
    assert line_image(ink, (0, 0, 150, 100)).shape == (32, round(100 * 28 / 60) + 4)  # a box limits it


def test_blank_and_very_long_lines_stay_bounded():
    assert line_image(np.zeros((40, 40), np.float32)).shape == (32, 8)
    assert not line_image(np.zeros((40, 40), np.float32)).any()
    long = np.ones((20, 6000), np.float32)
    assert line_image(long).shape == (32, MAX_LINE_WIDTH)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    labels = [0, 3, 3, 0, 3, 5, 5, 0]  # class d + 1 is digit d
    log_probs = np.log(np.full((len(labels), 11), 0.01))
    log_probs[np.arange(len(labels)), labels] = np.log(0.9)
    digits, spans = greedy_decode(log_probs)
    assert digits == [2, 2, 4] and spans == [(1, 3), (4, 5), (5, 7)]


def test_a_reader_trained_on_marks_reads_and_scores_a_question_mark(tmp_path):
    torch.manual_seed(0)
    folder = save_reader(LineNet((8, 8, 8), 16, marks=True).eval(), _document(marks=True), tmp_path / "marks")
    reader = LineReader.load(folder)
    line = np.zeros((32, 40), np.uint8)
    assert reader.log_probs(line).shape == (10, 12)
    labels = [0, 3, 0, MARK, MARK, 0, 5, 0, 0, 0]  # "2", a mark, "4"
    told = np.log(np.full((len(labels), 12), 0.01))
    told[np.arange(len(labels)), labels] = np.log(0.89)
    told = torch.from_numpy(told).float()
    reader.member_log_probs = lambda line: told[None]  # type: ignore[method-assign]
    reading = reader.read(np.ones((20, 60), np.float32))
    assert reading.number == "2?4" and reading.probabilities.shape == (3, 10)
    assert reading.marks is not None and reading.marks[1] == pytest.approx(0.89, abs=1e-5)
    assert reading.marks[0] == pytest.approx(0.01, abs=1e-5)
    assert np.allclose(reading.probabilities.sum(axis=1), 1.0)
    assert np.isfinite(reading.log_likelihood("2?4")) and reading.log_likelihood("2?4") > reading.log_likelihood("214")
    assert LineReader.score(told[:, :11], "2?4") == -np.inf  # a reader without marks: impossible
    assert np.isfinite(LineReader.score(told, "2?4")) and LineReader.score(told, "2x4") == -np.inf


def test_a_reader_whose_tensors_do_not_match_its_marks_is_refused(tmp_path):
    folder = save_reader(LineNet((8, 8, 8), 16).eval(), _document(), tmp_path / "plain")
    document = json.loads((folder / DOCUMENT_FILE).read_text())
    (folder / DOCUMENT_FILE).write_text(json.dumps({**document, "marks": True}))
    with pytest.raises(BundleError, match="tensors do not fit the network"):
        LineReader.load(folder)
    (folder / DOCUMENT_FILE).write_text(json.dumps({**document, "marks": "yes"}))
    with pytest.raises(BundleError, match="field 'marks'"):
        LineReader.load(folder)


def test_a_document_out_of_its_schema_is_named_before_anything_is_written(tmp_path):
    combine = {"segmenter": 561.9, "line": 766.0, "margin": 3.9}  # what an unbounded fit once wrote
    with pytest.raises(BundleError, match=r"reader.json: field 'combine.segmenter': Input should be less than"):
        check_document(_document(combine=combine), tmp_path / "reader.json")
    assert check_document(_document(), tmp_path / "reader.json")["marks"] is False  # defaults filled in


def _document(**changes) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": {"file": WEIGHTS_FILE, "sha256": ""},
            "channels": [8, 8, 8], "context": 16, "temperature": 1.5, **changes}


@pytest.fixture
def small_reader(tmp_path):
    torch.manual_seed(0)
    net = LineNet((8, 8, 8), 16).eval()
    return net, save_reader(net, _document(), tmp_path / "reader")


def test_a_saved_reader_loads_and_answers_the_same(small_reader):
    net, folder = small_reader
    reader = LineReader.load(folder)
    line = np.random.default_rng(0).integers(0, 256, (32, 80), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.log_softmax(net(torch.from_numpy(line / 255.0).float()[None, None])[0].T / 1.5, dim=1)
    assert torch.allclose(reader.log_probs(line), expected, atol=1e-6)
    assert reader.temperature == 1.5 and sorted(p.name for p in folder.iterdir()) == [DOCUMENT_FILE, WEIGHTS_FILE]


def test_damaged_or_wrong_files_are_refused_in_one_line(small_reader):
    _, folder = small_reader
    document = json.loads((folder / DOCUMENT_FILE).read_text())
    (folder / DOCUMENT_FILE).write_text(json.dumps({**document, "temperature": -1.0}))
    with pytest.raises(BundleError, match=r"reader.json: field 'temperature': Input should be greater than 0.05"):
        LineReader.load(folder)
    (folder / DOCUMENT_FILE).write_text(json.dumps({**document, "format": "deepdigits-bundle"}))
    with pytest.raises(BundleError, match=r"field 'format'"):
        LineReader.load(folder)
    (folder / DOCUMENT_FILE).write_text(json.dumps(document))
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match=r"reader.safetensors: checksum mismatch"):
        LineReader.load(folder)
    (folder / DOCUMENT_FILE).write_text("{not json")
    with pytest.raises(BundleError, match=r"reader.json: damaged JSON"):
        LineReader.load(folder)


def _joined(tmp_path, count: int = 2, marks: bool = False) -> Path:
    torch.manual_seed(0)
    first = LineNet((8, 8, 8), 16, marks=marks).eval()
    others = [(LineNet((8, 8, 8), 16, marks=marks).eval(), 1.2 + k, {"training": {"seed": k + 2}})
              for k in range(count - 1)]
    return save_reader(first, _document(marks=marks, training={"seed": 1}), tmp_path / "joined", others)


def test_a_reader_of_two_networks_saves_each_and_loads_them_checked(tmp_path):
    folder = _joined(tmp_path)
    reader = LineReader.load(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([DOCUMENT_FILE, "reader-2.safetensors", WEIGHTS_FILE])
    assert [t for _, t in reader.members] == [1.5, 1.2] and reader.document["members"][0]["training"] == {"seed": 2}
    line = np.random.default_rng(0).integers(0, 256, (32, 80), dtype=np.uint8)
    both = reader.member_log_probs(line)
    assert both.shape == (2, 20, 11) and torch.equal(both[0], reader.log_probs(line))
    with torch.no_grad():
        second = torch.log_softmax(reader.members[1][0](torch.from_numpy(line / 255.0).float()[None, None])[0].T / 1.2,
                                   dim=1)
    assert torch.allclose(both[1], second, atol=1e-6)
    document = json.loads((folder / DOCUMENT_FILE).read_text())
    second_file = folder / "reader-2.safetensors"
    second_file.write_bytes(second_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match=r"reader-2.safetensors: checksum mismatch"):
        LineReader.load(folder)
    for name in ("../elsewhere.safetensors", "reader-2.bin", "/etc/passwd.safetensors"):
        member = {**document["members"][0], "file": name}
        (folder / DOCUMENT_FILE).write_text(json.dumps({**document, "members": [member]}))
        with pytest.raises(BundleError, match=r"reader.json: field 'members.0.file': String should match pattern"):
            LineReader.load(folder)
    (folder / DOCUMENT_FILE).write_text(json.dumps({**document, "members": [document["members"][0]] * 4}))
    with pytest.raises(BundleError, match=r"field 'members': List should have at most 3 items"):
        LineReader.load(folder)


def test_two_networks_read_the_number_likeliest_under_their_mixture(tmp_path):
    reader = LineReader.load(_joined(tmp_path, marks=True))

    def told(labels: list[int], sure: float = 0.89) -> torch.Tensor:
        log_probs = np.log(np.full((len(labels), 12), (1 - sure) / 11))
        log_probs[np.arange(len(labels)), labels] = np.log(sure)
        return torch.from_numpy(log_probs).float()

    # the two name the same "2?4" one step apart: frame by frame they disagree everywhere a digit is named
    first, second = told([0, 3, 0, MARK, 0, 5, 0, 0, 0, 0]), told([0, 0, 3, 0, MARK, 0, 5, 0, 0, 0])
    reader.member_log_probs = lambda line: torch.stack([first, second])  # type: ignore[method-assign]
    reading = reader.read(np.ones((20, 60), np.float32))
    assert reading.number == "2?4" and reading.probabilities.shape == (3, 10)
    assert reading.probabilities.argmax(axis=1)[[0, 2]].tolist() == [2, 4]
    assert np.allclose(reading.probabilities.sum(axis=1), 1.0) and reading.marks is not None
    assert reading.marks[1] > 0.85 and reading.marks[0] < 0.05
    mixture = np.log((np.exp(LineReader.score(first, "2?4")) + np.exp(LineReader.score(second, "2?4"))) / 2)
    assert reading.log_probability == pytest.approx(mixture) and reading.log_likelihood("2?4") == pytest.approx(mixture)
    assert reading.log_likelihood("214") < reading.log_probability and reading.log_likelihood("2x4") == -np.inf
    # where they read differently, the number likelier under both together wins, whichever network read it
    unsure = told([0, 3, 0, 2, 0, 5, 0, 0, 0, 0], sure=0.4)  # reads "214", barely
    reader.member_log_probs = lambda line: torch.stack([unsure, second])  # type: ignore[method-assign]
    assert reader.read(np.ones((20, 60), np.float32)).number == "2?4"
    # a reading longer than MAX_CHANGED_DIGITS takes each digit's distribution from the network that read it
    long = told([label for d in range(MAX_CHANGED_DIGITS + 4) for label in (0, d % 10 + 1)])
    reader.member_log_probs = lambda line: torch.stack([long, long])  # type: ignore[method-assign]
    reading = reader.read(np.ones((20, 60), np.float32))
    reader.member_log_probs = lambda line: long[None]  # type: ignore[method-assign]
    alone = reader.read(np.ones((20, 60), np.float32))
    assert reading.number == alone.number == "".join(str(d % 10) for d in range(MAX_CHANGED_DIGITS + 4))
    assert np.array_equal(reading.probabilities, alone.probabilities) and np.array_equal(reading.marks, alone.marks)
    assert reading.log_probability == pytest.approx(alone.log_probability)  # the mixture of twins


def _ink(mnist, picks, seed, **options) -> tuple[str, np.ndarray]:
    image = render_number([mnist.x_test[i] for i in picks], np.random.default_rng(seed), **options)
    return "".join(str(mnist.y_test[i]) for i in picks), ink_map(read_image(image)[0])


def test_the_builtin_reader_reads_touching_digits(mnist):
    reader = builtin_reader()
    assert reader is not None
    truth, ink = _ink(mnist, [0, 1, 2, 3, 4], 0, touching=1.0)  # 7 2 1 0 4, every one against the last
    reading = reader.read(ink)
    assert reading.number == truth == "72104"
    assert reading.probabilities.shape == (5, 10) and np.allclose(reading.probabilities.sum(axis=1), 1.0)
    assert reading.probabilities.argmax(axis=1).tolist() == [7, 2, 1, 0, 4]
    starts = [a for a, _ in reading.columns]
    assert starts == sorted(starts) and all(a < b <= ink.shape[1] for a, b in reading.columns)
    # log P of what it read is its reading's; any other number is less likely
    assert reader.log_likelihood(ink, truth) == pytest.approx(reading.log_probability)
    assert reading.log_likelihood("7210") == pytest.approx(reader.log_likelihood(ink, "7210"))  # no second pass
    assert reading.log_probability > reader.log_likelihood(ink, "7210") > -np.inf
    assert reading.log_probability > reader.log_likelihood(ink, "72164")
    # the built-in reader knows marks: a letter in the second place is possible, and far less likely here
    assert reader.document["marks"] is True
    assert reading.log_probability - 5 > reader.log_likelihood(ink, "7?104") > -np.inf
    assert reader.log_likelihood(ink, "7²") == -np.inf
