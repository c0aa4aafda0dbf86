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


def test_score_is_accuracy_and_from_recipe_builds_what_the_recipe_says(mnist):
    clf = Classifier.from_recipe("tutorial-000")
    assert clf.architecture == "tutorial-000" and clf.input_scale == 1.0 and clf.recipe["name"] == "tutorial-000"
    same = Classifier.from_recipe("tutorial-000")
    assert all((a == b).all() for a, b in zip(clf.network.parameters(), same.network.parameters(), strict=True))
    clf = Classifier.from_recipe("tutorial-004")
    clf.fit(mnist.x_train[:1000], mnist.y_train[:1000], epochs=1, batch_size=100, optimizer="rmsprop", verbose=0)
    x, y = mnist.x_test[:300], mnist.y_test[:300]
    assert clf.score(x, y) == pytest.approx(float((clf.predict(x) == y).mean()))
    assert clf.score(x, y) == pytest.approx(clf.evaluate(x, y)["accuracy"])
    with pytest.raises(DeepDigitsError, match="is an ensemble"):
        Classifier.from_recipe("ensemble")


def test_validation_and_test_loss_are_the_loss_the_recipe_trains_with(mnist):
    # tutorial 000 trains with Keras 2's clipped loss on raw pixels: val_loss and evaluate's loss must be that loss
    # (before, val_loss was unclipped cross-entropy: 62.27 against a test loss of 6.45)
    clf = Classifier.from_recipe("tutorial-000")
    history = clf.fit(mnist.x_train[:2000], mnist.y_train[:2000], epochs=2, batch_size=500, optimizer="sgd",
                      learning_rate=0.01, validation_data=(mnist.x_test[:1000], mnist.y_test[:1000]),
                      loss="keras2-clipped-cross-entropy", verbose=0)
    evaluated = clf.evaluate(mnist.x_test[:1000], mnist.y_test[:1000])["loss"]
    assert history.epochs[-1]["val_loss"] == pytest.approx(evaluated, rel=1e-4)
    assert evaluated <= -np.log(1e-7) + 1e-6  # clipped: no sample costs more than -log(1e-7)


def test_saving_and_plotting_never_change_the_matplotlib_backend(mnist, tmp_path):
    import subprocess
    import sys

    code = (
        "import matplotlib\nmatplotlib.use('svg')\n"
        "from deepdigits import Classifier\nfrom deepdigits.plots import bundle_figures, training_curves\n"
        "clf = Classifier('tutorial-002', seed=0)\nclf.history = [{'epoch': 1, 'loss': 1.0, 'accuracy': 0.5}]\n"
        f"clf.save({str(tmp_path / 'b')!r}, extra_files=bundle_figures(clf))\ntraining_curves(clf.history)\n"
        "print(matplotlib.get_backend())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "svg", result.stderr
    assert (tmp_path / "b" / "curves.png").stat().st_size > 5_000


def test_bundle_round_trip_keeps_the_temperature(mnist, tmp_path):
    from deepdigits.calibrate import softmax
    from deepdigits.errors import BundleError

    clf = Classifier("tutorial-004", seed=0)
    clf.fit(mnist.x_train[:500], mnist.y_train[:500], epochs=1, batch_size=100, verbose=0)
    record = clf.calibrate(mnist.x_train[500:1000], mnist.y_train[500:1000],
                           fit_on={"dataset": "mnist", "split": "train", "start": 500, "stop": 1000})
    assert record["temperature"] == clf.temperature != 1.0 and record["fit_on"]["n"] == 500
    images = mnist.x_test[:50]
    np.testing.assert_allclose(clf.predict_proba(images), softmax(clf.logits(images), clf.temperature), atol=1e-6)
    path = clf.save(tmp_path / "b")
    meta = json.loads((path / "model.json").read_text())
    assert meta["calibration"]["temperature"] == clf.temperature
    loaded = load(path)
    assert loaded.temperature == clf.temperature and loaded.calibration == clf.calibration
    np.testing.assert_array_equal(loaded.predict_proba(images), clf.predict_proba(images))
    # a bundle from before calibration (no field) loads with T = 1
    del meta["calibration"]
    (path / "model.json").write_text(json.dumps(meta))
    old = load(path)
    assert old.temperature == 1.0 and old.calibration is None
    np.testing.assert_allclose(old.predict_proba(images), softmax(clf.logits(images)), atol=1e-6)
    for bad in (0.01, 25.0, "2"):
        meta["calibration"] = {**clf.calibration, "temperature": bad}
        (path / "model.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=r"calibration\.temperature"):
            load(path)
    meta["calibration"] = {**clf.calibration, "fit_on": {"split": "test", "n": 10}}  # never the test set
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"calibration\.fit_on\.split"):
        load(path)


def test_a_photo_crops_recipe_trains_on_crops_of_its_training_part_only(tiny, monkeypatch):
    from deepdigits import data, load_dataset, train_recipe
    from deepdigits.recipes import get_recipe

    spec, source = tiny
    ds = load_dataset(spec.name, data_dir=source)
    seen: dict = {}
    fit, made = Classifier.fit, data.photo_crops

    def recording_fit(self, x, y, **options):
        seen["x"], seen["y"] = np.array(x), np.array(y)
        return fit(self, x, y, **options)

    def recording_crops(x, y, count, **options):
        seen["from"] = np.array(x)
        return made(x, y, count, **options)

    monkeypatch.setattr(Classifier, "fit", recording_fit)
    monkeypatch.setattr("deepdigits.classifier.photo_crops", recording_crops)
    recipe = get_recipe("tutorial-004").with_overrides(photo_crops=4)
    clf = train_recipe(recipe, dataset=ds, epochs=1, verbose=0)
    start = clf.calibration["fit_on"]["start"]  # the held-out tail: calibration's, never photographed
    assert 0 < start < 30 and clf.calibration["fit_on"]["seen_in_training"] is False
    np.testing.assert_array_equal(seen["from"], ds.x_train[:start])
    assert seen["x"].shape == (start + 4, 28, 28) and seen["y"].shape == (start + 4,)
    np.testing.assert_array_equal(seen["x"][:start], ds.x_train[:start])
    crops, labels = made(ds.x_train[:start], ds.y_train[:start], 4)  # the same crops, from the cache
    np.testing.assert_array_equal(seen["x"][start:], crops)
    np.testing.assert_array_equal(seen["y"][start:], labels)
    assert clf.recipe["photo_crops"] == 4
    assert "4 photographed training digits added (recipe: 0)" in recipe.settings_text(get_recipe("tutorial-004"))
