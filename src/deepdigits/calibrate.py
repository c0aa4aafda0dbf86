"""Calibrated probabilities: a temperature (Guo et al. 2017), then a top-label map where it helps; ECE, NLL, Brier."""

from __future__ import annotations

import math

import numpy as np

N_BINS = 15  # equal-width confidence bins of the expected calibration error, as Guo et al.
# Training images held out for calibration when a recipe has no validation split. Measured on `fast`, 5 seeds
# (test accuracy, then test ECE after T): trained on all 60,000 99.03% (mean); holding out the last 5,000 98.94%,
# ECE 0.21-0.35%; the last 2,000 99.05%, ECE 0.16-0.50%; the last 1,000 98.98%, ECE 0.25-0.59%. On the
# built-in model's logits a T fit on 2,000 images ranged 0.37-0.44 (test ECE <= 0.14%), on 1,000 0.17-0.47.
HOLDOUT = 2000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0  # what a bundle may store (open interval)
FIT_RANGE = (1 / 16, 16.0)  # what the fit searches: inside the stored range, so its bounds are valid too
TEMPERATURE, TOP_LABEL = "temperature", "temperature+top-label"  # the calibration methods a bundle may name
MAX_SLOPE, MAX_INTERCEPT = 20.0, 50.0  # what a bundle may store for the top-label map: 0 < slope, |intercept|
KEEP = 0.999  # the top-label map lowers the top logit at most to 99.9% of the way to the second: answers stay


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log softmax(logits / temperature)`` in float64, stable for any logit size."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64."""
    return np.exp(log_softmax(logits, temperature))


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Logits whose softmax is ``probabilities`` (log p; a probability that underflowed to 0 counts as 1e-45)."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-45, None))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per equal-width confidence bin ``(lo, hi]``: count, mean confidence and accuracy (NaN where empty)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of exactly 0 joins the first
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / counts
        accuracy = np.bincount(index, correct.astype(np.float64), n_bins) / counts
    return {"edges": edges, "counts": counts, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: the count-weighted mean of |accuracy - confidence| over equal-width confidence bins (a fraction)."""
    bins = reliability_bins(probabilities, labels, n_bins)
    counts = bins["counts"]
    if not counts.sum():
        return 0.0
    filled = counts > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((counts[filled] * gaps).sum() / counts.sum())


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean ``-log p(true class)`` (natural log), with scikit-learn's clipping of 0 and 1."""
    from sklearn.metrics import log_loss

    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(probabilities):
        return 0.0
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7
    return float(log_loss(np.asarray(labels), probabilities, labels=list(range(probabilities.shape[1]))))


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: the mean over samples of the summed squared distance to the one-hot label (0-2)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if not len(probabilities):
        return 0.0
    one_hot = np.eye(probabilities.shape[1])[np.asarray(labels).astype(np.int64)]
    return float(((probabilities - one_hot) ** 2).sum(axis=1).mean())


def nll_of_logits(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of ``softmax(logits / temperature)``, computed in log space (no clipping)."""
    log_p = log_softmax(logits, temperature)
    return float(-log_p[np.arange(len(log_p)), np.asarray(labels).astype(np.int64)].mean())


# Temperature scaling against vector scaling (a weight and a bias per class, Guo et al.), both fit on the same
# held-out images and scored on the MNIST test set (benchmarks/calibration.py --compare), temperature first:
#   built-in model (5,000 images): ECE 0.09% vs 0.25%, NLL 0.0096 vs 0.0549, accuracy 99.69% vs 99.65%
#   fast (2,000 held out):         ECE 0.50% vs 0.53%, NLL 0.0306 vs 0.1457, accuracy 99.03% vs 98.69%
#   tutorial 002 (2,000 held out): ECE 1.15% vs 1.41%, NLL 0.3732 vs 0.3849, accuracy 89.06% vs 88.88%
# Vector scaling over-fits a held-out set with few mistakes and changes answers; temperature is kept. (Isotonic
# regression of tutorial 002's top-label confidence: test ECE 2.13%; the best T for its test set, 1.16%.)
# Measured again on tutorial 002, seeds 0-2 (--compare; test ECE sampling noise +-0.2 points, and a perfectly
# calibrated model with its confidences would show 0.65% on 10,000 images): T by NLL 1.15/1.41/0.89%; T by
# lowest held-out ECE 2.57/3.17/2.68%; a scale and a bias per class 1.45/1.21/1.10% (better held-out NLL in
# 5-fold cross-validation, worse test NLL); a temperature depending on the entropy (log T = a + b H)
# 1.08/0.93/1.23%, NLL better in cross-validation on the held-out images and on the test set for every seed,
# but worse in cross-validation for fast and tutorials 000, 001, 003, 004 and within the noise on tutorial
# 002's ECE: not adopted. Holding out every 30th image instead of the last 2,000
# (the last 2,000 are MNIST's easiest: tutorial 002 reads 92.8% of them held out, 86.5-91.0% of every other
# 2,000 it trained on) gave a T nearer the test set's own by NLL but test ECE 1.80/1.52/1.31%: the tail is kept.
# What met 1% (benchmarks/RESULTS.md, "Calibration"): a top-label map after T (fit_calibration), fit on tutorial
# 002's last 10,000 training images held out (Recipe.calibration_split): test ECE 0.89/0.76/0.75% against
# 2.15/1.94/1.19% for T alone on the same images; on the last 2,000 the map made it worse (1.92/2.48/2.02%).
def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on held-out logits, within ``FIT_RANGE``.

    A bounded 1-D search (Brent's method) on log T. The NLL is convex in 1/T, so the search finds the
    optimum; when the held-out set is all right (the NLL keeps falling as T -> 0) it stops at the bound.
    Measured against L-BFGS on log T with a strong Wolfe line search (benchmarks/calibration.py --compare):
    both give T = 0.4215 on the built-in model's held-out logits, 0.4807 on `fast`'s and 0.5870 on
    tutorial 002's, Brent in 3-20 ms, L-BFGS in 1.6-2.8 s. On an all-right held-out set L-BFGS ran on to
    T = 0.015 (no finite optimum) where the bounded search stops at 1/16; without the line search (lr
    0.01, 100 steps) L-BFGS stopped far from the optimum (T = 0.77 for 0.42). L-BFGS does find optima
    beyond the bounds (T = 421 for logits scaled by 1000), which this search cannot; the recipes
    measured T from 0.42 (`best`) to 6.6 (tutorial 000, raw 0-255 pixels).
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if not len(logits):
        return 1.0
    low, high = math.log(FIT_RANGE[0]), math.log(FIT_RANGE[1])
    result = minimize_scalar(lambda log_t: nll_of_logits(logits, labels, math.exp(log_t)),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    # Brent's bounded method stops within xatol of a bound, never on it: snap to the bound it approached
    for bound, value in ((low, FIT_RANGE[0]), (high, FIT_RANGE[1])):
        if abs(result.x - bound) < 1e-4:
            return value
    return float(math.exp(result.x))


def calibrated_logits(z, temperature: float = 1.0, top_label: tuple[float, float] | None = None):
    """Logits (a torch tensor, N x classes) whose softmax is the calibrated probabilities.

    ``z / temperature``; then, with ``top_label = (a, b)``, the top class's log-odds against the others,
    ``L = z_top - logsumexp(z_others)``, become ``a + b * L`` (Platt scaling of the top label's confidence,
    as Kumar et al. 2019 and Gupta & Ramdas 2022 calibrate it) by shifting the top logit alone: the other
    classes keep their ratios and the answer never changes (the shift stops short of the second class, see
    ``KEEP``). Written in tensor operations the ONNX export traces: the same code answers in both.
    """
    import torch

    if temperature != 1.0:
        z = z / temperature
    if top_label is None:
        return z
    intercept, slope = top_label
    top = z.argmax(dim=1, keepdim=True)
    is_top = torch.arange(z.shape[1], device=z.device) == top
    others = z.masked_fill(is_top, float("-inf"))
    top_z = z.gather(1, top)
    log_odds = top_z - others.logsumexp(dim=1, keepdim=True)
    shift = torch.maximum(intercept + (slope - 1.0) * log_odds, (others.amax(dim=1, keepdim=True) - top_z) * KEEP)
    return z + is_top.to(z.dtype) * shift


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0,
                             top_label: tuple[float, float] | None = None) -> np.ndarray:
    """``softmax(calibrated_logits(logits, ...))`` in float64, for NumPy logits."""
    import torch

    z = calibrated_logits(torch.as_tensor(np.asarray(logits, dtype=np.float64)), temperature, top_label)
    return torch.softmax(z, dim=1).numpy()


def uncalibrated_probabilities(probabilities: np.ndarray, temperature: float = 1.0,
                               top_label: tuple[float, float] | None = None) -> np.ndarray:
    """The network's own probabilities (T = 1) from calibrated ones: ``calibrated_logits`` undone.

    Exact up to rounding: the top-label map is strictly increasing in the top log-odds on both sides of its
    floor, so it is inverted piecewise; then ``softmax(T * log p)``, since ``log p = logits / T - constant``.
    """
    q = logits_of(probabilities)
    if top_label is not None and len(q):
        intercept, slope = top_label
        rows, top = np.arange(len(q)), q.argmax(axis=1)
        others = q.copy()
        others[rows, top] = -np.inf
        rest = np.logaddexp.reduce(others, axis=1)
        log_odds, second = q[rows, top] - rest, others.max(axis=1) - rest
        q = q.copy()
        q[rows, top] = rest + np.minimum((log_odds - intercept) / slope, (log_odds - KEEP * second) / (1 - KEEP))
    return softmax(q, 1.0 / temperature)


def top_log_odds(logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The answer (argmax) and its log-odds against the other classes, ``z_top - logsumexp(z_others)``, of
    ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    rows, top = np.arange(len(z)), z.argmax(axis=1)
    others = z.copy()
    others[rows, top] = -np.inf
    return top, z[rows, top] - np.logaddexp.reduce(others, axis=1)


def fit_top_label(logits: np.ndarray, labels: np.ndarray, temperature: float) -> tuple[float, float] | None:
    """Platt scaling of the top label: ``(a, b)`` such that ``sigmoid(a + b * L)`` is the chance the answer is
    right, L its log-odds after the temperature; scikit-learn's unpenalised logistic regression on held-out
    logits. ``None`` where it cannot be fit (all right, all wrong) or leaves the stored range."""
    from sklearn.linear_model import LogisticRegression

    top, log_odds = top_log_odds(logits, temperature)
    right = (top == np.asarray(labels)).astype(np.int64)
    if right.min() == right.max():
        return None
    # Newton's method with the 2x2 Hessian: 10-12 ms a fit on 2,000-10,000 images against 24-25 ms for lbfgs
    model = LogisticRegression(C=np.inf, solver="newton-cholesky", max_iter=100).fit(log_odds[:, None], right)
    intercept, slope = float(model.intercept_[0]), float(model.coef_[0, 0])
    if not (0 < slope < MAX_SLOPE and abs(intercept) < MAX_INTERCEPT):
        return None
    return intercept, slope


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float, top_label: tuple[float, float] | None) -> float:
    """Mean NLL of the calibrated probabilities, in log space (no clipping)."""
    import torch

    log_p = torch.log_softmax(calibrated_logits(torch.as_tensor(logits), temperature, top_label), dim=1).numpy()
    return float(-log_p[np.arange(len(log_p)), labels].mean())


def fit_calibration(logits: np.ndarray, labels: np.ndarray, folds: int = 5, repeats: int = 2) -> dict:
    """Fit a temperature, and a top-label map after it; keep the map only where it predicts held-out images
    better: lower NLL in ``folds``-fold cross-validation (``repeats`` shuffles) on the images given.

    Returns ``method``, ``temperature``, ``top_label`` (``(a, b)`` or ``None``) and ``cross_validated_nll``
    of each method. Measured on tutorial 002 (benchmarks/RESULTS.md, "Calibration"): the map lowers test ECE
    where one temperature cannot, but only when fit on enough held-out images (10,000, not 2,000).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    temperature = fit_temperature(logits, labels)
    top_label = fit_top_label(logits, labels, temperature)
    record = {"method": TEMPERATURE, "temperature": temperature, "top_label": None}
    if top_label is None or len(labels) < 2 * folds:
        return record
    rng = np.random.default_rng(0)
    losses: dict[str, list[float]] = {TEMPERATURE: [], TOP_LABEL: []}
    for _ in range(repeats):
        parts = np.array_split(rng.permutation(len(labels)), folds)
        for k in range(folds):
            rest = np.concatenate([parts[j] for j in range(folds) if j != k])
            t = fit_temperature(logits[rest], labels[rest])
            fold_map = fit_top_label(logits[rest], labels[rest], t)
            z, y = logits[parts[k]], labels[parts[k]]
            for method, fitted in ((TEMPERATURE, None), (TOP_LABEL, fold_map)):
                losses[method].append(_nll(z, y, t, fitted))
    record["cross_validated_nll"] = {method: float(np.mean(v)) for method, v in losses.items()}
    if record["cross_validated_nll"][TOP_LABEL] < record["cross_validated_nll"][TEMPERATURE]:
        record.update(method=TOP_LABEL, top_label=top_label)
    return record


def scores(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """ECE (15 bins), NLL and Brier of probabilities against labels."""
    return {"ece": expected_calibration_error(probabilities, labels, n_bins),
            "nll": negative_log_likelihood(probabilities, labels),
            "brier": brier_score(probabilities, labels)}


def calibration_metrics(probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                        top_label: tuple[float, float] | None = None) -> dict:
    """ECE, NLL and Brier of calibrated ``probabilities`` and of the same model before calibration (T = 1).

    The uncalibrated probabilities are recovered by ``uncalibrated_probabilities`` (``softmax(T * log p)``
    after undoing any top-label map). Keys: ``temperature``, ``ece``, ``nll``, ``brier`` and the same with
    ``_uncalibrated``, and with a top-label map its ``top_label_intercept`` and ``top_label_slope``; fractions.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    after = scores(probabilities, labels)
    before = after if temperature == 1.0 and top_label is None else scores(
        uncalibrated_probabilities(probabilities, temperature, top_label), labels)
    mapped = {} if top_label is None else {"top_label_intercept": top_label[0], "top_label_slope": top_label[1]}
    return {"temperature": float(temperature), **mapped, "n_bins": N_BINS, **after,
            **{f"{k}_uncalibrated": v for k, v in before.items()}}


def held_out_range(n_train: int, validation_split: float, calibration_split: float = 0.0) -> range:
    """Which training images a run holds out for calibration: its validation split, else its calibration
    split (the last fraction, held out for calibration alone), else the last ``HOLDOUT``.

    Splits are last fractions (Keras's rule, ``data.validation_split``). Without either the last 2,000 of
    MNIST's 60,000 are held out (a tenth of the training set where it is smaller than 20,000).
    """
    for split in (validation_split, calibration_split):
        if split:
            return range(math.ceil(n_train * (1.0 - split)), n_train)  # as data.validation_split
    return range(n_train - min(HOLDOUT, n_train // 10), n_train)


def calibration_name(calibration: dict) -> str:
    """``T = 0.620`` or ``T = 0.620, top label 1.231 L - 0.173``: the map a record or its test scores name."""
    text = f"T = {calibration['temperature']:.3f}"
    if calibration.get("top_label_slope") is not None:
        text += f", top label {calibration['top_label_slope']:.3f} L {calibration['top_label_intercept']:+.3f}"
    return text


def format_calibration(calibration: dict) -> str:
    """Two lines: ECE, NLL and Brier with the stored calibration, and before it (T = 1)."""
    labels = (f"Calibrated ({calibration_name(calibration)}):", "Uncalibrated (T = 1):")
    width = max(24, *(len(label) + 1 for label in labels))

    def line(label: str, suffix: str) -> str:
        return (f"{label:<{width}}ECE (15 bins) {calibration['ece' + suffix] * 100:5.2f}%   "
                f"NLL {calibration['nll' + suffix]:.4f}   Brier {calibration['brier' + suffix]:.4f}")

    return "\n".join([line(labels[0], ""), line(labels[1], "_uncalibrated")])
