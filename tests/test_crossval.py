import numpy as np
import pytest

from deepdigits.crossval import cross_validate, to_json, weights_fingerprint
from deepdigits.models import build_model


@pytest.fixture(scope="module")
def result(mnist):
    return cross_validate("tutorial-004", folds=3, seed=1, epochs=1, dataset=mnist, train_size=900, verbose=0)


def test_split_sizes_cover_everything_once(result):
    folds = result["fold_results"]
    assert [f["validation_size"] for f in folds] == [300, 300, 300]
    assert all(f["train_size"] == 600 for f in folds)
    validation = np.concatenate([f["validation_indices"] for f in folds])
    assert sorted(validation.tolist()) == list(range(900))  # each image validated exactly once


def test_no_leakage(result):
    previous_final = None
    for fold in result["fold_results"]:
        # validated only on data it never trained on
        assert not set(fold["train_indices"]) & set(fold["validation_indices"])
        # starts from new weights: exactly a fresh network's, never the previous fold's trained ones
        fresh = build_model("tutorial-004", seed=result["seed"] + fold["fold"])
        assert fold["initial_weights"] == weights_fingerprint(fresh)
        assert fold["initial_weights"] != fold["final_weights"]
        if previous_final is not None:
            assert fold["initial_weights"] != previous_final
        previous_final = fold["final_weights"]
    assert len({f["initial_weights"] for f in result["fold_results"]}) == 3


def test_mean_and_std(result):
    scores = np.array([f["accuracy"] for f in result["fold_results"]])
    assert result["scores"] == scores.tolist()
    assert result["mean"] == pytest.approx(scores.mean())
    assert result["std"] == pytest.approx(np.sqrt(((scores - scores.mean()) ** 2).mean()))
    assert all(0.5 < s <= 1 for s in scores)


def test_histories_have_validation_curves(result):
    for fold in result["fold_results"]:
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(fold["history"][0])


def test_stratified_folds_keep_class_proportions(mnist):
    out = cross_validate("tutorial-002", folds=4, seed=0, epochs=1, dataset=mnist, train_size=800,
                         stratified=True, verbose=0)
    labels = mnist.y_train[:800]
    overall = np.bincount(labels, minlength=10) / 800
    for fold in out["fold_results"]:
        part = np.bincount(labels[fold["validation_indices"]], minlength=10) / fold["validation_size"]
        assert np.abs(part - overall).max() < 0.02


def test_json_form_has_no_index_arrays(result):
    import json

    document = json.loads(json.dumps(to_json(result)))
    assert "train_indices" not in document["fold_results"][0] and document["folds"] == 3
