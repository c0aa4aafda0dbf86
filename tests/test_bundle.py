import copy
import json

import numpy as np
import pytest
import torch

import deepdigits
from deepdigits import Classifier
from deepdigits.bundle import load_bundle
from deepdigits.errors import BundleError
from deepdigits.plots import bundle_figures


@pytest.fixture(scope="module")
def trained(mnist):
    clf = Classifier("tutorial-003", seed=0)
    clf.recipe = {"name": "test"}
    clf.dataset = {"name": "mnist", "sha256": mnist.checksums}
    clf.fit(mnist.x_train[:1500], mnist.y_train[:1500], epochs=1, batch_size=100, validation_split=0.1, verbose=0)
    clf.metrics = clf.evaluate(mnist.x_test[:300], mnist.y_test[:300])
    return clf


def test_round_trip_gives_identical_predictions(trained, mnist, tmp_path):
    path = trained.save(tmp_path / "cnn", extra_files=bundle_figures(trained))
    assert sorted(p.name for p in path.iterdir()) == [
        "confusion.png", "curves.png", "history.csv", "model.json", "model.safetensors"
    ]
    loaded = deepdigits.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(mnist.x_test[:200]), trained.predict_proba(mnist.x_test[:200]))
    assert loaded.architecture == "tutorial-003" and loaded.history == trained.history
    assert loaded.metrics["accuracy"] == trained.metrics["accuracy"]


def test_chunked_channels_last_prediction_matches_one_plain_forward_pass(trained, mnist):
    # predict_proba switches the network to channels-last and works in chunks, for speed only
    x = mnist.x_test[:300]
    plain = copy.deepcopy(trained.network).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        expected = torch.softmax(plain(trained._tensor(x)), dim=1).numpy()
    for batch_size in (1, 7, 128, 1000):
        np.testing.assert_allclose(trained.predict_proba(x, batch_size=batch_size), expected, atol=1e-5)
    assert trained.network[3].weight.is_contiguous(memory_format=torch.channels_last)


def test_fast_recipe_network_round_trips(mnist, tmp_path):
    # strided-cnn holds its input standardisation as constants of the architecture, not as saved weights
    clf = Classifier("strided-cnn", seed=0)
    clf.fit(mnist.x_train[:600], mnist.y_train[:600], epochs=1, batch_size=100, verbose=0)
    loaded = deepdigits.load(clf.save(tmp_path / "fast"))
    np.testing.assert_array_equal(loaded.predict_proba(mnist.x_test[:100]), clf.predict_proba(mnist.x_test[:100]))


def test_metadata_document(trained, tmp_path):
    path = trained.save(tmp_path / "b")
    meta = json.loads((path / "model.json").read_text())
    assert meta["format"] == "deepdigits-bundle" and meta["format_version"] == 1
    assert meta["config"]["total_params"] == 34_826
    assert meta["dataset"]["sha256"]["t10k-labels-idx1-ubyte"].startswith("ff7bcfd4")
    assert meta["preprocessing"]["input_scale"] == pytest.approx(1 / 255)
    assert set(meta["versions"]) == {"deepdigits", "torch", "python"}
    assert len(meta["weights"]["sha256"]) == 64
    csv_lines = (path / "history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(csv_lines) == 2


def test_damaged_weights_detected(trained, tmp_path):
    path = trained.save(tmp_path / "b")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch; the weights file is damaged"):
        deepdigits.load(path)


def test_mismatched_architecture(trained, tmp_path):
    path = trained.save(tmp_path / "b")
    meta_path = path / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["architecture"] = "tutorial-004"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="weights do not match architecture 'tutorial-004'"):
        deepdigits.load(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "model.json").write_text("{not json"), "damaged JSON"),
        (lambda p: (p / "model.json").unlink(), "missing; expected the bundle's metadata file"),
        (lambda p: (p / "model.safetensors").unlink(), "missing; expected the bundle's weights"),
        (lambda p: (p / "model.json").write_text('{"format": "other"}'), "not a deepdigits bundle"),
    ],
)
def test_damaged_bundles_give_clear_errors(trained, tmp_path, damage, message):
    path = trained.save(tmp_path / "b")
    damage(path)
    with pytest.raises(BundleError, match=message):
        deepdigits.load(path)


def test_not_a_folder(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle folder"):
        deepdigits.load(tmp_path / "missing")


def test_failed_save_keeps_the_old_bundle(trained, tmp_path, monkeypatch):
    path = trained.save(tmp_path / "b")
    before = (path / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("deepdigits.bundle.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        trained.save(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging folders left
    _state, meta = load_bundle(path)
    assert meta["architecture"] == "tutorial-003"


# ----------------------------------------------------------------------------- hostile bundles (issue 15)


def _tiny_bundle(path, architecture="tutorial-002", **extra):
    """An untrained small network saved as a bundle: no data needed."""
    clf = Classifier(architecture, seed=0)
    clf.extra = extra
    return clf.save(path)


def _edit_json(path, change):
    meta_path = path / "model.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))


def _load_error(path) -> str:
    with pytest.raises(BundleError) as caught:
        deepdigits.load(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("architecture", lambda m: m.update(architecture=["tutorial-002"])),
        ("class_names", lambda m: m.update(class_names=10)),
        ("class_names", lambda m: m.update(class_names=["a", "b", "c"])),
        ("class_names.3", lambda m: m["class_names"].__setitem__(3, 3)),
        ("history", lambda m: m.update(history=7)),
        ("history.0.loss", lambda m: m.update(history=[{"epoch": 1, "loss": float("nan")}])),
        ("preprocessing", lambda m: m.update(preprocessing="1/255")),
        ("preprocessing.input_scale", lambda m: m["preprocessing"].update(input_scale="0.5")),
        ("preprocessing.input_scale", lambda m: m["preprocessing"].update(input_scale=1e308)),
        ("preprocessing.input_scale", lambda m: m["preprocessing"].update(input_scale=float("nan"))),
        ("preprocessing.input_scale", lambda m: m["preprocessing"].update(input_scale=0)),
        ("train_seconds", lambda m: m.update(train_seconds="12")),
        ("train_seconds", lambda m: m.update(train_seconds=-1.0)),
        ("weights", lambda m: m.update(weights="model.safetensors")),
        ("weights.sha256", lambda m: m["weights"].pop("sha256")),
        ("weights.sha256", lambda m: m["weights"].update(sha256="00")),
        ("weights.file", lambda m: m["weights"].update(file="../other/model.safetensors")),
        ("weights.file", lambda m: m["weights"].update(file="/etc/passwd")),
        ("members", lambda m: m.update(architecture="ensemble")),
        ("recipe", lambda m: m.update(recipe=["adam"])),
        ("interrupted", lambda m: m.update(interrupted="no")),
    ],
)
def test_wrong_field_gives_one_line_naming_it(tmp_path, field, change):
    path = _tiny_bundle(tmp_path / "b")
    _tiny_bundle(tmp_path / "other")  # what a '../other/...' weights path would reach
    _edit_json(path, change)
    message = _load_error(path)
    assert f"model.json: field '{field}'" in message


def test_unknown_fields_are_kept_and_the_shipped_bundle_validates(tmp_path):
    from deepdigits.bundle import read_metadata
    from deepdigits.predictor import BUILTIN_MODEL

    assert read_metadata(BUILTIN_MODEL)["architecture"] == "best-cnn"
    path = _tiny_bundle(tmp_path / "b", future_field={"anything": [1, "two", None]})
    assert read_metadata(path)["future_field"] == {"anything": [1, "two", None]}
    assert deepdigits.load(path).predict(np.zeros((1, 28, 28), np.uint8)).shape == (1,)


def test_a_huge_members_list_is_refused_fast_in_one_short_line(tmp_path):
    import time
    import tracemalloc

    path = _tiny_bundle(tmp_path / "b")
    _edit_json(path, lambda m: m.update(architecture="ensemble", members=["tutorial-002"] * 20_000))
    tracemalloc.start()
    started = time.perf_counter()
    message = _load_error(path)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "field 'members': expected at most 64 items, got a list of 20000 items" in message
    assert seconds < 2 and peak < 50 << 20, (seconds, peak)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "damaged JSON"),
        ('{"format": "deepdigits-bundle", "format_version": ' + "9" * 5000 + "}", "damaged JSON"),
        ('{"format": "deepdigits-bundle", "format_version": [1]}', "bundle format version list"),
        ('{"format": "deepdigits-bundle", "format_version": 1, "architecture": "x", "weights": {"sha256": "'
         + "a" * 64 + '"}, "history": [{"' + "k" * 2_000_000 + '": 1}]}', "field 'history.0.'kkkk"),
    ],
)
def test_hostile_json_gives_a_short_line(tmp_path, content, message):
    path = _tiny_bundle(tmp_path / "b")
    (path / "model.json").write_text(content)
    assert message in _load_error(path)


def test_oversized_or_odd_model_json_is_refused_before_parsing(tmp_path, monkeypatch):
    path = _tiny_bundle(tmp_path / "b")
    monkeypatch.setattr("deepdigits.bundle.MAX_METADATA_BYTES", 1000)
    assert "larger than" in _load_error(path)
    monkeypatch.undo()
    (path / "model.json").unlink()
    (path / "model.json").mkdir()
    assert "model.json: not a file" in _load_error(path)


def test_weights_linked_from_outside_the_bundle_are_refused(tmp_path):
    path = _tiny_bundle(tmp_path / "b")
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)  # same bytes: the checksum alone would pass it
    (path / "model.safetensors").symlink_to(outside)
    assert "outside the bundle folder" in _load_error(path)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(path / "missing")
    assert "missing; expected the bundle's weights" in _load_error(path)
    outside.rename(path / "real.safetensors")  # a link to a file inside the bundle is fine
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to("real.safetensors")
    deepdigits.load(path)


def _save_state(path, architecture, change):
    from deepdigits.bundle import save_bundle

    clf = Classifier(architecture, seed=0)
    state = {k: change(k, v) for k, v in clf.network.state_dict().items()}
    return save_bundle(path, state, clf.metadata())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda k, v: torch.full_like(v, float("nan")), "holds NaN or infinite values"),
        (lambda k, v: v.clone().fill_(float("inf")) if k == "3.bias" else v, "tensor '3.bias' holds NaN"),
        (lambda k, v: v.to(torch.int8), "is int8; expected float32 or bfloat16"),
        (lambda k, v: v.to(torch.float16), "is float16; expected float32 or bfloat16"),
    ],
)
def test_bad_weight_values_are_refused(tmp_path, change, message):
    path = _save_state(tmp_path / "b", "tutorial-002", change)
    assert message in _load_error(path)


def test_bfloat16_weights_and_batch_norm_counters_load(tmp_path):
    path = _save_state(tmp_path / "b", "best-cnn", lambda k, v: v.to(torch.bfloat16) if v.is_floating_point() else v)
    state, _meta = load_bundle(path)
    assert state["1.num_batches_tracked"].dtype == torch.int64 and state["0.weight"].dtype == torch.bfloat16
    assert deepdigits.load(path).predict_proba(np.zeros((2, 28, 28), np.uint8)).shape == (2, 10)
    path = _save_state(tmp_path / "c", "best-cnn", lambda k, v: v - 5 if k.endswith("num_batches_tracked") else v)
    assert "is not a step count" in _load_error(path)


def test_a_document_that_would_not_load_is_not_saved(tmp_path):
    path = _tiny_bundle(tmp_path / "b")
    before = (path / "model.json").read_text()
    clf = Classifier("tutorial-002", input_scale=2.0)
    with pytest.raises(BundleError, match=r"not saved, model.json would not load: field 'preprocessing.input_scale'"):
        clf.save(path)
    assert (path / "model.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


# ----------------------------------------------------------------------------- replacing a bundle


SAVER = """
import sys, time
from deepdigits import bundle
from deepdigits.models import build_model

def pause(name):
    if name == sys.argv[2]:
        print(name, flush=True)
        time.sleep(600)

bundle.save_step_hook = pause
bundle.save_bundle(sys.argv[1], build_model("tutorial-002", seed=1).state_dict(),
                   {"architecture": "tutorial-002", "marker": "new"})
print("finished", flush=True)
"""


def _kill_save_at(path, step):
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", SAVER, str(path), step], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        reached = child.stdout.readline().strip()
        assert reached == step, child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()


def _marker(path):
    _state, meta = load_bundle(path)  # complete: document valid, checksum and tensors checked
    deepdigits.load(path)
    return meta["marker"]


@pytest.mark.parametrize("step", ["cleaned", "weights-written", "staged", "swapped", "done"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_bundle(tmp_path, step):
    from deepdigits.bundle import SAVE_STEPS

    assert step in SAVE_STEPS
    path = _tiny_bundle(tmp_path / "b", marker="old")
    _kill_save_at(path, step)
    assert _marker(path) == ("new" if SAVE_STEPS.index(step) >= SAVE_STEPS.index("swapped") else "old")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "b"]
    assert len(leftovers) == (step in ("weights-written", "staged", "swapped")), leftovers
    _tiny_bundle(path, marker="next")  # the next save removes what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["b"] and _marker(path) == "next"


def test_a_first_save_killed_before_the_swap_leaves_nothing_at_the_path(tmp_path):
    _kill_save_at(tmp_path / "b", "staged")
    assert not (tmp_path / "b").exists() and len(list(tmp_path.iterdir())) == 1
    _tiny_bundle(tmp_path / "b", marker="next")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_clean_up_spares_live_saves_and_other_bundles(tmp_path):
    import fcntl
    import os

    path = _tiny_bundle(tmp_path / "b", marker="old")
    names = [".b.abcd1234.tmp", ".b.old", ".b.0f0f0f0f.old", ".b.live_xyz.tmp", ".bb.abcd1234.tmp",
             ".b.x.abcd1234.tmp", "c"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text("{}")
    live = os.open(tmp_path / ".b.live_xyz.tmp", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(live, fcntl.LOCK_EX)  # as a concurrent save holds its staging folder
    try:
        _tiny_bundle(path, marker="new")
    finally:
        os.close(live)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["b", ".b.live_xyz.tmp", ".bb.abcd1234.tmp", ".b.x.abcd1234.tmp", "c"]
    )
    _tiny_bundle(path, marker="newer")  # once its save is gone, it is stale
    assert ".b.live_xyz.tmp" not in [p.name for p in tmp_path.iterdir()]


def test_replacing_works_where_the_system_cannot_exchange(tmp_path, monkeypatch):
    import ctypes
    import errno

    path = _tiny_bundle(tmp_path / "b", marker="old")

    def einval(*args):
        ctypes.set_errno(errno.EINVAL)  # what a filesystem without RENAME_EXCHANGE answers
        return -1

    monkeypatch.setattr("deepdigits.bundle._renameat2", einval)
    _tiny_bundle(path, marker="new")
    assert _marker(path) == "new" and [p.name for p in tmp_path.iterdir()] == ["b"]
    monkeypatch.setattr("deepdigits.bundle._renameat2", None)
    _tiny_bundle(path, marker="newer")
    assert _marker(path) == "newer" and [p.name for p in tmp_path.iterdir()] == ["b"]
