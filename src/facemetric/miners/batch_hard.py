"""Batch-hard triplet mining (Hermans, Beyer, Leibe 2017, "In Defense of the Triplet Loss").

For every anchor ``a`` of the batch that has at least one positive and one negative, keep the
single triplet made of its hardest positive and its hardest negative::

    p*(a) = argmax_{p : y_p = y_a, p ≠ a} d(a, p)      (farthest positive)
    n*(a) = argmin_{n : y_n ≠ y_a}        d(a, n)      (closest negative)

so a batch of ``B`` samples gives at most ``B`` triplets, ordered by anchor; ties are broken
by ``torch.max``/``torch.min``. Anchors without a positive (a singleton identity in the
batch) or without a negative (a batch of one identity) give nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.miners.base import Miner
from facemetric.tuples import Triplets


class BatchHardMiner(Miner):
    """One triplet per anchor: its farthest positive and its closest negative.

    Args:
        distance: the distance the hardness is measured in (default ``EuclideanDistance()``).
    """

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        inf = float("inf")
        same = labels[:, None] == labels[None, :]
        # −inf / +inf rule out the non-candidates; a row left with only those has none
        pos_dist = torch.where(same, dist, -inf)
        pos_dist.fill_diagonal_(-inf)
        d_ap, hardest_pos = pos_dist.max(dim=1)
        d_an, hardest_neg = torch.where(same, inf, dist).min(dim=1)
        anchor = ((d_ap > -inf) & (d_an < inf)).nonzero().squeeze(1)
        return Triplets(anchor, hardest_pos[anchor], hardest_neg[anchor])


__all__ = ["BatchHardMiner"]
