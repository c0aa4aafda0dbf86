import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import json_lines
from deepdigits.calibrate import HOLDOUT
from deepdigits.cli import main, parse_index_range
from deepdigits.errors import DeepDigitsError


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, data_root):
    path = tmp_path_factory.mktemp("cli") / "mlp"
    assert main(["train", "--recipe", "tutorial-004", "--epochs", "1", "--data-dir", str(data_root),
                 "--out", str(path), "--quiet"]) == 0
    return path


def test_models_list_and_summary(capsys):
    code, out, _ = run(capsys, "models", "list")
    assert code == 0 and "tutorial-002" in out and "7,960" in out
    code, out, _ = run(capsys, "models", "summary", "tutorial-001", "--json")
    assert code == 0 and json.loads(out)["total_params"] == 669_706
    code, out, _ = run(capsys, "models", "summary", "tutorial-003")
    assert "Total params: 34,826" in out


def test_data_info_json(capsys, data_root):
    code, out, _ = run(capsys, "data", "info", "--dataset", "fashion-mnist", "--data-dir", data_root, "--json")
    info = json.loads(out)
    assert code == 0 and info["train"]["images"] == [60000, 28, 28] and info["class_names"][9] == "Ankle boot"
    assert info["source"] == f"--data-dir {data_root}"


def test_data_show_writes_a_labelled_grid(capsys, data_root, tmp_path):
    out_file = tmp_path / "grid.png"
    code, out, _ = run(capsys, "data", "show", "--data-dir", data_root, "--split", "test", "--count", "16",
                       "--out", out_file)
    assert code == 0 and f"wrote {out_file}" in out
    with Image.open(out_file) as image:
        assert image.width > 300 and image.height > 300
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # not blank


def test_train_evaluate_predict(capsys, bundle, data_root):
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["recipe"]["name"] == "tutorial-004" and meta["recipe"]["epochs"] == 1
    assert meta["metrics"]["accuracy"] > 0.9
    code, out, _ = run(capsys, "evaluate", bundle, "--data-dir", data_root, "--json")
    result = json.loads(out)
    assert code == 0 and result["accuracy"] == pytest.approx(meta["metrics"]["accuracy"])
    assert sum(map(sum, result["confusion_matrix"])) == 10_000 and "loss" in result
    code, out, _ = run(capsys, "predict", "--model", bundle, "--test-index", "0-19", "--data-dir", data_root)
    assert code == 0 and "labels:      [7 2 1 0 4 1 4 9 5 9 0 6 9 0 1 5 9 7 3 4]" in out
    assert out.strip().splitlines()[-1].endswith("/20 correct")
    code, out, _ = run(capsys, "predict", "--model", bundle, "--test-index", "3", "--data-dir", data_root, "--json")
    (row,) = json_lines(out)
    assert row["index"] == 3 and row["label"] == 0 and len(row["probabilities"]) == 10


def test_train_refuses_bad_numbers(capsys, data_root, tmp_path):
    code, _, err = run(capsys, "train", "--recipe", "tutorial-004", "--epochs", "0", "--data-dir", data_root,
                       "--out", tmp_path / "x")
    assert code == 1 and err.strip() == "deepdigits: error: epochs: expected a positive number, got 0"
    assert not (tmp_path / "x").exists()


def test_errors_are_one_line_with_nonzero_exit(capsys, tmp_path, data_root, bundle):
    code, _, err = run(capsys, "evaluate", tmp_path / "nope")
    assert code == 1 and err.count("\n") == 1 and "not a model bundle folder" in err
    code, _, err = run(capsys, "predict", "--model", bundle, "--test-index", "9999-10005", "--data-dir", data_root)
    assert code == 1 and "indices must lie in 0-9999" in err
    code, _, err = run(capsys, "data", "info", "--data-dir", tmp_path)
    assert code == 1 and "no complete mnist files there" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--recipe", "nonsense"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_reproduce_smoke_run(capsys, data_root, tmp_path):
    md = tmp_path / "table.md"
    code, out, _ = run(capsys, "reproduce", "--tutorial", "004", "--epochs", "1", "--train-size", "2000",
                       "--data-dir", data_root, "--json", "--out", md)
    rows = json.loads(out)
    assert code == 0 and len(rows) == 1
    row = rows[0]
    assert {"tutorial", "params", "test_accuracy", "claimed", "train_seconds"} <= set(row)
    assert row["params"] == 407_050 and row["claimed"] == "97.83%" and row["full_recipe"] is False
    assert 50 < row["test_accuracy"] <= 100
    assert "(shortened run)" in md.read_text()


def test_console_script_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deepdigits", "evaluate", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("deepdigits: error: ") and result.stderr.count("\n") == 1
    help_text = subprocess.run([sys.executable, "-m", "deepdigits", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    assert "deepdigits reproduce" in help_text and "DEEPDIGITS_DATA" in help_text


def test_parse_index_range():
    assert parse_index_range("0-3", 10) == [0, 1, 2, 3]
    assert parse_index_range("1,5,7-8", 10) == [1, 5, 7, 8]
    with pytest.raises(DeepDigitsError, match="indices must lie in 0-9"):
        parse_index_range("5-12", 10)
    with pytest.raises(DeepDigitsError, match="expected numbers like 0-19"):
        parse_index_range("a-b", 10)
    with pytest.raises(DeepDigitsError, match="indices must lie in 0-9"):  # refused before any list is built
        parse_index_range("0-99999999999", 10)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"], ["plot", "--help"],
                                  ["serve", "--help"], ["models", "summary", "--help"]])
def test_help_imports_neither_torch_nor_matplotlib(argv):
    code = ("import sys\nfrom deepdigits.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'matplotlib', 'sklearn', 'scipy', 'PIL') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert "usage: deepdigits" in result.stdout
    assert "HEAVY []" in result.stderr


def test_models_summary_takes_a_recipe_or_a_bundle_and_shows_bytes(capsys, bundle):
    code, out, _ = run(capsys, "models", "summary", "best")
    assert code == 0 and 'Model: "best (best-cnn)"' in out and "Total params: 150,698 (" in out
    code, out, _ = run(capsys, "models", "summary", bundle, "--json")
    info = json.loads(out)
    assert code == 0 and info["total_params"] == 407_050 and info["total_bytes"] == 4 * 407_050
    code, out, _ = run(capsys, "models", "summary", "ensemble")
    assert code == 0 and "3 members" in out
    code, _, err = run(capsys, "models", "summary", "no-such-thing")
    assert code == 1 and "not an architecture, a recipe or a bundle folder" in err and len(err.splitlines()) == 1


def test_plot_writes_kind_png_by_default(capsys, bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "plot", "curves", bundle)
    assert code == 0 and out.strip() == "wrote curves.png" and (tmp_path / "curves.png").stat().st_size > 5_000


def test_train_says_each_setting_once_and_correctly(capsys, data_root, tmp_path):
    code, _, err = run(capsys, "train", "--recipe", "tutorial-004", "--epochs", "1", "--data-dir", data_root,
                       "--out", tmp_path / "b")
    assert code == 0
    recipe_line = next(line for line in err.splitlines() if line.startswith("Recipe:"))
    settings_line = next(line for line in err.splitlines() if line.startswith("Settings:"))
    assert "epoch" not in recipe_line and "Settings: 1 epoch (recipe: 5), batch size 128" in settings_line
    # Keras-style progress: the epoch header, then steps, time per step and metrics named as Keras names them
    assert "Epoch 1/1" in err
    # the training images less those held out to calibrate, in batches of 128
    steps = -(-(60_000 - HOLDOUT) // 128)
    assert any(line.startswith(f"{steps}/{steps} ━") and "ms/step - accuracy: " in line and " - loss: " in line
               for line in err.splitlines())
    assert not any(line.startswith("0/") for line in err.splitlines()) and "0.0000" not in err  # none before step 1


def _corrupt(bundle, tmp_path, change):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    meta_path = bad / "model.json"
    if change == "model.json is a folder":
        meta_path.unlink()
        meta_path.mkdir()
        return bad
    meta = json.loads(meta_path.read_text())
    field, _, value = change.partition("=")
    target = meta
    *parents, last = field.split(".")
    for key in parents:
        target = target[key]
    if value == "<delete>":
        del target[last]
    else:
        target[last] = json.loads(value)
    meta_path.write_text(json.dumps(meta))
    return bad


# the probe's bundles (issue 15): each a one-line error with exit 1 from evaluate and predict --model
BAD_BUNDLES = ["architecture=[\"tutorial-004\"]", "class_names=7", "class_names=[\"a\", \"b\"]", "history=3",
               "preprocessing=\"x\"", "preprocessing.input_scale=\"big\"", "preprocessing.input_scale=1e308",
               "train_seconds=\"long\"", "weights=\"model.safetensors\"", "weights.sha256=<delete>",
               "weights.file=\"../other/model.safetensors\"", "members=" + json.dumps(["tutorial-004"] * 20_000),
               "model.json is a folder"]


@pytest.mark.parametrize("change", BAD_BUNDLES, ids=[c[:40] for c in BAD_BUNDLES])
def test_hostile_bundles_are_one_line_errors_from_every_command(capsys, bundle, tmp_path, data_root, change):
    bad = _corrupt(bundle, tmp_path, change)
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(image)
    for argv in (["evaluate", bad, "--data-dir", data_root], ["predict", image, "--model", bad, "--json"]):
        code, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 1 and out == "" and len(lines) == 1, (argv, err)
        assert lines[0].startswith("deepdigits: error: ") and "model.json" in lines[0] and len(lines[0]) < 400
        assert "Traceback" not in err and "site-packages" not in err


def test_hostile_data_files_are_one_line_errors(capsys, data_root, tmp_path):
    import gzip
    import shutil

    folder = tmp_path / "data" / "mnist"
    shutil.copytree(data_root / "mnist", folder)
    target = next(p for p in folder.iterdir() if p.name.startswith("t10k-labels"))
    with gzip.open(target, "wb") as f:  # a gzip bomb: 64 MiB of zeros where 10,008 bytes belong
        for _ in range(64):
            f.write(bytes(1 << 20))
    code, out, err = run(capsys, "data", "info", "--data-dir", tmp_path / "data")
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1 and "t10k-labels" in lines[0] and "Traceback" not in err
    assert "bad magic number" in lines[0]  # said for what it is, before any checksum


def test_train_an_ensemble_in_member_processes_saves_its_bundle(capsys, tiny, tmp_path, monkeypatch):
    from deepdigits.recipes import RECIPES, Recipe

    _, source = tiny
    monkeypatch.setitem(RECIPES, "ensemble", Recipe("ensemble", "ensemble", "adamw", 0.001, 128, 1, dataset="tiny",
                                                    members=2, member_recipe="tutorial-004"))
    out = tmp_path / "ens"
    code, stdout, err = run(capsys, "train", "--recipe", "ensemble", "--epochs", "1", "--processes", "2",
                            "--data-dir", source, "--out", out, "--quiet")
    assert code == 0, err
    assert f"saved model bundle: {out}  (2 members, " in stdout
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "ensemble" and [m["seed"] for m in meta["recipe"]["members"]] == [0, 1]
    names = sorted(p.name for p in out.iterdir())  # the bundle and its figures; the workers' folder is gone
    assert {"model.json", "model.safetensors", "confusion.png"} <= set(names)
    assert not [name for name in names if name.startswith(".") or name == "checkpoint"]
