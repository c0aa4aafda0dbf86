"""Calibration of model bundles on the MNIST test set: ECE (15 bins), NLL and Brier before and after calibration.

    python benchmarks/calibration.py                         # the built-in model
    python benchmarks/calibration.py /tmp/fast runs/t003      # any bundles
    python benchmarks/calibration.py --compare /tmp/fast      # other calibration maps, Brent against L-BFGS
    python benchmarks/calibration.py --fit-tail 5000 --write src/deepdigits/builtin

The calibration is always fit on training images (a bundle's recorded held-out slice, or with ``--fit-tail N``
the last N training images); the test set only scores it. Rows: T = 1; the temperature alone; and where the
bundle's held-out cross-validation chose it, the temperature and the top-label map (calibrate.fit_calibration).
Beside each ECE: its sampling noise on the test set (the standard deviation over ``--rounds`` bootstrap
resamples of the test images) and the ECE a perfectly calibrated model with the same confidences would show on
as many images (labels drawn right with probability equal to the confidence, mean +- sd): ECE is biased upwards
on a finite set, so this is the floor to read it against. ``--compare`` also scores other maps, each fit on the
same held-out images and first compared there by 5-fold cross-validation (twice, shuffled), which is how a
method is chosen: the test set only confirms.

``--write`` records a calibration fit with ``--fit-tail`` in the bundle's model.json (weights untouched), marked
as fit on images the model trained on when its recipe held none out (the built-in model trained on all 60,000).
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
from deepdigits.calibrate import (
    TOP_LABEL,
    calibrated_probabilities,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    fit_top_label,
    scores,
    softmax,
)
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


def entropy_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """A temperature that depends on the input: ``log T = a + b * H``, H the entropy of ``softmax(logits)``
    over log(classes) (0-1); ``a`` starts at the fitted temperature, ``b`` at 0; L-BFGS on NLL."""
    z, y = torch.tensor(logits, dtype=torch.float64), torch.tensor(labels).long()
    a = torch.tensor([math.log(fit_temperature(logits, labels))], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([a, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(_entropy_scaled(z, a, b), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(a.detach()), float(b.detach())


def _entropy_scaled(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(z, dim=1)
    h = -(log_p.exp() * log_p).sum(dim=1, keepdim=True) / math.log(z.shape[1])
    return z / torch.exp(a + b * h)


def temperature_and_bias(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """One scale for every class and a bias per class, ``softmax(s * z + b)``, fit by L-BFGS on NLL."""
    z, y = torch.tensor(logits, dtype=torch.float64), torch.tensor(labels).long()
    log_s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_s, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z * log_s.exp() + b, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_s.detach().exp()), b.detach().numpy()


def ece_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature with the lowest held-out ECE (15 bins), on a log grid of 600 over the fit's range."""
    grid = np.exp(np.linspace(math.log(1 / 16), math.log(16), 600))
    return float(grid[int(np.argmin([expected_calibration_error(softmax(logits, t), labels) for t in grid]))])


def isotonic_top_label(logits: np.ndarray, labels: np.ndarray):
    """After T, the top confidence mapped by scikit-learn's IsotonicRegression (right or wrong against it), the
    other classes rescaled to share the rest (the answer can change where the map drops below the second)."""
    from sklearn.isotonic import IsotonicRegression

    temperature = fit_temperature(logits, labels)
    p = softmax(logits, temperature)
    iso = IsotonicRegression(y_min=1e-6, y_max=1 - 1e-6, out_of_bounds="clip").fit(
        p.max(1), (p.argmax(1) == labels).astype(float))
    return temperature, iso


def _as_probabilities(fitted) -> callable:
    kind, params = fitted
    if kind == "temperature":
        return lambda z: softmax(z, params)
    if kind == "top-label":
        return lambda z: calibrated_probabilities(z, *params)
    if kind == "isotonic":
        def isotonic(z: np.ndarray) -> np.ndarray:
            p = softmax(z, params[0])
            top, rows = p.argmax(1), np.arange(len(p))
            g = params[1].predict(p[rows, top])
            out = p * ((1 - g) / np.clip(1 - p[rows, top], 1e-12, None))[:, None]
            out[rows, top] = g
            return out
        return isotonic
    if kind == "scale-bias":
        return lambda z: softmax(z * params[0] + params[1])
    a, b = params  # entropy temperature
    return lambda z: torch.softmax(_entropy_scaled(torch.tensor(z, dtype=torch.float64), torch.tensor(a),
                                                   torch.tensor(b)), dim=1).numpy()


MAPS = {
    "temperature (NLL, as trained)": lambda z, y: ("temperature", fit_temperature(z, y)),
    "temperature (lowest ECE)": lambda z, y: ("temperature", ece_temperature(z, y)),
    "temperature + top-label map (Platt)": lambda z, y: ("top-label", (t := fit_temperature(z, y),
                                                                         fit_top_label(z, y, t))),
    "temperature + top-label isotonic": lambda z, y: ("isotonic", isotonic_top_label(z, y)),
    "temperature + bias per class": lambda z, y: ("scale-bias", temperature_and_bias(z, y)),
    "vector scaling": lambda z, y: ("scale-bias", vector_scaling(z, y)),
    "entropy temperature": lambda z, y: ("entropy", entropy_temperature(z, y)),
}


def cross_validated(logits: np.ndarray, labels: np.ndarray, fit, folds: int = 5, repeats: int = 2) -> tuple:
    """Mean NLL and ECE on held-out folds of the calibration images (the map fit on the other folds)."""
    rng = np.random.default_rng(0)
    nll, ece = [], []
    for _ in range(repeats):
        parts = np.array_split(rng.permutation(len(labels)), folds)
        for k in range(folds):
            rest = np.concatenate([parts[j] for j in range(folds) if j != k])
            p = _as_probabilities(fit(logits[rest], labels[rest]))(logits[parts[k]])
            nll.append(scores(p, labels[parts[k]])["nll"])
            ece.append(expected_calibration_error(p, labels[parts[k]]))
    return float(np.mean(nll)), float(np.mean(ece))


def ece_noise(probabilities: np.ndarray, labels: np.ndarray, rounds: int) -> tuple[float, float, float]:
    """ECE's bootstrap standard deviation over the test images, and the mean and sd of the ECE a perfectly
    calibrated model with these confidences shows on as many images."""
    rng = np.random.default_rng(0)
    n = len(labels)
    boot = [expected_calibration_error(probabilities[i], labels[i]) for i in (rng.integers(0, n, n)
                                                                                for _ in range(rounds))]
    confidence, predicted = probabilities.max(1), probabilities.argmax(1)
    wrong = (predicted + 1) % probabilities.shape[1]  # any other class: only right or wrong counts
    floor = [expected_calibration_error(probabilities, np.where(rng.random(n) < confidence, predicted, wrong))
             for _ in range(rounds)]
    return float(np.std(boot)), float(np.mean(floor)), float(np.std(floor))


def held_out(clf: Classifier, n_train: int, fit_tail: int | None) -> tuple[range, bool]:
    """The training images to fit on and whether the model trained on them."""
    fit_on = (clf.calibration or {}).get("fit_on") or {}
    if fit_tail is None and fit_on.get("split") == "train" and isinstance(fit_on.get("start"), int):
        return range(fit_on["start"], fit_on["stop"]), bool(fit_on.get("seen_in_training"))
    tail = fit_tail or 5000
    return range(n_train - tail, n_train), True  # a bundle without a record may have trained on every image


def line(name: str, probabilities: np.ndarray, labels: np.ndarray, rounds: int = 0) -> str:
    s = scores(probabilities, labels)
    accuracy = float((probabilities.argmax(1) == labels).mean())
    noise = "| | |"
    if rounds:
        sd, floor, floor_sd = ece_noise(probabilities, labels, rounds)
        noise = f"| +-{sd:.2%} | {floor:.2%} +-{floor_sd:.2%} |"
    return (f"| {name} | {accuracy:.2%} | {s['ece']:.2%} {noise} {s['nll']:.4f} | {s['brier']:.4f} | "
            f"{float(np.median(probabilities.max(1))):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="model bundles (default: the built-in model)")
    parser.add_argument("--fit-tail", type=int, metavar="N", help="fit on the last N training images instead")
    parser.add_argument("--compare", action="store_true", help="also other calibration maps and L-BFGS")
    parser.add_argument("--rounds", type=int, default=200, help="bootstrap rounds for ECE's noise (0: none)")
    parser.add_argument("--write", action="store_true", help="record the --fit-tail temperature in the bundle")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.write and (args.fit_tail is None or len(args.bundles) != 1):
        parser.error("--write needs --fit-tail N and one bundle")

    ds = load_dataset("mnist", data_dir=args.data_dir)
    import os
    import platform

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Machine: {_cpu()}, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores, load average {load}; Python {platform.python_version()}")
    print("| model, calibration | accuracy | ECE (15 bins) | ECE noise (bootstrap sd) | ECE if perfectly calibrated "
          "| NLL | Brier | median confidence |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.bundles or [str(BUILTIN_MODEL)]:
        clf = Classifier.load(path)
        chosen, seen = held_out(clf, len(ds.x_train), args.fit_tail)
        fit_z, fit_y = clf.logits(ds.x_train[chosen.start : chosen.stop]), ds.y_train[chosen.start : chosen.stop]
        test_z, test_y = clf.logits(ds.x_test), ds.y_test
        started = time.perf_counter()
        temperature = fit_temperature(fit_z, fit_y)
        seconds = time.perf_counter() - started
        # the bundle's own calibration where it recorded its images, else fit here (what training does)
        stored = args.fit_tail is None and (clf.calibration or {}).get("fit_on", {}).get("start") is not None
        fitted = ({"method": (clf.calibration or {}).get("method"), "temperature": clf.temperature,
                   "top_label": clf.top_label, "cross_validated_nll": (clf.calibration or {}).get(
                       "cross_validated_nll")} if stored else fit_calibration(fit_z, fit_y))
        where = f"training images {chosen.start}-{chosen.stop - 1}" + (" (seen in training)" if seen else "")
        name = Path(path).name if Path(path) != BUILTIN_MODEL else "built-in"
        print(line(f"{name}, T = 1", softmax(test_z), test_y, args.rounds))
        print(line(f"{name}, T = {temperature:.4f} fit on {where}", softmax(test_z, temperature), test_y,
                   args.rounds))
        cv = fitted.get("cross_validated_nll") or {}
        chosen_by = ", ".join(f"{k} {v:.4f}" for k, v in cv.items())
        if fitted["method"] == TOP_LABEL:
            a, b = fitted["top_label"]
            print(line(f"{name}, chosen: T = {fitted['temperature']:.4f} + top label {b:.3f} L {a:+.3f} "
                       f"(held-out 5-fold NLL: {chosen_by})",
                       calibrated_probabilities(test_z, fitted["temperature"], fitted["top_label"]), test_y,
                       args.rounds))
        else:
            print(f"| {name}, chosen: the temperature (held-out 5-fold NLL: {chosen_by or 'not recorded'}) "
                  "| | | | | | | |")
        if args.compare:
            started_lbfgs = time.perf_counter()
            t_lbfgs = lbfgs_temperature(fit_z, fit_y)
            lbfgs_seconds = time.perf_counter() - started_lbfgs
            print(line(f"{name}, T = {t_lbfgs:.4f} by L-BFGS ({lbfgs_seconds * 1000:.0f} ms; Brent "
                       f"{seconds * 1000:.0f} ms)", softmax(test_z, t_lbfgs), test_y))
            for method, fit in MAPS.items():
                cv_nll, cv_ece = cross_validated(fit_z, fit_y, fit)
                probabilities = _as_probabilities(fit(fit_z, fit_y))(test_z)
                print(line(f"{name}, {method}: 5-fold on the held-out images NLL {cv_nll:.4f}, ECE {cv_ece:.2%}",
                           probabilities, test_y, args.rounds))
        if args.write:
            write(Path(path), fitted, fit_z, fit_y, chosen, seen, test_z, test_y)


def _cpu() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def write(path: Path, fitted: dict, fit_z: np.ndarray, fit_y: np.ndarray, chosen: range, seen: bool,
          test_z: np.ndarray, test_y: np.ndarray) -> None:
    """Record the calibration in ``path/model.json`` (validated; the weights and their checksum untouched)."""
    from deepdigits.atomic import atomic_write_text
    from deepdigits.calibrate import calibration_metrics
    from deepdigits.schema import validate_document

    meta_path = path / "model.json"
    document = json.loads(meta_path.read_text())
    temperature, top_label = fitted["temperature"], fitted["top_label"]
    before = scores(softmax(fit_z), fit_y)
    after = scores(calibrated_probabilities(fit_z, temperature, top_label), fit_y)
    on_test = calibration_metrics(calibrated_probabilities(test_z, temperature, top_label), test_y, temperature,
                                  top_label)
    document["calibration"] = {
        "method": fitted["method"],
        "temperature": temperature,
        **({"top_label": {"intercept": top_label[0], "slope": top_label[1]}} if top_label else {}),
        **({"cross_validated_nll": fitted["cross_validated_nll"]} if fitted.get("cross_validated_nll") else {}),
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
    print(f"wrote {meta_path}: {fitted['method']}, temperature {temperature:.4f}, top label {top_label}")


if __name__ == "__main__":
    main()
