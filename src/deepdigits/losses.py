"""Loss functions by name, one source for training, validation and ``evaluate`` (Keras reports the compiled loss)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.nn import functional as F

from .errors import DeepDigitsError

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def keras2_clipped_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keras 2's categorical cross-entropy on softmax outputs: probabilities clipped to [1e-7, 1 - 1e-7].

    Clipping zeroes the gradient of saturated outputs instead of letting it overflow.
    """
    probabilities = torch.softmax(logits, dim=1).clamp(1e-7, 1.0 - 1e-7)
    return -torch.log(probabilities.gather(1, target[:, None])).mean()


LOSSES: dict[str, LossFunction] = {
    "cross-entropy": F.cross_entropy,
    "keras2-clipped-cross-entropy": keras2_clipped_cross_entropy,
}


def loss_function(name: str = "cross-entropy", label_smoothing: float = 0.0) -> LossFunction:
    """The loss a recipe trains with: ``name`` from ``LOSSES``, with label smoothing where asked for."""
    if name not in LOSSES:
        raise DeepDigitsError(f"unknown loss {name!r}; expected one of: {', '.join(LOSSES)}")
    if not label_smoothing:
        return LOSSES[name]
    if name != "cross-entropy":
        raise DeepDigitsError("label smoothing needs loss 'cross-entropy'")
    return partial(F.cross_entropy, label_smoothing=label_smoothing)


def loss_of_probabilities(probabilities, labels, name: str = "cross-entropy", label_smoothing: float = 0.0) -> float:
    """The mean loss of predicted probabilities (N, K) against labels, as training computes it from logits.

    ``log p`` serves as logits: softmax(log p) = p, so every loss above gives its own value.
    """
    p = torch.as_tensor(probabilities, dtype=torch.float64).clamp_min(1e-12)
    target = torch.as_tensor(labels).long()
    if len(target) == 0:
        return 0.0
    return float(loss_function(name, label_smoothing)(torch.log(p), target))
