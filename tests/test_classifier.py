"""The Classifier: score, from_recipe, evaluate's loss, precision in the bundle; ensembles in every command."""

import json

import numpy as np
import pytest

from deepdigits import Classifier, combine, load
from deepdigits.cli import main
from deepdigits.errors import DeepDigitsError
from deepdigits.models import Ensemble, count_params


def test_precision_is_saved_in_the_bundle(mnist, tmp_path):
    clf = Classifier("tutorial-004", seed=0)
    clf.fit(mnist.x_train[:500], mnist.y_train[:500], epochs=1, batch_size=100, verbose=0)
    clf.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "model.json").read_text())["precision"] == "float32"
    assert load(tmp_path / "b").precision == "float32"


def test_ensemble_averages_probabilities(members, mnist):
    ensemble = combine(members)
    images = mnist.x_test[:100]
    expected = np.mean([m.predict_proba(images) for m in members], axis=0)
    np.testing.assert_allclose(ensemble.predict_proba(images), expected, atol=1e-6)
    assert count_params(ensemble.network) == 3 * 407_050
    assert isinstance(ensemble.network, Ensemble) and "3 members" in ensemble.summary()
    assert ensemble.precision == "float32"  # what every member trained in


def test_ensemble_bundle_round_trip(members, mnist, tmp_path):
    ensemble = combine(members)
    path = ensemble.save(tmp_path / "ens")
    meta = json.loads((path / "model.json").read_text())
    assert meta["architecture"] == "ensemble" and meta["members"] == ["tutorial-004"] * 3
    loaded = load(path)
    np.testing.assert_array_equal(loaded.predict_proba(mnist.x_test[:50]), ensemble.predict_proba(mnist.x_test[:50]))


def test_every_command_accepts_an_ensemble(members, mnist, data_root, tmp_path, capsys):
    paths = [m.save(tmp_path / f"m{i}") for i, m in enumerate(members)]
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, paths), "--out", str(out), "--data-dir", str(data_root)]) == 0
    assert "saved ensemble bundle" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--data-dir", str(data_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.85
    assert main(["predict", "--model", str(out), "--test-index", "0-4", "--data-dir", str(data_root)]) == 0
    assert "labels:      [7 2 1 0 4]" in capsys.readouterr().out
    assert main(["export", str(out), "--onnx", str(tmp_path / "e.onnx")]) == 0
    from fastapi.testclient import TestClient

    from deepdigits.serve import create_app

    client = TestClient(create_app(out))
    response = client.post("/api/predict", json={"pixels": mnist.x_test[0].tolist()})
    assert response.status_code == 200 and response.json()["digit"] == 7 and response.json()["model"] == "ensemble"
    assert client.get("/api/model").json()["parameters"] == 3 * 407_050


def test_ensemble_needs_two_members(members):
    with pytest.raises(DeepDigitsError, match="at least 2 members"):
        combine(members[:1])
