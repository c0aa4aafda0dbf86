import numpy as np
import pytest
from PIL import Image

from deepdigits.data import load_dataset
from deepdigits.errors import DeepDigitsError
from deepdigits.plots import FIGURE_KINDS, confusion_matrix_figure, make_figure, save_figure


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


def test_class_names_are_used(data_root):
    fashion = load_dataset("fashion-mnist", data_dir=data_root)
    figure = confusion_matrix_figure(np.eye(10, dtype=int) * 5, fashion.class_names)
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert "Sneaker" in ticks and "Ankle boot" in ticks


def test_unknown_figure_kind(small_model):
    with pytest.raises(DeepDigitsError, match="unknown figure 'pie'"):
        make_figure("pie", small_model)
