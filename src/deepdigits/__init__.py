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


def _other_work_running() -> bool | None:
    """Whether other threads are runnable on this machine right now (the median of 5 looks at /proc/loadavg's
    running count, 1 ms apart, less this process's own thread); None where there is no /proc/loadavg."""
    import time

    counts = []
    try:
        for _ in range(5):
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.001)
    except (OSError, ValueError, IndexError):
        return None
    return sorted(counts)[len(counts) // 2] >= 1


# OpenMP threads that wait for each other spin (libgomp: up to 300,000 pause loops), which pays on free cores
# and takes the core from the thread they wait for when other work holds it. The policy is read once, when
# torch loads its OpenMP runtime, so it is chosen here, before any torch import; a user's own OMP_WAIT_POLICY
# or GOMP_SPINCOUNT wins. It changes no result, only time. Tutorial-004, one epoch, 2 cores, fresh processes
# alternated (benchmarks/profile_tutorials.py --wait-policies; RESULTS.md "Speed-ups tried"):
# - free cores (load 1.1-1.3): passive 1.62 s, spinning 1,000 / 10,000 / 100,000 times then sleeping 1.45 /
#   0.96 / 0.91 s, libgomp's default 0.90 s;
# - beside three busy processes (load 1.8-4.1): passive 2.82 s, 3,000 spins 3.91 s, 10,000 spins 5.05 s, the
#   default 15.6 s (earlier runs at load 4-11: 6x passive, fully active 13x: spinners starve the thread they
#   wait for).
# So: where other work is running at import, passive; where none is, 10,000 spins, which keeps most of
# spinning's gain (1.7x passive) and, should other work arrive later in the run, costs 1.8x passive, not the
# default's 5-13x. Running threads are counted at that moment, not by the load average, which lags a minute and
# counts this machine's own last run (after a 2-thread run on 2 cores it reads about 2: "busy").
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    if _other_work_running() is False:
        _os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="10000")
    else:
        _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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
