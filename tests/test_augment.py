"""Random affine augmentation: shapes, ink, seeding, labels kept; the benchmark's test-time views."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from deepdigits.augment import augment_batch
from deepdigits.predictor import builtin_model
from deepdigits.preprocess import to_tensor


def test_augmentation_keeps_shapes_and_ink(mnist):
    x = to_tensor(mnist.x_test[:64])
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    # small transforms keep (nearly) all of the ink inside the frame
    ratio = out.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert ratio.min() > 0.75 and ratio.max() < 1.3


def test_test_time_augmentation_views_of_the_accuracy_benchmark(mnist):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    images = mnist.x_test[:16]
    views = benchmark.tta_views(images)
    assert len(views) == 9 and all(v.shape == images.shape and v.dtype == np.uint8 for v in views)
    assert views[0] is images
    dot = np.zeros((1, 28, 28), np.uint8)
    dot[0, 10, 12] = 200
    moved = [np.argwhere(v[0]).tolist() for v in benchmark.tta_views(dot)[1:5]]
    assert moved == [[[9, 12]], [[11, 12]], [[10, 11]], [[10, 13]]]  # up, down, left, right by one pixel
    for view in views[5:]:  # rotations and zooms move ink but keep most of it
        assert 0.8 < view.astype(float).sum() / images.astype(float).sum() < 1.25


def test_augmentation_is_seeded_and_zero_ranges_are_identity(mnist):
    x = to_tensor(mnist.x_test[:8])
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    same = augment_batch(x, torch.Generator().manual_seed(3), degrees=0, translate=0, scale=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)


def test_augmentation_keeps_labels(mnist):
    # a model trained on clean digits still reads the augmented ones: the label has not changed
    clf = builtin_model()
    x = to_tensor(mnist.x_test[:500])
    augmented = augment_batch(x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = clf.network(augmented).argmax(1).numpy()
    assert (predicted == mnist.y_test[:500]).mean() > 0.97
