import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepdigits import Classifier
from deepdigits.data import load_dataset
from deepdigits.errors import DeepDigitsError
from deepdigits.evaluate import dense_evidence_maps, metrics_from_probabilities, saliency_map
from deepdigits.plots import FIGURE_KINDS, confusion_matrix_figure, make_figure, save_figure
from deepdigits.preprocess import to_tensor


@pytest.fixture(scope="module")
def small_model(mnist):
    clf = Classifier("tutorial-002", seed=0)
    clf.fit(mnist.x_train[:3000], mnist.y_train[:3000], epochs=2, batch_size=32, optimizer="sgd",
            learning_rate=0.1, validation_split=0.1, verbose=0)
    return clf


class _TestSubset:
    def __init__(self, ds, n):
        self.x_test, self.y_test, self.name = ds.x_test[:n], ds.y_test[:n], ds.name


@pytest.mark.parametrize("kind", list(FIGURE_KINDS))
def test_every_figure_is_a_real_png(kind, small_model, mnist, tmp_path):
    figure = make_figure(kind, small_model, _TestSubset(mnist, 500), index=3, count=9)
    path = save_figure(figure, tmp_path / f"{kind}.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 300 <= image.width <= 2000 and 150 <= image.height <= 2000
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # not blank
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp files left


def test_figures_have_titles_and_labelled_axes(small_model, mnist):
    figure = make_figure("curves", small_model)
    accuracy_axes = figure.axes[0]
    assert accuracy_axes.get_xlabel() == "Epoch" and accuracy_axes.get_ylabel() == "Accuracy"
    assert [t.get_text() for t in accuracy_axes.get_legend().get_texts()] == ["training", "validation"]
    assert figure._suptitle.get_text().startswith("tutorial-002")


def test_confusion_numbers(small_model, mnist):
    probabilities = small_model.predict_proba(mnist.x_test[:1000])
    metrics = metrics_from_probabilities(probabilities, mnist.y_test[:1000])
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == 1000
    assert matrix.trace() / 1000 == pytest.approx(metrics["accuracy"])
    for row in metrics["per_class"]:
        i = row["class"]
        assert row["recall"] == pytest.approx(matrix[i, i] / matrix[i].sum())
        assert row["precision"] == pytest.approx(matrix[i, i] / matrix[:, i].sum())
        assert row["support"] == matrix[i].sum()


def test_class_names_are_used(data_root):
    fashion = load_dataset("fashion-mnist", data_dir=data_root)
    figure = confusion_matrix_figure(np.eye(10, dtype=int) * 5, fashion.class_names)
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert "Sneaker" in ticks and "Ankle boot" in ticks


def test_evidence_maps_of_a_single_dense_layer_are_its_weights():
    network = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    np.testing.assert_allclose(dense_evidence_maps(network), network[1].weight.detach().numpy())


def test_evidence_maps_multiply_dense_layers(small_model):
    net = small_model.network
    expected = (net[3].weight @ net[1].weight).detach().numpy()
    maps = dense_evidence_maps(net)
    assert maps.shape == (10, 784)
    np.testing.assert_allclose(maps, expected, rtol=1e-5)


def test_evidence_maps_refuse_convolutional_networks():
    with pytest.raises(DeepDigitsError, match="first layer is dense"):
        dense_evidence_maps(Classifier("tutorial-003").network)


def test_saliency_is_the_input_gradient(small_model, mnist):
    x = to_tensor(mnist.x_test[0])
    gradient, cls, probability = saliency_map(small_model.network, x)
    assert gradient.shape == (28, 28) and np.abs(gradient).sum() > 0
    # finite difference on the brightest pixel agrees with the gradient
    r, c = np.unravel_index(np.argmax(np.abs(gradient)), gradient.shape)
    eps = 1e-3
    bumped = x.clone()
    bumped[0, 0, r, c] += eps
    with torch.no_grad():
        delta = (small_model.network(bumped)[0, cls] - small_model.network(x)[0, cls]).item() / eps
    assert delta == pytest.approx(gradient[r, c], rel=0.05, abs=1e-3)
    assert 0 < probability <= 1


def test_unknown_figure_kind(small_model):
    with pytest.raises(DeepDigitsError, match="unknown figure 'pie'"):
        make_figure("pie", small_model)
