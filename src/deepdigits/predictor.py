"""What answers with probabilities: the ``Predictor`` protocol, its ``ModelCard``, and ``load()`` for any model."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import DeepDigitsError

BUILTIN_MODEL = Path(__file__).resolve().parent / "builtin"
RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class ModelCard:
    """What a predictor says about itself: the same fields whatever runs it (PyTorch, an ensemble, ONNX Runtime)."""

    name: str
    architecture: str
    runtime: str
    class_names: tuple[str, ...]
    parameters: int
    dataset: str | None = None
    recipe: str | None = None
    test_metrics: dict = field(default_factory=dict)  # accuracy, loss, n where the model was evaluated

    def to_dict(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "runtime": self.runtime,
                "class_names": list(self.class_names), "parameters": self.parameters, "dataset": self.dataset,
                "recipe": self.recipe, "test_metrics": dict(self.test_metrics)}


@runtime_checkable
class Predictor(Protocol):
    """A model that recognises MNIST-style images: ``Classifier``, an ensemble, or ``export.OnnxClassifier``."""

    class_names: tuple[str, ...]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) for uint8 images (N, 28, 28) or floats in [0, 1]."""
        ...

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The most probable class of each image."""
        ...

    def card(self) -> ModelCard:
        """Name, architecture, size and test metrics."""
        ...


@functools.lru_cache(maxsize=1)
def builtin_model():
    """The model shipped with the package (trained by ``deepdigits train --recipe best`` on MNIST), loaded once."""
    from .classifier import Classifier

    if not (BUILTIN_MODEL / "model.json").is_file():
        raise DeepDigitsError(f"the built-in model is missing from {BUILTIN_MODEL}; pass --model BUNDLE")
    return Classifier.load(BUILTIN_MODEL)


def load(source: str | os.PathLike | None = None, runtime: str = "torch") -> Predictor:
    """A predictor from nothing (the built-in model), a bundle folder or an ``.onnx`` file.

    With ``runtime="onnx"`` a bundle (or the built-in model) is exported in memory and run by ONNX Runtime.
    """
    if runtime not in RUNTIMES:
        raise DeepDigitsError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if source is not None and str(source).endswith(".onnx"):
        from .export import OnnxClassifier

        return OnnxClassifier(source)
    if source is None:
        model = builtin_model()
    else:
        from .classifier import Classifier

        model = Classifier.load(source)
    if runtime == "onnx":
        from .export import OnnxClassifier

        return OnnxClassifier.from_classifier(model)
    return model
