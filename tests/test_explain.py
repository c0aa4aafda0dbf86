"""Evidence maps of dense networks and gradient saliency."""

import numpy as np
import pytest
import torch
from torch import nn

from deepdigits import Classifier
from deepdigits.errors import DeepDigitsError
from deepdigits.explain import dense_evidence_maps, saliency_map
from deepdigits.preprocess import to_tensor


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
