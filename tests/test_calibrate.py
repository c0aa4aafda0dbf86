"""Calibration: ECE, NLL and Brier by hand, temperature and top-label fits, held-out images only, the built-in model."""

import json
import math

import numpy as np
import pytest
import torch

from deepdigits import Classifier, train_recipe
from deepdigits.calibrate import (
    FIT_RANGE,
    KEEP,
    TEMPERATURE,
    TOP_LABEL,
    brier_score,
    calibrated_logits,
    calibrated_probabilities,
    calibration_metrics,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    fit_top_label,
    format_calibration,
    held_out_range,
    negative_log_likelihood,
    reliability_bins,
    scores,
    softmax,
    top_log_odds,
    uncalibrated_probabilities,
)
from deepdigits.data import load_dataset
from deepdigits.evaluate import format_metrics

# Four answers over two classes: right at 0.95, wrong at 0.95, right at 0.62, wrong at 0.5 (a tie goes to class 0).
PROBABILITIES = np.array([[0.95, 0.05], [0.05, 0.95], [0.38, 0.62], [0.5, 0.5]])
LABELS = np.array([0, 0, 1, 1])


def test_expected_calibration_error_by_hand():
    # bin (14/15, 1]: 2 images, accuracy 1/2, confidence 0.95 -> gap 0.45; bin (9/15, 10/15]: 0.62 right -> 0.38;
    # bin (7/15, 8/15]: 0.5 wrong -> 0.5. ECE = 2/4 * 0.45 + 1/4 * 0.38 + 1/4 * 0.5
    assert expected_calibration_error(PROBABILITIES, LABELS) == pytest.approx(0.445, abs=1e-12)
    bins = reliability_bins(PROBABILITIES, LABELS)
    assert bins["counts"].tolist() == [0] * 7 + [1, 0, 1, 0, 0, 0, 0, 2]
    assert bins["accuracy"][14] == 0.5 and bins["confidence"][14] == pytest.approx(0.95)
    # calibrated by construction: 0.75 sure and right 3 times in 4
    sure = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(sure, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # bins are (lo, hi]: a confidence of exactly 1 is in the last, exactly 14/15 is the top of bin 13
    edge = reliability_bins(np.array([[1.0, 0.0], [1 / 15, 14 / 15]]), np.array([0, 0]))
    assert edge["counts"][14] == 1 and edge["counts"][13] == 1
    assert expected_calibration_error(np.zeros((0, 10)), np.zeros(0)) == 0.0


def test_bin_edges_are_closed_on_the_right():
    counts = reliability_bins(np.array([[1 / 15 + 1e-9, 0.1], [0.5 + 1e-9, 0.5 - 1e-9]]), np.array([0, 0]))["counts"]
    assert counts[1] == 1 and counts[7] == 1


def test_negative_log_likelihood_and_brier_by_hand():
    expected_nll = -(math.log(0.95) + math.log(0.05) + math.log(0.62) + math.log(0.5)) / 4
    assert negative_log_likelihood(PROBABILITIES, LABELS) == pytest.approx(expected_nll, rel=1e-12)
    # squared distance to one-hot, summed over classes, averaged over images
    expected_brier = (2 * 0.05**2 + 2 * 0.95**2 + 2 * 0.38**2 + 2 * 0.5**2) / 4
    assert brier_score(PROBABILITIES, LABELS) == pytest.approx(expected_brier, rel=1e-12)
    assert brier_score(np.eye(3), np.arange(3)) == 0.0 and brier_score(np.eye(3), [1, 2, 0]) == 2.0
    assert negative_log_likelihood(np.eye(3), np.arange(3)) == pytest.approx(0.0, abs=1e-12)


def _synthetic(true_temperature: float, n: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_temperature): that T is the right one."""
    rng = np.random.default_rng(seed)
    calibrated = rng.normal(0.0, 3.0, (n, 10))
    probabilities = softmax(calibrated)
    labels = (probabilities.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return calibrated * true_temperature, labels


@pytest.mark.parametrize("true_temperature", [0.3, 1.0, 2.5, 8.0])
def test_temperature_fit_recovers_a_known_temperature(true_temperature):
    logits, labels = _synthetic(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.04)
    assert expected_calibration_error(softmax(logits, fitted), labels) < 0.02
    assert expected_calibration_error(softmax(logits), labels) > 0.05 or true_temperature == 1.0


def test_temperature_fit_is_bounded_where_the_optimum_is_not_finite():
    # every answer right: the NLL keeps falling as T -> 0 (unbounded L-BFGS walked to T = 0.015); the fit stops
    logits, _ = _synthetic(1.0)
    right = logits.argmax(axis=1)
    assert fit_temperature(logits, right) == FIT_RANGE[0]
    assert fit_temperature(np.zeros((0, 10)), np.zeros(0, int)) == 1.0


def test_uncalibrated_scores_are_recovered_from_calibrated_probabilities():
    logits, labels = _synthetic(2.5, n=2000)
    temperature = fit_temperature(logits, labels)
    both = calibration_metrics(softmax(logits, temperature).astype(np.float32), labels, temperature)
    direct = scores(softmax(logits), labels)
    for key in ("ece", "nll", "brier"):
        assert both[f"{key}_uncalibrated"] == pytest.approx(direct[key], rel=1e-4)
    assert both["ece"] < both["ece_uncalibrated"] and both["nll"] < both["nll_uncalibrated"]
    text = format_calibration(both)
    assert f"T = {temperature:.3f}" in text and "Uncalibrated (T = 1)" in text and "ECE (15 bins)" in text


def test_held_out_range_is_the_validation_split_or_the_last_2000():
    assert held_out_range(60_000, 0.1) == range(54_000, 60_000)
    assert held_out_range(60_000, 0.0) == range(58_000, 60_000)
    assert held_out_range(30, 0.0) == range(27, 30)  # a tenth of a small training set
    assert held_out_range(60_000, 0.0, 1 / 6) == range(50_000, 60_000)  # a calibration split (tutorial 002)
    assert held_out_range(60_000, 0.1, 1 / 6) == range(54_000, 60_000)  # a validation split serves instead


def _top_label_data(a: float, b: float, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from their top-label map ``(a, b)`` at T = 1: that map is the right one."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, 10))
    probabilities = calibrated_probabilities(logits, 1.0, (a, b))
    return logits, (probabilities.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)


def test_top_label_map_shifts_the_top_logit_alone_and_never_changes_the_answer():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, (5000, 10))
    mapped = calibrated_logits(torch.tensor(logits), 0.5, (-1.5, 1.3)).numpy()
    rows, top = np.arange(len(logits)), logits.argmax(axis=1)
    np.testing.assert_array_equal(mapped.argmax(axis=1), top)
    shift = mapped - logits / 0.5
    others = np.ones_like(shift, bool)
    others[rows, top] = False
    assert np.abs(shift[others]).max() == 0.0  # the other classes keep their logits, so their ratios
    _, before = top_log_odds(logits, 0.5)
    _, after = top_log_odds(mapped)
    target = -1.5 + 1.3 * before
    assert (after >= target - 1e-9).all()  # the map, or above it where it would change the answer
    free = after <= target + 1e-9
    np.testing.assert_allclose(after[free], target[free], atol=1e-9)
    assert 0 < (~free).sum() < len(free)  # a low-confidence answer meets the floor: 99.9% of the way down
    sorted_logits = np.sort(logits / 0.5, axis=1)
    np.testing.assert_allclose(mapped[rows, top][~free], (sorted_logits[:, -2] + (1 - KEEP) * (
        sorted_logits[:, -1] - sorted_logits[:, -2]))[~free], rtol=1e-9)
    assert calibrated_logits(torch.tensor(logits), 1.0).equal(torch.tensor(logits))  # T = 1, no map: as they were


def test_uncalibrated_probabilities_undo_temperature_and_top_label_map():
    logits = np.random.default_rng(2).normal(0.0, 2.0, (3000, 10))
    for temperature, top_label in ((0.6, (-0.2, 1.25)), (2.0, None), (1.0, (0.4, 0.8))):
        calibrated = calibrated_probabilities(logits, temperature, top_label).astype(np.float32)
        assert np.abs(uncalibrated_probabilities(calibrated, temperature, top_label) - softmax(logits)).max() < 1e-4


def test_top_label_fit_recovers_a_known_map_and_is_chosen_where_it_predicts_better():
    logits, labels = _top_label_data(0.3, 1.3, 20_000)  # 0.2% of its answers meet the map's floor
    intercept, slope = fit_top_label(logits, labels, 1.0)
    assert intercept == pytest.approx(0.3, abs=0.05) and slope == pytest.approx(1.3, abs=0.05)
    fitted = fit_calibration(logits[:10_000], labels[:10_000])
    assert fitted["method"] == TOP_LABEL and fitted["top_label"] is not None
    nll = fitted["cross_validated_nll"]
    assert nll[TOP_LABEL] < nll[TEMPERATURE]
    fresh, truth = logits[10_000:], labels[10_000:]
    mapped = expected_calibration_error(calibrated_probabilities(fresh, fitted["temperature"], fitted["top_label"]),
                                        truth)
    assert mapped < 0.015 and mapped < expected_calibration_error(softmax(fresh, fitted["temperature"]), truth) / 2
    # where one temperature is the right map, the cross-validation keeps it
    logits, labels = _synthetic(2.5)
    fitted = fit_calibration(logits, labels)
    assert fitted["method"] == TEMPERATURE and fitted["top_label"] is None
    assert fitted["cross_validated_nll"][TEMPERATURE] <= fitted["cross_validated_nll"][TOP_LABEL]
    # all right: no map can be fit (and too few images to cross-validate)
    assert fit_top_label(logits, logits.argmax(axis=1), 1.0) is None
    assert fit_calibration(logits[:6], labels[:6])["method"] == TEMPERATURE


def test_train_recipe_calibrates_on_training_images_it_held_out(tiny, monkeypatch):
    spec, source = tiny
    ds = load_dataset(spec.name, data_dir=source)
    seen: dict = {}
    fit, calibrate = Classifier.fit, Classifier.calibrate

    def recording_fit(self, x, y, **options):
        seen["fit"] = np.array(x)
        return fit(self, x, y, **options)

    def recording_calibrate(self, x, y, **options):
        seen["calibrate"] = np.array(x)
        return calibrate(self, x, y, **options)

    monkeypatch.setattr(Classifier, "fit", recording_fit)
    monkeypatch.setattr(Classifier, "calibrate", recording_calibrate)
    clf = train_recipe("tutorial-002", dataset=ds, epochs=1, verbose=0)
    fit_on = clf.calibration["fit_on"]
    # tutorial 002 holds out its last sixth (calibration_split): 25-29 of 30
    assert fit_on == {"dataset": spec.name, "split": "train", "start": 25, "stop": 30, "seen_in_training": False,
                      "role": "held out", "n": 5}
    np.testing.assert_array_equal(seen["calibrate"], ds.x_train[25:30])  # training images, never the test set
    np.testing.assert_array_equal(seen["fit"], ds.x_train[:25])  # ... that training did not see
    assert not any((seen["calibrate"] == test).all(axis=(1, 2)).any() for test in ds.x_test)
    assert FIT_RANGE[0] <= clf.temperature <= FIT_RANGE[1] and clf.metrics["calibration"]["temperature"] == (
        clf.temperature)

    clf = train_recipe("tutorial-004", dataset=ds, epochs=1, verbose=0)  # neither split: the last 2,000, here 3
    assert clf.calibration["fit_on"]["start"] == 27 and clf.calibration["fit_on"]["n"] == 3
    np.testing.assert_array_equal(seen["fit"], ds.x_train[:27])

    clf = train_recipe("tutorial-000", dataset=ds, epochs=1, verbose=0)  # a recipe with a validation split
    assert clf.calibration["fit_on"]["role"] == "validation split" and clf.calibration["fit_on"]["start"] == 27
    np.testing.assert_array_equal(seen["fit"], ds.x_train[:27])


def test_an_ensemble_is_calibrated_on_the_images_no_member_saw(tiny):
    spec, source = tiny
    ds = load_dataset(spec.name, data_dir=source)
    from deepdigits.classifier import combine_and_evaluate

    members = [train_recipe("tutorial-002", dataset=ds, epochs=1, seed=seed, verbose=0) for seed in (0, 1)]
    ensemble = combine_and_evaluate(members, ds.x_test, ds.y_test, dataset=ds)
    assert ensemble.calibration["fit_on"]["start"] == 25 and ensemble.calibration["fit_on"]["n"] == 5
    logits = ensemble.logits(ds.x_test)
    np.testing.assert_allclose(ensemble.predict_proba(ds.x_test),
                               calibrated_probabilities(logits, ensemble.temperature, ensemble.top_label), atol=1e-6)
    # a member that may have seen every image (no record): no held-out images, T stays 1
    members[1].calibration = None
    assert combine_and_evaluate(members, ds.x_test, ds.y_test, dataset=ds).temperature == 1.0


# --------------------------------------------------------------------------- the built-in model


def test_builtin_model_is_calibrated_on_the_test_set(mnist):
    from deepdigits.predictor import builtin_model

    clf = builtin_model()
    assert clf.calibration["fit_on"]["split"] == "train" and clf.calibration["fit_on"]["seen_in_training"] is True
    metrics = clf.evaluate(mnist.x_test, mnist.y_test)
    calibration = metrics["calibration"]
    # benchmarks/calibration.py: ECE 9.31% -> 0.09%, NLL 0.1066 -> 0.0096, Brier 0.0165 -> 0.0046 (T = 0.4215)
    assert calibration["ece"] <= 0.01 and calibration["ece_uncalibrated"] > 0.09
    assert calibration["nll"] < calibration["nll_uncalibrated"] / 5
    assert calibration["brier"] < calibration["brier_uncalibrated"] / 2
    assert metrics["accuracy"] >= 0.995
    assert "Calibrated (T = 0.421)" in format_metrics(metrics)


def test_a_cleanly_drawn_digit_reads_at_least_98_percent(mnist):
    from deepdigits.predictor import builtin_model
    from deepdigits.recognize import predict_digit
    from deepdigits.synthetic import render_digit

    assert builtin_model().predict_proba(mnist.x_test[0])[0, 7] >= 0.98  # before calibration: 0.915
    rng = np.random.default_rng(0)
    answer = predict_digit(render_digit(mnist.x_test[0], rng))
    assert answer.digit == 7 and answer.confidence >= 0.98


def test_reliability_diagram_in_plot_and_report(mnist, data_root, tmp_path):
    from deepdigits.cli import main
    from deepdigits.plots import make_figure
    from deepdigits.report import build_report

    clf = Classifier("tutorial-002", seed=0)
    clf.fit(mnist.x_train[:2000], mnist.y_train[:2000], epochs=1, batch_size=32, verbose=0)
    clf.calibrate(mnist.x_train[2000:3000], mnist.y_train[2000:3000],
                  fit_on={"dataset": "mnist", "split": "train", "start": 2000, "stop": 3000, "seen_in_training": False})

    class Subset:
        name, x_test, y_test = "mnist", mnist.x_test[:1000], mnist.y_test[:1000]

    figure = make_figure("calibration", clf, Subset())
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0].startswith("Before calibration (T = 1)") and f"T = {clf.temperature:.3f}" in titles[1]
    assert figure.axes[0].get_ylabel() == "Accuracy" and figure.axes[2].get_ylabel() == "Images"
    text = build_report(clf, Subset())
    assert 'id="calibration"' in text and 'alt="reliability diagram"' in text
    assert "training images 2,000-2,999 (1,000 images, which training did not see)" in text
    path = clf.save(tmp_path / "b")
    assert main(["plot", "calibration", str(path), "--out", str(tmp_path / "c.png"),
                 "--data-dir", str(data_root)]) == 0
    assert (tmp_path / "c.png").stat().st_size > 20_000


def test_a_top_label_map_travels_in_the_bundle_and_is_checked(mnist, tmp_path):
    from deepdigits import load
    from deepdigits.errors import BundleError

    clf = Classifier("tutorial-002", seed=0)
    clf.fit(mnist.x_train[:2000], mnist.y_train[:2000], epochs=1, batch_size=32, verbose=0)
    clf.calibrate(mnist.x_train[2000:3000], mnist.y_train[2000:3000])
    clf.top_label = (-0.2, 1.25)  # whichever the cross-validation chose, the bundle keeps a map
    clf.calibration.update(method=TOP_LABEL, top_label={"intercept": -0.2, "slope": 1.25})
    images = mnist.x_test[:200]
    expected = calibrated_probabilities(clf.logits(images), clf.temperature, (-0.2, 1.25))
    np.testing.assert_allclose(clf.predict_proba(images), expected, atol=1e-6)
    assert np.abs(clf.predict_proba(images) - softmax(clf.logits(images), clf.temperature)).max() > 1e-3
    path = clf.save(tmp_path / "b")
    loaded = load(path)
    assert loaded.top_label == (-0.2, 1.25)
    np.testing.assert_array_equal(loaded.predict_proba(images), clf.predict_proba(images))
    metrics = loaded.evaluate(images, mnist.y_test[:200])["calibration"]
    assert metrics["top_label_slope"] == 1.25 and "top label 1.250 L -0.200" in format_calibration(metrics)

    class Subset:
        name, x_test, y_test = "mnist", images, mnist.y_test[:200]

    from deepdigits.plots import make_figure

    titles = [ax.get_title() for ax in make_figure("calibration", loaded, Subset()).axes]
    assert f"After: T = {clf.temperature:.3f}, top label 1.250 L -0.200" in titles[1]
    assert f"NLL {metrics['nll_uncalibrated']:.4f}" in titles[0]  # the before panel: the map undone
    assert metrics["nll_uncalibrated"] == pytest.approx(scores(softmax(clf.logits(images)), mnist.y_test[:200])["nll"],
                                                        rel=1e-4)
    meta = json.loads((path / "model.json").read_text())
    for calibration, field in (({**meta["calibration"], "top_label": None}, "calibration"),
                               ({**meta["calibration"], "method": TEMPERATURE}, "calibration"),
                               ({**meta["calibration"], "top_label": {"intercept": 0.0, "slope": -1.0}},
                                r"calibration\.top_label\.slope")):
        (path / "model.json").write_text(json.dumps({**meta, "calibration": calibration}))
        with pytest.raises(BundleError, match=field) as raised:
            load(path)
        assert "\n" not in str(raised.value)
