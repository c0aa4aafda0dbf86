"""deepdigits: recognise handwritten digits with deep learning.

Progressive disclosure, Keras-style::

    import deepdigits
    clf = deepdigits.train_recipe("tutorial-003")      # data, network, recipe: one call
    clf.score(*deepdigits.load_dataset().split("test"))
    clf.save("runs/cnn")
    deepdigits.load("runs/cnn").predict(images)          # deepdigits.load() alone: the built-in model

or step by step with ``load_dataset``, ``Classifier.from_recipe(...)`` / ``Classifier(architecture).fit(...)``,
``.summary()``. Names are imported on first use, so ``import deepdigits`` (and the CLI's ``--help``) stays
instant; torch loads when a name that needs it is first touched.
"""

import os as _os
from importlib import import_module

from .errors import BundleError, DataError, DeepDigitsError

# OpenMP threads that wait for each other spin by default (libgomp: up to 300,000 pause loops), taking the
# core from the thread they wait for whenever other work shares the machine. The policy is read once, when
# torch loads its OpenMP runtime, so it is chosen here, before any torch import (a user's own setting wins).
# One epoch on 2 cores shared with other work (load 3-6), passive against the default, alternated in fresh
# processes: tutorial-004 1.69 s against 15.5 s (9x; 1 thread: 2.36 s), tutorial-003 40 s against 152 s.
# The number of threads, and so the arithmetic, is unchanged. Re-measured (benchmarks/RESULTS.md, "Speed-ups
# tried"): tutorial-004 at load 3.8-6.4, passive 2.5 s against libgomp's default spinning 15.9 s; at load
# 1.6-1.9 spinning wins (0.85 s against 1.54 s) until other work arrives (one such run: 18.7 s). Passive only
# when the load average is high was not adopted: the choice is made once, at import, so a run started in a lull
# spins through the contention that follows.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "__version__": "version",  # importlib.metadata costs ~50 ms: only when asked for
    "Classifier": "classifier",
    "combine": "classifier",
    "train_recipe": "classifier",
    "train_run": "runs",
    "load": "predictor",
    "Predictor": "predictor",
    "ModelCard": "predictor",
    "DATASETS": "data",
    "Dataset": "data",
    "load_dataset": "data",
    "REGISTRY": "models",
    "build_model": "models",
    "summary": "models",
    "RECIPES": "recipes",
    "Recipe": "recipes",
    "get_recipe": "recipes",
}

__all__ = ["BundleError", "DataError", "DeepDigitsError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepdigits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
