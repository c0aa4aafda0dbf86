"""load(): the built-in model, a bundle or an ONNX file, each a Predictor with the same card."""

import numpy as np
import pytest

import deepdigits
from deepdigits import Classifier, ModelCard, Predictor, load
from deepdigits.errors import BundleError, DeepDigitsError
from deepdigits.export import OnnxClassifier, export_onnx


def test_load_with_nothing_is_the_builtin_model(mnist):
    model = load()
    assert isinstance(model, Classifier) and isinstance(model, Predictor)
    assert load() is model  # loaded once
    card = model.card()
    assert isinstance(card, ModelCard) and card.architecture == "best-cnn" and card.parameters == 150_698
    assert card.runtime == "torch" and card.dataset == "mnist" and card.test_metrics["accuracy"] > 0.99


def test_bundle_onnx_file_and_onnx_runtime_answer_alike(mnist, tmp_path):
    clf = Classifier("tutorial-004", seed=0)
    clf.dataset = {"name": "mnist"}
    clf.fit(mnist.x_train[:500], mnist.y_train[:500], epochs=1, batch_size=100, verbose=0)
    clf.metrics = clf.evaluate(mnist.x_test[:200], mnist.y_test[:200])
    bundle = clf.save(tmp_path / "b")
    onnx_file = export_onnx(load(bundle), tmp_path / "b.onnx")
    models = [load(bundle), load(onnx_file), load(bundle, runtime="onnx")]
    assert [type(m) for m in models] == [Classifier, OnnxClassifier, OnnxClassifier]
    images = mnist.x_test[:64]
    reference = models[0].predict_proba(images)
    for model in models:
        assert isinstance(model, Predictor)
        np.testing.assert_allclose(model.predict_proba(images), reference, atol=1e-4)
        card = model.card()
        assert (card.architecture, card.parameters, card.dataset) == ("tutorial-004", 407_050, "mnist")
        assert card.test_metrics["accuracy"] == pytest.approx(clf.metrics["accuracy"])
    assert [m.card().runtime for m in models] == ["torch", "onnx", "onnx"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle folder"):
        load(tmp_path / "missing")
    with pytest.raises(DeepDigitsError, match="no such ONNX file"):
        load(tmp_path / "missing.onnx")
    with pytest.raises(DeepDigitsError, match="runtime: expected one of torch, onnx"):
        load(runtime="tensorflow")


def test_public_names_load_lazily():
    assert deepdigits.load is load and "Classifier" in dir(deepdigits)
    with pytest.raises(AttributeError):
        deepdigits.no_such_name  # noqa: B018
