"""Calibration of model bundles on the MNIST test set: ECE (15 bins), NLL and Brier before and after the temperature.

    python benchmarks/calibration.py                         # the built-in model
    python benchmarks/calibration.py /tmp/fast runs/t003      # any bundles
    python benchmarks/calibration.py --compare /tmp/fast      # temperature against vector scaling, Brent against L-BFGS
    python benchmarks/calibration.py --fit-tail 5000 --write src/deepdigits/builtin

The temperature is always fit on training images (a bundle's recorded held-out slice, or with ``--fit-tail N``
the last N training images); the test set only scores it. ``--write`` records a temperature fit with
``--fit-tail`` in the bundle's model.json (weights untouched), marked as fit on images the model trained on
when its recipe held none out (the built-in model trained on all 60,000).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from deepdigits import load_dataset
from deepdigits.calibrate import fit_temperature, scores, softmax
from deepdigits.classifier import Classifier
from deepdigits.predictor import BUILTIN_MODEL


def lbfgs_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Guo et al.'s way: L-BFGS (strong Wolfe line search) on log T, unbounded, from T = 1."""
    z, y = torch.tensor(logits, dtype=torch.float64), torch.tensor(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def vector_scaling(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Guo et al.'s vector scaling: a weight and a bias per class, ``softmax(w * z + b)``, fit by L-BFGS on NLL."""
    z, y = torch.tensor(logits, dtype=torch.float64), torch.tensor(labels).long()
    w = torch.ones(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z * w + b, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def held_out(clf: Classifier, n_train: int, fit_tail: int | None) -> tuple[range, bool]:
    """The training images to fit on and whether the model trained on them."""
    fit_on = (clf.calibration or {}).get("fit_on") or {}
    if fit_tail is None and fit_on.get("split") == "train" and isinstance(fit_on.get("start"), int):
        return range(fit_on["start"], fit_on["stop"]), bool(fit_on.get("seen_in_training"))
    tail = fit_tail or 5000
    return range(n_train - tail, n_train), True  # a bundle without a record may have trained on every image


def line(name: str, probabilities: np.ndarray, labels: np.ndarray) -> str:
    s = scores(probabilities, labels)
    accuracy = float((probabilities.argmax(1) == labels).mean())
    return (f"| {name} | {accuracy:.2%} | {s['ece']:.2%} | {s['nll']:.4f} | {s['brier']:.4f} | "
            f"{float(np.median(probabilities.max(1))):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="model bundles (default: the built-in model)")
    parser.add_argument("--fit-tail", type=int, metavar="N", help="fit on the last N training images instead")
    parser.add_argument("--compare", action="store_true", help="also vector scaling and L-BFGS")
    parser.add_argument("--write", action="store_true", help="record the --fit-tail temperature in the bundle")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.write and (args.fit_tail is None or len(args.bundles) != 1):
        parser.error("--write needs --fit-tail N and one bundle")

    ds = load_dataset("mnist", data_dir=args.data_dir)
    print("| model, calibration | accuracy | ECE (15 bins) | NLL | Brier | median confidence |")
    print("|---|---|---|---|---|---|")
    for path in args.bundles or [str(BUILTIN_MODEL)]:
        clf = Classifier.load(path)
        chosen, seen = held_out(clf, len(ds.x_train), args.fit_tail)
        fit_z, fit_y = clf.logits(ds.x_train[chosen.start : chosen.stop]), ds.y_train[chosen.start : chosen.stop]
        test_z, test_y = clf.logits(ds.x_test), ds.y_test
        started = time.perf_counter()
        temperature = fit_temperature(fit_z, fit_y)
        seconds = time.perf_counter() - started
        where = f"training images {chosen.start}-{chosen.stop - 1}" + (" (seen in training)" if seen else "")
        name = Path(path).name if Path(path) != BUILTIN_MODEL else "built-in"
        print(line(f"{name}, T = 1", softmax(test_z), test_y))
        print(line(f"{name}, T = {temperature:.4f} fit on {where}", softmax(test_z, temperature), test_y))
        if args.compare:
            started_lbfgs = time.perf_counter()
            t_lbfgs = lbfgs_temperature(fit_z, fit_y)
            lbfgs_seconds = time.perf_counter() - started_lbfgs
            print(line(f"{name}, T = {t_lbfgs:.4f} by L-BFGS ({lbfgs_seconds * 1000:.0f} ms; Brent "
                       f"{seconds * 1000:.0f} ms)", softmax(test_z, t_lbfgs), test_y))
            w, b = vector_scaling(fit_z, fit_y)
            print(line(f"{name}, vector scaling fit on {where}", softmax(test_z * w + b), test_y))
        if args.write:
            write(Path(path), clf, temperature, fit_z, fit_y, chosen, seen, softmax(test_z, temperature), test_y)


def write(path: Path, clf: Classifier, temperature: float, fit_z: np.ndarray, fit_y: np.ndarray, chosen: range,
          seen: bool, test_probabilities: np.ndarray, test_y: np.ndarray) -> None:
    """Record the temperature in ``path/model.json`` (validated; the weights and their checksum untouched)."""
    from deepdigits.atomic import atomic_write_text
    from deepdigits.calibrate import calibration_metrics
    from deepdigits.schema import validate_document

    meta_path = path / "model.json"
    document = json.loads(meta_path.read_text())
    before, after = scores(softmax(fit_z), fit_y), scores(softmax(fit_z, temperature), fit_y)
    on_test = calibration_metrics(test_probabilities, test_y, temperature)
    document["calibration"] = {
        "method": "temperature",
        "temperature": temperature,
        "fit_on": {"dataset": "mnist", "split": "train", "start": chosen.start, "stop": chosen.stop,
                   "seen_in_training": seen, "role": "training images" if seen else "held out", "n": len(chosen)},
        "fit_scores": {**after, **{f"{k}_uncalibrated": v for k, v in before.items()}},
        "note": (f"Fit on the last {len(chosen):,} MNIST training images, which this model trained on (its recipe "
                 "held none out), so the fit may be biased. Scored on the MNIST test set, never used to fit: "
                 f"ECE (15 bins) {on_test['ece_uncalibrated']:.2%} -> {on_test['ece']:.2%}, "
                 f"NLL {on_test['nll_uncalibrated']:.4f} -> {on_test['nll']:.4f}, "
                 f"Brier {on_test['brier_uncalibrated']:.4f} -> {on_test['brier']:.4f}. "
                 f"Command: python benchmarks/calibration.py --fit-tail {len(chosen)} "
                 f"--write {path}") if seen else None,
    }
    if document["calibration"]["note"] is None:
        del document["calibration"]["note"]
    metrics = document.get("metrics") or {}
    metrics["calibration"] = on_test
    document["metrics"] = metrics
    validate_document(document)
    assert math.isfinite(temperature)
    atomic_write_text(meta_path, json.dumps(document, indent=2) + "\n")
    print(f"wrote {meta_path}: temperature {temperature:.4f}")


if __name__ == "__main__":
    main()
