"""Shared fixtures: the real MNIST files (from DEEPDIGITS_DATA or ../shared/data) and tiny IDX datasets."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from deepdigits import Classifier
from deepdigits.data import DATASETS, DatasetSpec, load_dataset, write_idx

REPO = Path(__file__).resolve().parents[1]


def json_lines(text: str) -> list:
    """Parse JSON Lines output (``predict --json``): one object per line, every line valid JSON."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _real_data_root() -> Path | None:
    for candidate in (os.environ.get("DEEPDIGITS_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _real_data_root()
    if root is None:
        pytest.skip("real MNIST files not found: set DEEPDIGITS_DATA to a folder holding mnist/")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    return load_dataset("mnist", data_dir=data_root)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real cache or download anything by accident."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def make_tiny_dataset(folder: Path, name: str = "tiny", n_train: int = 30, n_test: int = 10, seed: int = 0,
                      compress: bool = True) -> DatasetSpec:
    """Write a tiny IDX dataset into ``folder/name`` and return a spec whose checksums match it."""
    rng = np.random.default_rng(seed)
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    sha = {}
    for file_name, array in arrays.items():
        path = write_idx(target / (file_name + (".gz" if compress else "")), array)
        from deepdigits.data import read_idx_bytes

        sha[file_name] = hashlib.sha256(read_idx_bytes(path)).hexdigest()
    return DatasetSpec(name=name, title="tiny test set", class_names=tuple("abcdefghij"), sha256=sha,
                       mirrors=())


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered tiny dataset in tmp_path/src/tiny; returns (spec, source folder)."""
    spec = make_tiny_dataset(tmp_path / "src")
    monkeypatch.setitem(DATASETS, spec.name, spec)
    return spec, tmp_path / "src"


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


@pytest.fixture(scope="module")
def small_model(mnist):
    clf = Classifier("tutorial-002", seed=0)
    clf.fit(mnist.x_train[:3000], mnist.y_train[:3000], epochs=2, batch_size=32, optimizer="sgd",
            learning_rate=0.1, validation_split=0.1, verbose=0)
    return clf
