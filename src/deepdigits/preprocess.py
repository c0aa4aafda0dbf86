"""Turn images into the tensors the networks take: (N, 1, 28, 28) float32, scaled."""

from __future__ import annotations

import numpy as np
import torch

from .errors import DeepDigitsError

DEFAULT_SCALE = 1.0 / 255.0  # the tutorials' x / 255


def to_tensor(images: np.ndarray | torch.Tensor, scale: float = DEFAULT_SCALE) -> torch.Tensor:
    """Images as (N, 28, 28), (N, 784), (N, 1, 28, 28) or one (28, 28) -> float32 (N, 1, 28, 28).

    uint8 images are multiplied by ``scale`` (1/255 by default, as the tutorials divide by 255);
    float images are taken as already scaled.
    """
    array = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    given = tuple(array.shape)
    if array.ndim == 2 and array.shape == (28, 28):
        array = array.unsqueeze(0)
    if array.ndim == 2 and array.shape[1] == 784:
        array = array.reshape(-1, 28, 28)
    if array.ndim == 3:
        array = array.unsqueeze(1)
    if array.ndim != 4 or tuple(array.shape[1:]) != (1, 28, 28):
        raise DeepDigitsError(
            f"images: expected shape (N, 28, 28), (N, 784) or (N, 1, 28, 28), got {given}"
        )
    if array.dtype == torch.uint8:
        return array.to(torch.float32) * scale
    return array.to(torch.float32)
