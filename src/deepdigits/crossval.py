"""k-fold cross-validation done right: a fresh network per fold, validated only on data it never saw."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold

from .classifier import Classifier
from .data import Dataset, load_dataset
from .errors import DeepDigitsError
from .recipes import Recipe, get_recipe


def weights_fingerprint(network: torch.nn.Module) -> str:
    """A short hash of all parameters: equal fingerprints mean identical weights."""
    digest = hashlib.sha256()
    for tensor in network.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cross_validate(
    recipe: str | Recipe = "tutorial-004",
    *,
    folds: int = 5,
    seed: int = 1,
    stratified: bool = False,
    epochs: int | None = None,
    dataset: str | Dataset | None = None,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    verbose: int = 1,
) -> dict:
    """k-fold cross-validation of a recipe on the training set (shuffled with ``seed``).

    Every fold builds a new network (initialised with seed ``seed + fold``) and trains it on that
    fold's training part only; the held-out part is its validation data. Returns per-fold scores,
    histories, fingerprints of the initial and final weights, the indices used, and mean/std.
    """
    base = get_recipe(recipe) if isinstance(recipe, str) else recipe
    chosen = base.with_overrides(epochs=epochs)
    if folds < 2:
        raise DeepDigitsError(f"folds: expected at least 2, got {folds}")
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset or chosen.dataset, data_dir=data_dir)
    x, y = ds.x_train, ds.y_train
    if train_size is not None:
        x, y = x[:train_size], y[:train_size]
    if len(x) < folds:
        raise DeepDigitsError(f"folds: {folds} folds need at least {folds} images, got {len(x)}")
    splitter = (StratifiedKFold if stratified else KFold)(n_splits=folds, shuffle=True, random_state=seed)
    results = []
    for fold, (train_idx, val_idx) in enumerate(splitter.split(x, y), start=1):
        if verbose:
            print(f"Fold {fold}/{folds}: training on {len(train_idx):,} images, validating on {len(val_idx):,}",
                  file=sys.stderr)
        clf = Classifier.from_recipe(chosen, class_names=ds.class_names, seed=seed + fold)
        initial = weights_fingerprint(clf.network)
        started = time.perf_counter()
        options = {**chosen.fit_options(), "seed": seed + fold}
        clf.fit(x[train_idx], y[train_idx], validation_data=(x[val_idx], y[val_idx]), verbose=verbose, **options)
        if clf.interrupted:
            raise KeyboardInterrupt
        accuracy = clf.score(x[val_idx], y[val_idx])
        results.append({
            "fold": fold,
            "train_size": len(train_idx),
            "validation_size": len(val_idx),
            "accuracy": accuracy,
            "seconds": time.perf_counter() - started,
            "history": clf.history,
            "initial_weights": initial,
            "final_weights": weights_fingerprint(clf.network),
            "train_indices": train_idx,
            "validation_indices": val_idx,
        })
        if verbose:
            print(f"Fold {fold}/{folds}: accuracy {accuracy * 100:.3f}%", file=sys.stderr)
    scores = np.array([r["accuracy"] for r in results])
    return {
        "recipe": chosen.to_dict(),
        "dataset": ds.name,
        "folds": folds,
        "seed": seed,
        "stratified": stratified,
        "n_images": len(x),
        "scores": scores.tolist(),
        "mean": float(scores.mean()),
        "std": float(scores.std()),  # population std, as tutorial 004's numpy std
        "fold_results": results,
    }


def to_json(result: dict) -> dict:
    """The result without the index arrays, ready for ``json.dumps``."""
    out = {k: v for k, v in result.items() if k != "fold_results"}
    out["fold_results"] = [
        {k: v for k, v in r.items() if k not in ("train_indices", "validation_indices")}
        for r in result["fold_results"]
    ]
    return out


def save_crossval(result: dict, folder: str | os.PathLike) -> Path:
    """Write ``crossval.json``, ``curves.png`` and ``scores.png`` into ``folder`` (each atomically)."""
    import json

    from .atomic import atomic_write_text
    from .plots import crossval_curves, crossval_scores, save_figure

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "crossval.json", json.dumps(to_json(result), indent=2, allow_nan=False) + "\n")
    save_figure(crossval_curves(result["fold_results"]), out / "curves.png")
    save_figure(crossval_scores(result["scores"]), out / "scores.png")
    return out
