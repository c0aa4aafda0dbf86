"""Re-run the five seed tutorials from scratch and set our test accuracy beside the one each claimed."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .classifier import train_recipe
from .data import Dataset, load_dataset
from .errors import DeepDigitsError
from .recipes import get_recipe


@dataclass(frozen=True)
class Claim:
    tutorial: str
    text: str  # as the tutorial put it
    low: float  # accepted range of our test accuracy, in percent
    high: float


# "within 0.5 points of the claim where the tutorial gives a number; inside 95-98% for tutorial 000"
CLAIMS: dict[str, Claim] = {
    "000": Claim("000", "around 95-98%", 95.0, 98.0),
    "001": Claim("001", "98.4%", 97.9, 98.9),
    "002": Claim("002", "90.18%", 89.68, 90.68),
    "003": Claim("003", "98.95%", 98.45, 99.45),
    "004": Claim("004", "97.83%", 97.33, 98.33),
}


def reproduce(
    tutorials: list[str] | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    train_size: int | None = None,
    seed: int | None = None,
    save_dir: str | os.PathLike | None = None,
    verbose: int = 1,
) -> list[dict]:
    """Train each tutorial's recipe on the full data and return one row per tutorial.

    ``epochs`` and ``train_size`` shorten a run for a smoke test; the claims assume neither.
    With ``save_dir``, each tutorial's model bundle is saved there as ``tutorial-NNN``.
    """
    chosen = tutorials or list(CLAIMS)
    unknown = [t for t in chosen if t not in CLAIMS]
    if unknown:
        raise DeepDigitsError(f"unknown tutorial {unknown[0]!r}; expected one of: {', '.join(CLAIMS)}")
    full = load_dataset("mnist", data_dir=data_dir)
    dataset = full
    if train_size is not None:
        dataset = Dataset(full.name, full.x_train[:train_size], full.y_train[:train_size], full.x_test,
                          full.y_test, full.class_names, full.source, full.checksums)
    rows = []
    for tutorial in chosen:
        recipe = get_recipe(f"tutorial-{tutorial}")
        started = time.perf_counter()
        clf = train_recipe(recipe, dataset=dataset, epochs=epochs, seed=seed, verbose=verbose)
        seconds = time.perf_counter() - started
        if save_dir is not None:
            clf.save(Path(save_dir) / recipe.name)
        accuracy = clf.score(full.x_test, full.y_test) * 100.0
        claim = CLAIMS[tutorial]
        rows.append({
            "tutorial": tutorial,
            "recipe": recipe.name,
            "network": clf.architecture,
            "layers": recipe.description.split(": ", 1)[-1],
            "params": clf.n_params,
            "epochs": len(clf.history),
            "train_seconds": round(seconds, 1),
            "test_accuracy": round(accuracy, 2),
            "claimed": claim.text,
            "accepted_range": [claim.low, claim.high],
            "within_claim": claim.low <= accuracy <= claim.high,
            "full_recipe": epochs in (None, recipe.epochs) and train_size is None,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| tutorial | network | parameters | epochs | training s | our test accuracy | claimed | within claim |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        verdict = "yes" if r["within_claim"] else "no"
        if not r["full_recipe"]:
            verdict += " (shortened run)"
        lines.append(
            f"| {r['tutorial']} | {r['layers']} | {r['params']:,} | {r['epochs']} | {r['train_seconds']:.1f} "
            f"| {r['test_accuracy']:.2f}% | {r['claimed']} | {verdict} |"
        )
    return "\n".join(lines)
