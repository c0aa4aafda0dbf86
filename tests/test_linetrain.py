"""Training the line reader: lines written from MNIST digits, learning in seconds, a checked save."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepdigits import linetrain
from deepdigits.errors import BundleError
from deepdigits.linereader import LINE_HEIGHT, MARK, LineNet, LineReader
from deepdigits.linetrain import (
    MAX_DIGITS,
    fine_tune_line_reader,
    fit_combination,
    join_readers,
    main,
    save_reader,
    train_line_reader,
    write_lines,
    write_many_lines,
    write_photographed_lines,
)


def test_lines_hold_one_to_eight_digits_each_with_its_labels(mnist):
    lines = write_lines(mnist.x_train[:40], mnist.y_train[:40], 16, np.random.default_rng(0))
    lengths = (lines.labels >= 0).sum(axis=1)
    assert len(lines) == 16 and lengths.tolist() == list(range(1, MAX_DIGITS + 1)) * 2
    assert lines.pixels.shape == (LINE_HEIGHT, int(lines.widths.sum()))
    assert set(lines.labels[lines.labels >= 0].tolist()) <= set(mnist.y_train[:40].tolist())
    images, targets, steps, target_lengths = lines.batch(np.array([0, 7]))
    assert images.shape[:3] == (2, 1, LINE_HEIGHT) and images.shape[3] % 4 == 0
    assert targets.tolist() == (lines.labels[0, :1] + 1).tolist() + (lines.labels[7] + 1).tolist()
    assert target_lengths.tolist() == [1, 8] and float(images.min()) >= 0 and float(images.max()) <= 1
    assert steps.tolist() == np.ceil(lines.widths[[0, 7]] / 4).astype(int).tolist()


def test_a_share_of_lines_hold_a_mark_read_as_a_question_mark(mnist):
    lines = write_lines(mnist.x_train[:40], mnist.y_train[:40], 400, np.random.default_rng(0), marks=0.25)
    marked = [k for k in range(len(lines)) if "?" in lines.number(k)]
    assert 70 <= len(marked) <= 130  # one line in four, at random
    assert all(lines.number(k).count("?") == 1 for k in marked)
    assert all((lines.labels[k] == MARK - 1).sum() == 1 for k in marked)
    _, targets, _, _ = lines.batch(np.array(marked[:2]))
    assert (targets == MARK).sum() == 2  # the mark's CTC class
    unmarked = write_lines(mnist.x_train[:40], mnist.y_train[:40], 40, np.random.default_rng(0))
    assert not any("?" in unmarked.number(k) for k in range(len(unmarked)))


def test_many_lines_are_the_same_written_by_one_process_or_two(mnist, monkeypatch):
    monkeypatch.setattr(linetrain, "LINES_PER_CHUNK", 8)  # three chunks, so the two processes share them
    one = write_many_lines(mnist.x_train[:40], mnist.y_train[:40], 20, np.random.default_rng(3), 0.25, processes=1)
    two = write_many_lines(mnist.x_train[:40], mnist.y_train[:40], 20, np.random.default_rng(3), 0.25, processes=2)
    assert len(one) == len(two) == 20
    assert (one.widths == two.widths).all() and (one.labels == two.labels).all()
    assert np.array_equal(one.pixels, two.pixels)
    # each chunk counts its lengths on from the lines before it: 1-8 digits in turn across the chunks
    assert (one.labels >= 0).sum(axis=1).tolist() == [1 + k % MAX_DIGITS for k in range(20)]
    other = write_many_lines(mnist.x_train[:40], mnist.y_train[:40], 20, np.random.default_rng(4), 0.25, processes=1)
    assert not np.array_equal(one.labels, other.labels)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    said: list[str] = []
    folder = tmp_path_factory.mktemp("line") / "reader"
    document = train_line_reader(folder, samples=1536, epochs=3, held_out=64, data_dir=str(data_root),
                                 log=said.append)
    return folder, document, said


def test_training_learns_in_seconds_and_saves_a_reader_that_loads(trained):
    folder, document, said = trained
    losses = [float(line.split("CTC loss ")[1].split(",")[0]) for line in said if line.startswith("epoch")]
    assert len(losses) == 3 and losses[2] < losses[0]
    reader = LineReader.load(folder)
    assert reader.temperature == document["temperature"]
    assert document["held_out"]["nll_after"] <= document["held_out"]["nll_before"]
    assert document["training"]["digits"] == "MNIST training images 0-57999"
    assert document["marks"] is True and reader.document["marks"] is True and document["training"]["marks"] == 0.15
    assert reader.net.out.out_channels == 12  # blank, ten digits, a mark


def test_the_combination_is_fit_on_held_out_numbers_and_saved(trained, data_root):
    folder, _, said = trained
    combine = fit_combination(folder, numbers=2, data_dir=str(data_root), log=said.append)
    assert set(combine) == {"segmenter", "line", "margin", "mark", "fit"} and combine["fit"]["numbers"] == 10
    assert 0 < combine["segmenter"] <= 10 and 0 < combine["line"] <= 10 and -100 <= combine["margin"] <= 100
    assert json.loads((folder / "reader.json").read_text())["combine"] == combine
    assert LineReader.load(folder).document["combine"]["margin"] == combine["margin"]
    assert said[-1].startswith("combine: segmenter weight")


def test_photographed_lines_hold_two_to_eight_digits_and_do_not_depend_on_threads(mnist):
    x, y = mnist.x_train[:300], mnist.y_train[:300]
    one = write_photographed_lines(x, y, 14, np.random.default_rng(3), marks=0.5, threads=1)
    two = write_photographed_lines(x, y, 14, np.random.default_rng(3), marks=0.5, threads=2)
    assert len(one) == 14 and one.pixels.shape[0] == 32 and one.pixels.shape[1] == one.widths.sum()
    assert np.array_equal(one.pixels, two.pixels) and np.array_equal(one.labels, two.labels)
    assert [len(one.number(k)) for k in range(14)] == [2, 3, 4, 5, 6, 7, 8] * 2
    assert 2 <= sum("?" in one.number(k) for k in range(14)) <= 12  # half of them, at random


def test_fine_tuning_on_photographed_lines_refits_the_temperature_and_drops_the_combination(trained, data_root,
                                                                                             tmp_path):
    import shutil

    folder = tmp_path / "reader"
    shutil.copytree(trained[0], folder)
    said: list[str] = []
    document = fine_tune_line_reader(folder, photographed=64, ink=32, epochs=1, held_out=16,
                                     data_dir=str(data_root), log=said.append)
    reader = LineReader.load(folder)
    assert reader.temperature == document["temperature"] and not reader.document.get("combine")
    assert "combine" not in json.loads((folder / "reader.json").read_text())  # fit it again for the new weights
    assert reader.document["training"]["fine_tuned"]["photographed"] == 64
    assert reader.document["held_out"]["photographed"] is True and reader.document["held_out"]["lines"] == 16
    assert document["held_out"]["nll_after"] <= document["held_out"]["nll_before"]
    assert said[0].startswith("wrote 64 photographed and 32 ink lines") and said[-1].startswith("held out")


def test_readers_trained_apart_are_joined_into_one_whose_combination_is_fit_again(trained, data_root, tmp_path):
    folder = trained[0]
    said: list[str] = []
    document = join_readers(tmp_path / "joined", [folder, folder], log=said.append)
    joined = LineReader.load(tmp_path / "joined")
    assert len(joined.members) == 2 and "combine" not in document and said[-1].startswith("joined 2 networks")
    assert document["members"][0]["temperature"] == LineReader.load(folder).temperature
    assert document["members"][0]["training"] == document["training"] == trained[1]["training"]
    assert document["members"][0]["held_out"] == document["held_out"] == trained[1]["held_out"]
    ink = np.zeros((40, 120), np.float32)
    ink[8:32, 20:24] = ink[8:32, 60:64] = 1.0
    alone, both = LineReader.load(folder).read(ink), joined.read(ink)
    assert both.number == alone.number and both.log_probability == pytest.approx(alone.log_probability)  # twins
    with pytest.raises(BundleError, match="a reader of 2 networks; fine-tune each before joining"):
        fine_tune_line_reader(tmp_path / "joined", photographed=64, ink=32, data_dir=str(data_root))
    with pytest.raises(BundleError, match="5 networks in all: a reader holds at most 4"):
        join_readers(tmp_path / "five", [tmp_path / "joined"] * 2 + [folder])
    other = save_reader(LineNet((8, 8, 8), 16, marks=True), {**trained[1], "channels": [8, 8, 8], "context": 16},
                        tmp_path / "small")
    with pytest.raises(BundleError, match=r"small/reader.json: a network of channels \(8, 8, 8\), context 16"):
        join_readers(tmp_path / "mixed", [folder, other])
    assert not (tmp_path / "five").exists() and not (tmp_path / "mixed").exists()


def test_the_command_line_answers_bad_input_in_one_line(tmp_path, capsys):
    for argv, expected in ((["--out", str(tmp_path / "r"), "--epochs", "0"], "--epochs: expected at least 1, got 0"),
                           (["--out", str(tmp_path / "r"), "--marks", "1.5"], "--marks: expected a share from 0"),
                           (["--out", str(tmp_path / "r"), "--samples", "5000000"], "--samples: expected at most"),
                           (["--out", str(tmp_path / "r"), "--processes", "0"], "--processes: expected at least 1"),
                           (["--out", str(tmp_path / "r"), "--fit-only"], "r/reader.json: missing"),
                           (["--out", str(tmp_path / "r"), "--fine-tune", "10"], "--fine-tune: expected at least 64"),
                           (["--out", str(tmp_path / "r"), "--fine-tune", "2000000"], "--fine-tune: expected at most"),
                           (["--out", str(tmp_path / "r"), "--fine-tune", "64"], "r/reader.json: missing"),
                           (["--out", str(tmp_path / "r"), "--join", str(tmp_path / "a")], "a/reader.json: missing"),
                           (["--out", str(tmp_path / "r"), "--join", "a", "--fit-only"], "not allowed with argument"),
                           (["--out", str(tmp_path / "r"), "--data-dir", str(tmp_path)], "no complete mnist files")):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code in (1, 2) and expected in err[-1] and "Traceback" not in "".join(err)
