"""deepdigits: recognise handwritten digits with deep learning.

Progressive disclosure, Keras-style::

    import deepdigits
    clf = deepdigits.train_recipe("tutorial-003")      # data, network, recipe: one call
    clf.evaluate(*deepdigits.load_dataset().split("test"))["accuracy"]
    clf.save("runs/cnn")
    deepdigits.load("runs/cnn").predict(images)

or step by step with ``load_dataset``, ``Classifier(architecture).fit(...)``, ``.summary()``.
"""

__version__ = "0.1.0"

from .classifier import Classifier, combine, load, train_recipe
from .data import DATASETS, Dataset, load_dataset
from .errors import BundleError, DataError, DeepDigitsError
from .models import REGISTRY, build_model, summary
from .train import RECIPES, Recipe, get_recipe

__all__ = [
    "DATASETS",
    "RECIPES",
    "REGISTRY",
    "BundleError",
    "Classifier",
    "DataError",
    "Dataset",
    "DeepDigitsError",
    "Recipe",
    "__version__",
    "build_model",
    "combine",
    "get_recipe",
    "load",
    "load_dataset",
    "summary",
    "train_recipe",
]
