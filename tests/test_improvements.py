"""The pieces behind the fast, best and ensemble recipes: augmentation, schedules, weight averaging, ensembles."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepdigits import Classifier, combine, load
from deepdigits.cli import main
from deepdigits.export import OnnxClassifier, export_onnx
from deepdigits.models import Ensemble, build_model, count_params
from deepdigits.preprocess import to_tensor
from deepdigits.train import RECIPES, WeightAverage, augment_batch, fit


def test_augmentation_keeps_shapes_and_ink(mnist):
    x = to_tensor(mnist.x_test[:64])
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    # small transforms keep (nearly) all of the ink inside the frame
    ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert ratio.min() > 0.75 and ratio.max() < 1.3


def test_test_time_augmentation_views_of_the_accuracy_benchmark(mnist):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    images = mnist.x_test[:16]
    views = benchmark.tta_views(images)
    assert len(views) == 9 and all(v.shape == images.shape and v.dtype == np.uint8 for v in views)
    assert views[0] is images
    dot = np.zeros((1, 28, 28), np.uint8)
    dot[0, 10, 12] = 200
    moved = [np.argwhere(v[0]).tolist() for v in benchmark.tta_views(dot)[1:5]]
    assert moved == [[[9, 12]], [[11, 12]], [[10, 11]], [[10, 13]]]  # up, down, left, right by one pixel
    for view in views[5:]:  # rotations and zooms move ink but keep most of it
        assert 0.8 < view.astype(float).sum() / images.astype(float).sum() < 1.25


def test_augmentation_is_seeded_and_zero_ranges_are_identity(mnist):
    x = to_tensor(mnist.x_test[:8])
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    same = augment_batch(x, torch.Generator().manual_seed(3), degrees=0, translate=0, scale=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)


def test_augmentation_keeps_labels(mnist):
    # a model trained on clean digits still reads the augmented ones: the label has not changed
    clf = load_builtin()
    x = to_tensor(mnist.x_test[:500])
    augmented = augment_batch(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = clf.network(augmented).argmax(1).numpy()
    assert (predicted == mnist.y_test[:500]).mean() > 0.97


def load_builtin():
    from deepdigits.recognize import builtin_model

    return builtin_model()


def test_onecycle_schedule_warms_up_then_anneals(mnist):
    network = build_model("tutorial-004", seed=0)
    rates = []
    original = torch.optim.lr_scheduler.OneCycleLR.step

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        rates.append(self.optimizer.param_groups[0]["lr"])

    torch.optim.lr_scheduler.OneCycleLR.step = record
    try:
        fit(network, to_tensor(mnist.x_train[:1000]), torch.from_numpy(mnist.y_train[:1000]).long(),
            optimizer="adamw", learning_rate=0.01, batch_size=100, epochs=4, schedule="onecycle", verbose=0)
    finally:
        torch.optim.lr_scheduler.OneCycleLR.step = original
    peak = int(np.argmax(rates))
    assert max(rates) == pytest.approx(0.01, rel=1e-3)
    assert 5 <= peak <= 15  # 25% of 40 steps
    assert rates[-1] < 0.01 * 0.01 and rates[0] < 0.01 * 0.1


def test_weight_average_warms_up():
    network = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    average = WeightAverage(network, decay=0.999)
    with torch.no_grad():
        network.weight.fill_(1.0)
    average.update(network)  # decay min(0.999, 2/11): the first update moves most of the way
    assert average.module.weight[0, 0].item() == pytest.approx(1 - 2 / 11)


def test_fast_and_best_recipes_learn_on_small_data(mnist):
    for name, minimum in (("fast", 0.7), ("best", 0.85)):  # fast: 16 steps here; chance is 0.1
        recipe = RECIPES[name]
        clf = Classifier(recipe.architecture, seed=0)
        options = {**recipe.fit_options(), "epochs": 2}
        clf.fit(mnist.x_train[:2000], mnist.y_train[:2000], verbose=0, **options)
        assert clf.evaluate(mnist.x_test[:500], mnist.y_test[:500])["accuracy"] > minimum, name


def test_bf16_is_used_only_where_the_device_computes_it_natively(mnist, monkeypatch):
    import deepdigits.train as train

    def run(native: bool) -> tuple[Classifier, object]:
        monkeypatch.setattr(train, "native_bf16", lambda device: native)
        clf = Classifier("strided-cnn", seed=0)
        history = clf.fit(mnist.x_train[:768], mnist.y_train[:768], epochs=1, batch_size=192, optimizer="adamw",
                          learning_rate=0.01, bf16=True, verbose=0)
        return clf, history

    emulated, history = run(native=False)
    assert history.precision == "float32" and emulated.precision == "float32"
    plain = Classifier("strided-cnn", seed=0)
    plain.fit(mnist.x_train[:768], mnist.y_train[:768], epochs=1, batch_size=192, optimizer="adamw",
              learning_rate=0.01, verbose=0)
    for a, b in zip(emulated.network.parameters(), plain.network.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # exactly the float32 run

    native, history = run(native=True)
    assert history.precision == "bfloat16" and native.precision == "bfloat16"
    assert any(not torch.equal(a, b) for a, b in zip(native.network.parameters(), plain.network.parameters(),
                                                         strict=True))


def test_settings_line_says_which_precision_training_uses(monkeypatch):
    import deepdigits.train as train

    cpu = torch.device("cpu")
    assert train.precision_text(False, cpu) == "float32"
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert train.precision_text(True, cpu) == "bfloat16 autocast"
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert train.precision_text(True, cpu).startswith("float32 (this processor has no native bfloat16")


def test_precision_is_saved_in_the_bundle(mnist, tmp_path):
    clf = Classifier("tutorial-004", seed=0)
    clf.fit(mnist.x_train[:500], mnist.y_train[:500], epochs=1, batch_size=100, verbose=0)
    clf.save(tmp_path / "b", figures=False)
    assert json.loads((tmp_path / "b" / "model.json").read_text())["precision"] == "float32"
    assert load(tmp_path / "b").precision == "float32"


# --------------------------------------------------------------------------- ensembles


@pytest.fixture(scope="module")
def members(mnist):
    out = []
    for seed in (0, 1, 2):
        clf = Classifier("tutorial-004", seed=seed)
        clf.dataset = {"name": "mnist"}
        clf.fit(mnist.x_train[:2000], mnist.y_train[:2000], epochs=1, batch_size=64, optimizer="rmsprop",
                seed=seed, verbose=0)
        out.append(clf)
    return out


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


def test_ensemble_exports_to_onnx(members, mnist, tmp_path):
    ensemble = combine(members)
    onnx_model = OnnxClassifier(export_onnx(ensemble, tmp_path / "ens.onnx"))
    images = mnist.x_test[:200]
    assert np.abs(onnx_model.predict_proba(images) - ensemble.predict_proba(images)).max() < 1e-4


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
    from deepdigits.errors import DeepDigitsError

    with pytest.raises(DeepDigitsError, match="at least 2 members"):
        combine(members[:1])
