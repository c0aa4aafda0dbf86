"""Export a model to ONNX (probabilities out) and run it with ONNX Runtime."""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_bytes
from .errors import DeepDigitsError
from .preprocess import to_tensor

OPSET = 17


class _Probabilities(nn.Module):
    """The network followed by softmax, so the ONNX graph answers with probabilities like Keras's model."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(images), dim=1)


def onnx_bytes(classifier) -> bytes:
    """The classifier as an ONNX model: input ``images`` float (N, 1, 28, 28) in [0, 1], output ``probabilities``."""
    try:
        import onnx
    except ImportError:
        raise DeepDigitsError("ONNX export needs the onnx package: pip install 'deepdigits[onnx]'") from None
    module = _Probabilities(classifier.network).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation; it still works
        torch.onnx.export(
            module, (torch.zeros(1, 1, 28, 28),), buffer, input_names=["images"], output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}}, opset_version=OPSET, dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "deepdigits.architecture": classifier.architecture,
        "deepdigits.class_names": json.dumps(list(classifier.class_names)),
        "deepdigits.input": "float32 (N, 1, 28, 28): MNIST-style images scaled by input_scale",
        "deepdigits.input_scale": repr(classifier.input_scale),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def export_onnx(classifier, path: str | os.PathLike) -> Path:
    """Write the classifier as an ONNX file, atomically."""
    return atomic_write_bytes(path, onnx_bytes(classifier))


class OnnxClassifier:
    """An exported model run by ONNX Runtime, with the same ``predict_proba``/``predict`` as ``Classifier``."""

    # what a bundle knows about itself; filled in when exported in memory from a loaded bundle
    n_params: int | None = None
    metrics: dict | None = None
    dataset: dict | None = None
    recipe: dict | None = None

    def __init__(self, model: str | os.PathLike | bytes, name: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeepDigitsError("--runtime onnx needs onnxruntime: pip install 'deepdigits[onnx]'") from None
        label = name or (str(model) if not isinstance(model, bytes) else "ONNX model")
        source = model if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes) and not Path(model).is_file():
            raise DeepDigitsError(f"{label}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise DeepDigitsError(f"{label}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.architecture = meta.get("deepdigits.architecture", "onnx")
        self.class_names = tuple(json.loads(meta.get("deepdigits.class_names", json.dumps(list("0123456789")))))
        self.input_scale = float(meta.get("deepdigits.input_scale", 1 / 255))
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def from_classifier(cls, classifier) -> OnnxClassifier:
        model = cls(onnx_bytes(classifier), name=f"{classifier.architecture} (exported in memory)")
        for attribute in ("n_params", "metrics", "dataset", "recipe"):
            setattr(model, attribute, getattr(classifier, attribute, None))
        return model

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        x = to_tensor(images, self.input_scale).numpy()
        parts = [self.session.run(None, {self.input_name: x[i : i + batch_size]})[0]
                 for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)
