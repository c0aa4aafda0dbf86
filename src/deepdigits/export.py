"""Export a model to ONNX (calibrated probabilities out) and run it with ONNX Runtime."""

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
from .calibrate import calibrated_logits
from .errors import DeepDigitsError
from .outliers import forward_with_features, last_linear, open_set_document
from .predictor import ModelCard
from .preprocess import to_tensor

OPSET = 17


class _Probabilities(nn.Module):
    """The network, its calibration and softmax: the ONNX graph answers with the calibrated probabilities.

    With ``features`` it also answers what the not-a-digit head reads (``outliers``): the last linear
    layer's input and the logits before the temperature.
    """

    def __init__(self, network: nn.Module, temperature: float = 1.0, features: bool = False,
                 top_label: tuple[float, float] | None = None):
        super().__init__()
        self.network = network
        self.temperature = float(temperature)
        self.top_label = top_label
        self.features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, features = forward_with_features(self.network, images) if self.features else (
            self.network(images), None)
        raw = logits
        # the code predict_proba runs: a Div node by a constant for T (an uncalibrated model's graph is as
        # before), then the top-label map's few nodes where there is one
        probabilities = torch.softmax(calibrated_logits(logits, self.temperature, self.top_label), dim=1)
        return probabilities if features is None else (probabilities, features, raw)


def onnx_bytes(classifier) -> bytes:
    """The classifier as an ONNX model: input ``images`` float (N, 1, 28, 28) in [0, 1], output ``probabilities``.

    The probabilities are ``softmax(logits / T)`` with the classifier's temperature, then its top-label map
    where it has one, as ``predict_proba``.
    A classifier with a not-a-digit head (``open_set`` with ``head``) also gets outputs ``features`` and
    ``logits`` and its ``open_set`` in the metadata, so the exported model rejects what the bundle rejects.
    """
    import onnx

    temperature = float(getattr(classifier, "temperature", 1.0))
    top_label = getattr(classifier, "top_label", None)
    open_set = (getattr(classifier, "extra", None) or {}).get("open_set")
    tapped = isinstance(open_set, dict) and open_set.get("head") is not None and last_linear(classifier.network)
    module = _Probabilities(classifier.network, temperature, features=bool(tapped), top_label=top_label).eval()
    names = ["probabilities", "features", "logits"] if tapped else ["probabilities"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation; it still works
        torch.onnx.export(
            module, (torch.zeros(1, 1, 28, 28),), buffer, input_names=["images"], output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["images", *names]}, opset_version=OPSET, dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    metadata = {
        "deepdigits.architecture": classifier.architecture,
        "deepdigits.class_names": json.dumps(list(classifier.class_names)),
        "deepdigits.input": "float32 (N, 1, 28, 28): MNIST-style images scaled by input_scale",
        "deepdigits.input_scale": repr(classifier.input_scale),
        "deepdigits.temperature": repr(temperature),  # already in the graph; recorded for people and tools
        **({"deepdigits.top_label": json.dumps(list(top_label))} if top_label else {}),  # [a, b], the same
        "deepdigits.card": json.dumps(classifier.card().to_dict()),
    }
    if tapped:
        metadata["deepdigits.open_set"] = json.dumps(open_set)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def export_onnx(classifier, path: str | os.PathLike) -> Path:
    """Write the classifier as an ONNX file, atomically."""
    return atomic_write_bytes(path, onnx_bytes(classifier))


def _top_label(stored: str | None) -> tuple[float, float] | None:
    """The exported top-label map ``[a, b]`` as recorded (informative only: the graph applies it)."""
    try:
        a, b = json.loads(stored) if stored else (None, None)
        return (float(a), float(b)) if a is not None else None
    except (TypeError, ValueError):
        return None


class OnnxClassifier:
    """An exported model run by ONNX Runtime: a ``Predictor`` like ``Classifier`` (``predict_proba``, ``card``)."""

    def __init__(self, model: str | os.PathLike | bytes, name: str | None = None):
        import onnxruntime as ort

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
        self.temperature = float(meta.get("deepdigits.temperature", 1.0))  # already applied inside the graph
        self.top_label = _top_label(meta.get("deepdigits.top_label"))  # so is this
        self.input_name = self.session.get_inputs()[0].name
        self._card = self._read_card(meta.get("deepdigits.card"), source)
        outputs = [o.name for o in self.session.get_outputs()]
        # the not-a-digit head's inputs, where exported with them (outliers.network_outputs reads them)
        self.open_set = open_set_document(meta.get("deepdigits.open_set"), label) if (
            outputs[1:3] == ["features", "logits"]) else None

    def _read_card(self, stored: str | None, source: str | bytes) -> ModelCard:
        """The card stored at export, else one made from the graph (parameters counted from its weights)."""
        try:
            fields = json.loads(stored) if stored else {}
        except json.JSONDecodeError:
            fields = {}
        if not isinstance(fields, dict):
            fields = {}
        if not isinstance(fields.get("parameters"), int):
            import onnx

            graph = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source)
            fields["parameters"] = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
        return ModelCard(
            name=str(fields.get("name") or self.architecture), architecture=self.architecture, runtime="onnx",
            class_names=self.class_names, parameters=fields["parameters"],
            dataset=fields.get("dataset") if isinstance(fields.get("dataset"), str) else None,
            recipe=fields.get("recipe") if isinstance(fields.get("recipe"), str) else None,
            test_metrics=fields.get("test_metrics") if isinstance(fields.get("test_metrics"), dict) else {},
        )

    @classmethod
    def from_classifier(cls, classifier) -> OnnxClassifier:
        """A loaded classifier exported in memory and run by ONNX Runtime."""
        return cls(onnx_bytes(classifier), name=f"{classifier.architecture} (exported in memory)")

    def card(self) -> ModelCard:
        return self._card

    def predict_proba(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities (N, classes), as ``Classifier.predict_proba``."""
        x = to_tensor(images, self.input_scale).numpy()
        parts = [self.session.run(None, {self.input_name: x[i : i + batch_size]})[0]
                 for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)), np.float32)

    def predict_with_features(self, images: np.ndarray, batch_size: int = 1024) -> tuple:
        """``(probabilities, features, logits)`` as ``outliers.network_outputs``; None for a graph without them."""
        if self.open_set is None:
            return self.predict_proba(images, batch_size), None, None
        x = to_tensor(images, self.input_scale).numpy()
        parts = [self.session.run(["probabilities", "features", "logits"], {self.input_name: x[i : i + batch_size]})
                 for i in range(0, len(x), batch_size)]
        if not parts:
            return self.predict_proba(images), None, None
        return tuple(np.concatenate([p[k] for p in parts]).astype(np.float64 if k else np.float32) for k in range(3))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The most probable class of each image."""
        return self.predict_proba(images).argmax(axis=1)


def export_and_check(classifier, path: str | os.PathLike, probes: int = 64) -> tuple[Path, float]:
    """Export to ONNX, then run ``probes`` random images through both runtimes: ``(path, largest difference)``."""
    written = export_onnx(classifier, path)
    probe = np.random.default_rng(0).integers(0, 256, (probes, 28, 28), dtype=np.uint8)
    difference = float(np.abs(OnnxClassifier(written).predict_proba(probe) - classifier.predict_proba(probe)).max())
    return written, difference
