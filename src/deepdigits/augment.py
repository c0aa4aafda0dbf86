"""Random affine augmentation of image batches, and the affine warp it (and test-time views) are made of."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Random affine transform of each image: rotation, shift (fraction of the width) and zoom.

    Done on the whole batch with one ``affine_grid``/``grid_sample``, so it costs little next to the network.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-degrees, degrees) * (math.pi / 180.0)
    zoom = uniform(*scale)
    shift_x, shift_y = uniform(-2 * translate, 2 * translate), uniform(-2 * translate, 2 * translate)
    return affine_warp(x, angle, zoom, shift_x, shift_y)


def affine_warp(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift_x: torch.Tensor,
                shift_y: torch.Tensor) -> torch.Tensor:
    """Rotate (radians), zoom and shift (in [-1, 1] image coordinates) each image of (N, 1, H, W), bilinear.

    Each transform argument holds one value per image.
    """
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
