"""Batch-all triplet mining: every valid triplet of the batch that violates the margin.

Keeps each ``(a, p, n)`` with ``y_a = y_p``, ``a ≠ p``, ``y_n ≠ y_a`` and a positive triplet
loss::

    d(a, p) − d(a, n) + margin > 0

(the "batch all" variant of Hermans, Beyer, Leibe 2017, which averages the triplet loss over
the triplets that are not already satisfied). Triplets come sorted by ``(a, p, n)``.

The work and the output grow with the number of violating triplets, up to
``B·(K−1)·(B−K)`` for a P×K batch (≈ 190 000 at B = 256, K = 4 on an untrained model), so
this miner costs milliseconds early in training and much less once most triplets are
satisfied.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.miners.base import Miner
from facemetric.tuples import Triplets


class BatchAllMiner(Miner):
    """All valid triplets with ``d_ap − d_an + margin > 0``.

    Args:
        margin: the triplet margin, ``>= 0``, in the units of ``distance``.
        distance: default ``EuclideanDistance()``.
    """

    def __init__(self, margin: float = 0.2, distance: Distance | None = None) -> None:
        super().__init__(distance)
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin}")
        self.margin = float(margin)

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        same = labels[:, None] == labels[None, :]
        neg_dist = torch.where(same, float("inf"), dist)  # +inf: never a negative
        pa, pp = same.fill_diagonal_(False).nonzero(as_tuple=True)
        # one row per positive pair (a, p), one column per candidate negative n
        violating = neg_dist.index_select(0, pa) < (dist[pa, pp] + self.margin)[:, None]
        row, n = violating.nonzero(as_tuple=True)
        return Triplets(pa[row], pp[row], n)


__all__ = ["BatchAllMiner"]
