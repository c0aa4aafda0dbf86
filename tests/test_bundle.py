import copy
import json

import numpy as np
import pytest
import torch

import deepdigits
from deepdigits import Classifier
from deepdigits.bundle import load_bundle
from deepdigits.errors import BundleError


@pytest.fixture(scope="module")
def trained(mnist):
    clf = Classifier("tutorial-003", seed=0)
    clf.recipe = {"name": "test"}
    clf.dataset = {"name": "mnist", "sha256": mnist.checksums}
    clf.fit(mnist.x_train[:1500], mnist.y_train[:1500], epochs=1, batch_size=100, validation_split=0.1, verbose=0)
    clf.metrics = clf.evaluate(mnist.x_test[:300], mnist.y_test[:300])
    return clf


def test_round_trip_gives_identical_predictions(trained, mnist, tmp_path):
    path = trained.save(tmp_path / "cnn")
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
