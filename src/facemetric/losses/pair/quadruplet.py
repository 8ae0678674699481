"""Quadruplet loss (Chen, Chen, Zhang & Huang, "Beyond triplet loss: a deep quadruplet network
for person re-identification", CVPR 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.losses.pair.triplet import all_triplets_hinge_sum, require_triplets
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, same_label_mask


class QuadrupletLoss(TupleLoss):
    """The triplet loss plus a second push between two *other* identities::

        ℓ(a, p, n1, n2) = [D_ap − D_{a n1} + α1]₊ + [D_ap − D_{n1 n2} + α2]₊
        L = 1/|T| Σ_{(a,p,n1)∈T} ℓ(a, p, n1, n2*(a, n1))

    The second term asks positive pairs to be closer than negative pairs that do not even
    share the anchor, which is what a verification threshold needs; the paper takes
    ``α2 < α1`` (a weaker push) and uses squared distances (pass
    ``SquaredEuclideanDistance()`` for that).

    **How quadruplets are formed**: each triplet ``(a, p, n1)`` — the explicit ``Triplets``,
    else the miner's, else every valid triplet of the batch — is extended by its *hardest*
    second negative ``n2*(a, n1) = argmin_{k: y_k ∉ {y_a, y_n1}} D_{n1 k}`` (the paper's
    margin-based hard mining for the second term). It is found in ``O(B²)`` from the two
    nearest other identities of each ``n1``: the nearest one unless it is ``a``'s, else the
    second. **Reduction**: the mean over the quadruplets formed (one per triplet), easy ones
    included; the all-triplets default never materialises the triplets (``O(B² log B)``).
    The batch needs at least three identities; ``Pairs`` are rejected.

    Args:
        distance: the distance ``D`` (default Euclidean, or the miner's).
        miner: picks the triplets ``(a, p, n1)`` when none are passed to ``forward``.
        margin1: ``α1``, the margin of the anchor-sharing (triplet) term (≥ 0).
        margin2: ``α2``, the margin of the term against the pair ``(n1, n2)`` (≥ 0).
    """

    def __init__(
        self,
        margin1: float = 0.2,
        margin2: float = 0.1,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        super().__init__(distance=distance, miner=miner)
        if margin1 < 0 or margin2 < 0:
            raise ValueError(
                f"QuadrupletLoss margins must be >= 0, got margin1={margin1}, margin2={margin2}"
            )
        self.margin1 = float(margin1)
        self.margin2 = float(margin2)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        assert dist is not None
        triplets = None if tuples is None else require_triplets(tuples, type(self).__name__)
        if torch.unique(labels).numel() < 3:
            raise ValueError(
                "QuadrupletLoss needs at least 3 identities in the batch (anchor, first and "
                f"second negative all differ), got {torch.unique(labels).numel()}"
            )
        if triplets is not None and len(triplets) == 0:
            return zero_loss(embeddings)
        near1, near2, near1_label = _two_nearest_identities(dist, labels)
        if triplets is None:
            pos, neg = same_label_mask(labels)
            count = (pos.sum(1) * neg.sum(1)).sum()
            # second[a, n1] = D_{n1 n2*(a, n1)}
            second = torch.where(
                labels[:, None] != near1_label[None, :], near1[None, :], near2[None, :]
            )
            total = all_triplets_hinge_sum(dist, dist, pos, neg, self.margin1)
            total = total + all_triplets_hinge_sum(dist, second, pos, neg, self.margin2)
            return total / count
        a, p, n = triplets.anchor, triplets.positive, triplets.negative
        d_ap = dist[a, p]
        second = torch.where(labels[a] != near1_label[n], near1[n], near2[n])
        loss = (d_ap - dist[a, n] + self.margin1).relu() + (d_ap - second + self.margin2).relu()
        return loss.mean()


def _two_nearest_identities(dist: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample ``i``: the distance to its nearest sample of another identity, that of its
    nearest sample of a third identity (neither ``y_i`` nor the first's), and the first's label.

    Needs at least three identities, so both exist for every row.
    """
    same = labels[:, None] == labels[None, :]
    near1, idx1 = torch.where(same, float("inf"), dist).min(dim=1)
    near1_label = labels[idx1]
    excluded = same | (labels[None, :] == near1_label[:, None])
    near2 = torch.where(excluded, float("inf"), dist).min(dim=1).values
    return near1, near2, near1_label


__all__ = ["QuadrupletLoss"]
