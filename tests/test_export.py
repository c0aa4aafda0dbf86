"""ONNX export: the graph answers as PyTorch does, for single networks and ensembles; bad files are one-line errors."""

import numpy as np
import pytest

from deepdigits import combine
from deepdigits.errors import DeepDigitsError
from deepdigits.export import OnnxClassifier, export_onnx
from deepdigits.predictor import builtin_model


def test_ensemble_exports_to_onnx(members, mnist, tmp_path):
    ensemble = combine(members)
    onnx_model = OnnxClassifier(export_onnx(ensemble, tmp_path / "ens.onnx"))
    images = mnist.x_test[:200]
    assert np.abs(onnx_model.predict_proba(images) - ensemble.predict_proba(images)).max() < 1e-4


def test_onnx_export_matches_pytorch(mnist, tmp_path):
    clf = builtin_model()
    path = export_onnx(clf, tmp_path / "model.onnx")
    onnx_model = OnnxClassifier(path)
    images = mnist.x_test[:500]
    assert np.abs(onnx_model.predict_proba(images) - clf.predict_proba(images)).max() < 1e-4
    assert onnx_model.class_names == clf.class_names


def test_bad_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not onnx")
    with pytest.raises(DeepDigitsError, match=r"junk\.onnx: not a readable ONNX model"):
        OnnxClassifier(path)


def test_onnx_export_answers_calibrated_probabilities(members, mnist, tmp_path):
    import copy

    from deepdigits.calibrate import softmax

    clf = copy.deepcopy(members[0])
    clf.calibrate(mnist.x_train[2000:3000], mnist.y_train[2000:3000])
    ensemble = combine(members)
    ensemble.temperature = 0.5
    mapped = copy.deepcopy(clf)
    mapped.top_label = (-0.3, 1.4)  # a top-label map after the temperature (calibrate.calibrated_logits)
    images = mnist.x_test[:300]
    for model in (clf, ensemble, mapped):
        onnx_model = OnnxClassifier(export_onnx(model, tmp_path / "m.onnx"))
        assert onnx_model.temperature == model.temperature != 1.0 and onnx_model.top_label == model.top_label
        probabilities = onnx_model.predict_proba(images)
        assert np.abs(probabilities - model.predict_proba(images)).max() < 1e-4
        assert np.abs(probabilities - softmax(model.logits(images))).max() > 1e-2  # T = 1 answers differently
