"""Semi-hard triplet mining (Schroff, Kalenichenko, Philbin 2015, "FaceNet").

A negative ``n`` is *semi-hard* for the positive pair ``(a, p)`` when it is not closer to the
anchor than the positive but still inside the margin::

    d(a, p) <= d(a, n) < d(a, p) + margin

For every positive pair (ordered, ``a ≠ p``) this miner keeps one triplet with the hardest
semi-hard negative, the one with the smallest such ``d(a, n)``. (The paper writes the lower
bound strictly; an exact tie ``d_an = d_ap`` is counted as semi-hard here.)

A pair with no semi-hard negative is **dropped**: all its negatives are either hard
(``d_an < d_ap``) or already beyond the margin (``d_an >= d_ap + margin``, zero loss). This
differs from TensorFlow's ``triplet_semihard_loss``, which falls back to the farthest
negative in that case; dropping keeps the returned set exactly the semi-hard triplets and
never feeds the hardest negatives that FaceNet avoids early in training. Triplets come sorted
by ``(a, p)``. The work is ``O(#positive pairs × B)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.miners.base import Miner
from facemetric.tuples import Triplets


class SemiHardMiner(Miner):
    """Per positive pair, the closest negative with ``d_ap <= d_an < d_ap + margin``.

    Args:
        margin: the triplet margin, ``> 0``, in the units of ``distance``.
        distance: default ``EuclideanDistance()``.
    """

    def __init__(self, margin: float = 0.2, distance: Distance | None = None) -> None:
        super().__init__(distance)
        if not (math.isfinite(margin) and margin > 0):
            raise ValueError(f"margin must be a finite number > 0, got {margin}")
        self.margin = float(margin)

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        same = labels[:, None] == labels[None, :]
        neg_dist = torch.where(same, float("inf"), dist)  # +inf: never a negative
        pa, pp = same.fill_diagonal_(False).nonzero(as_tuple=True)
        # gap[i, n] = d(a_i, n) − d(a_i, p_i): semi-hard iff 0 <= gap < margin. Its reciprocal
        # is largest for the smallest gap >= 0 (+inf for a tie), <= 0 for hard negatives and
        # 0 for non-negatives, so one max finds the hardest semi-hard negative of each pair,
        # and it exists iff that max exceeds 1 / margin.
        gap = neg_dist.index_select(0, pa).sub_(dist[pa, pp][:, None])
        best, n = gap.reciprocal_().max(dim=1)
        keep = best > 1.0 / self.margin
        return Triplets(pa[keep], pp[keep], n[keep])


__all__ = ["SemiHardMiner"]
