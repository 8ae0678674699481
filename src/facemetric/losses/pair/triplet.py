"""Triplet margin loss (Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015; after
Weinberger & Saul's large-margin nearest neighbour, JMLR 2009)."""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, same_label_mask


class TripletLoss(TupleLoss):
    """The anchor should be closer to its positive than to its negative by ``margin``::

        L = 1/|T| Σ_{(a,p,n)∈T} [D_ap^s − D_an^s + margin]₊

    with ``s = 2`` if ``squared`` else 1. ``squared=True`` with the (default) Euclidean
    distance is FaceNet's ``‖f_a − f_p‖² − ‖f_a − f_n‖² + α``; with
    ``SquaredEuclideanDistance`` it would square once more, so use one or the other.

    **Reduction**: the mean over all triplets ``T`` formed, zero-loss (easy) triplets
    included. ``T`` is the explicit ``Triplets`` (duplicates count), else the miner's, else
    every valid triplet of the batch (``y_a = y_p``, ``a ≠ p``, ``y_n ≠ y_a``) — computed
    without materialising them, in ``O(B² log B)`` (see ``all_triplets_hinge_sum``).
    ``Pairs`` are rejected: a pair set does not say which negative goes with which positive.

    Args:
        distance: the distance ``D`` (default Euclidean, or the miner's).
        miner: picks the triplets when none are passed to ``forward``.
        margin: the required gap ``α`` (≥ 0).
        squared: use squared distances ``D²`` in the hinge.
    """

    def __init__(
        self,
        margin: float = 0.2,
        squared: bool = False,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        super().__init__(distance=distance, miner=miner)
        if margin < 0:
            raise ValueError(f"TripletLoss margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.squared = bool(squared)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        assert dist is not None
        d = dist * dist if self.squared else dist
        if tuples is None:
            pos, neg = same_label_mask(labels)
            count = (pos.sum(1) * neg.sum(1)).sum()
            if int(count) == 0:
                return zero_loss(embeddings)
            return all_triplets_hinge_sum(d, d, pos, neg, self.margin) / count
        triplets = require_triplets(tuples, type(self).__name__)
        if len(triplets) == 0:
            return zero_loss(embeddings)
        a, p, n = triplets.anchor, triplets.positive, triplets.negative
        return (d[a, p] - d[a, n] + self.margin).relu().mean()


def require_triplets(tuples: Pairs | Triplets, loss_name: str) -> Triplets:
    """``tuples`` if they are ``Triplets``, else a ``ValueError`` naming ``loss_name``."""
    if not isinstance(tuples, Triplets):
        raise ValueError(
            f"{loss_name} needs Triplets (anchor, positive, negative), got "
            f"{type(tuples).__name__}; use a triplet miner (e.g. BatchHardMiner) or pass None "
            "to use every valid triplet of the batch"
        )
    return tuples


def all_triplets_hinge_sum(
    pos_dist: Tensor, neg_dist: Tensor, pos: Tensor, neg: Tensor, margin: float | Tensor
) -> Tensor:
    """``Σ_a Σ_{p: pos[a,p]} Σ_{n: neg[a,n]} [pos_dist[a,p] − neg_dist[a,n] + margin]₊``.

    All inputs are ``(B, B)``. Rather than the ``B³`` tensor of all triplets, each row's
    negative distances are sorted once; for every ``(a, p)`` the active negatives (those with
    ``neg_dist[a,n] < pos_dist[a,p] + margin``) are a prefix of that order, found by binary
    search, and their hinge terms sum to ``cnt · (pos_dist[a,p] + margin) − prefix_sum``.
    Cost ``O(B² log B)``; the gradient flows through ``pos_dist`` and the gathered prefix sums
    exactly as through the explicit sum.
    """
    B = pos_dist.shape[0]
    keys, order = torch.where(neg, neg_dist.detach(), float("inf")).sort(dim=1)
    sorted_neg = torch.where(neg.gather(1, order), neg_dist.gather(1, order), 0.0)
    prefix = torch.cat([sorted_neg.new_zeros(B, 1), sorted_neg.cumsum(1)], dim=1)
    threshold = pos_dist + margin
    # number of negatives strictly below the threshold (the +inf fillers never are)
    active = torch.searchsorted(keys, threshold.detach().contiguous())
    per_pair = active * threshold - prefix.gather(1, active)
    # clamp: the two float sums can differ by rounding where no triplet is active
    return torch.where(pos, per_pair, 0.0).clamp_min(0.0).sum()


__all__ = ["TripletLoss"]
