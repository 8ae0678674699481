"""A small learning problem shared by the structured-loss tests (hierarchical triplet,
magnet, facility location): a loss that works must raise 1-NN accuracy on it."""

from __future__ import annotations

import torch


def nn_accuracy(e: torch.Tensor, y: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy of embeddings ``e`` with labels ``y``."""
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    return float((y[d.argmin(1)] == y).double().mean())


def toy_problem():
    """4 classes × 8 points in 8-d: class signal in 2 dims, large noise in the other 6."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(8)
    signal = torch.zeros(4, 8)
    signal[:, :2] = 1.5 * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    noise = torch.randn(32, 8, generator=g) * torch.tensor([0.3, 0.3] + [3.0] * 6)
    return signal[y] + noise, y
