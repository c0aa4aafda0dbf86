"""What drove an answer: per-class weight-evidence maps of dense networks, gradient saliency of any network."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import DeepDigitsError


def dense_evidence_maps(network) -> np.ndarray:
    """Per-class 28x28 evidence maps of a network whose first layer is dense: (10, 784).

    The product of the dense layers' weight matrices, W_last ... W_1, i.e. the network with its
    activations taken as linear. For a one-layer softmax model it is exactly that layer's weights;
    for tutorial 002's sigmoid network it is the linear part of how each pixel pushes each class.
    """
    layers = [m for m in network.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers or not isinstance(layers[0], nn.Linear) or layers[0].in_features != 784:
        raise DeepDigitsError("evidence maps need a network whose first layer is dense (784 inputs); "
                              "use a saliency map for convolutional networks")
    with torch.no_grad():
        product = layers[0].weight.detach().clone()
        for layer in layers[1:]:
            product = layer.weight.detach() @ product
    return product.numpy()


def saliency_map(network, image_tensor, target: int | None = None) -> tuple[np.ndarray, int, float]:
    """Gradient of a class score (the predicted one by default) with respect to the input pixels.

    Returns the 28x28 gradient, the class and its probability. ``image_tensor`` is (1, 1, 28, 28).
    """
    network.eval()
    x = image_tensor.detach().clone().requires_grad_(True)
    logits = network(x)
    probabilities = torch.softmax(logits, dim=1)[0]
    cls = int(probabilities.argmax()) if target is None else int(target)
    logits[0, cls].backward()
    return x.grad[0, 0].numpy(), cls, float(probabilities[cls].detach())
