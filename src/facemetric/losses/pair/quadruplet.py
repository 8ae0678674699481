"""Quadruplet loss (Chen, Chen, Zhang & Huang, "Beyond triplet loss: a deep quadruplet network
for person re-identification", CVPR 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.losses.pair.triplet import all_triplets_hinge_sum, require_triplets
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, same_label_mask

#: how the second negative pair of a quadruplet is chosen (see ``QuadrupletLoss``)
SECOND_PAIRS = ("all", "hardest_of_n1")


class QuadrupletLoss(TupleLoss):
    """The triplet loss plus a second push between two *other* identities (Chen et al. 2017,
    eq. 3 with the adaptive margin of their margin-based online hard negative mining)::

        ℓ(a, p, n1) = [D_ap − D_{a n1} + α1]₊  +  1/|Q_a| Σ_{(l,k)∈Q_a} [D_ap − D_lk + α2]₊
        Q_a = {(l, k): y_l ≠ y_k, y_l ≠ y_a, y_k ≠ y_a}     (unordered negative pairs)
        L = 1/|T| Σ_{(a,p,n1)∈T} ℓ(a, p, n1)

    The second term asks positive pairs to be closer than negative pairs that do not even
    share the anchor's identity, which is what a verification threshold needs. As in the
    paper, the second pair ``(l, k)`` is drawn **independently of the first negative**
    ``n1``: every negative pair of the batch between two identities other than ``y_a``
    (``second_pair="all"``, the default). In a P×K batch ``|Q_a|`` and the number of
    triplets per positive pair are constants, so ``L`` is the mean of the first term over
    the triplets plus the mean of the second over the quadruplets ``(a, p, l, k)`` — the
    paper's two sums, each divided by its number of terms.

    **Margins.** ``margin1 = margin2 = None`` (default) is the paper's adaptive margin,
    recomputed on every batch from its distances (detached, so no gradient flows through
    it): ``α_i = w_i · [μ_n − μ_p]₊`` with ``μ_p``/``μ_n`` the mean distance over the
    batch's positive/negative pairs and ``(w_1, w_2) = margin_weights``, the paper's
    ``(1, 0.5)``. The clamp at 0 is ours (a batch whose negatives are closer on average
    than its positives would otherwise get negative margins). Numbers for ``margin1`` and
    ``margin2`` fix the margins instead (the paper's ``α1 > α2``: the second push is weaker).
    The paper uses squared distances: pass ``SquaredEuclideanDistance()`` for that.

    **Triplets** ``T``: the explicit ``Triplets``, else the miner's, else every valid triplet
    of the batch, never materialised: the first term is ``O(B² log B)``, the second sorts the
    ``O(B²)`` negative pairs once and answers every positive pair by binary search, with
    prefix sums in float64 (memory ``O(B²)``). The batch needs at least three identities;
    ``Pairs`` are rejected.

    ``second_pair="hardest_of_n1"`` is **not the paper's rule** but a cheaper, harder
    variant this library had first: each triplet gets the one pair ``(n1, n2*)`` with
    ``n2* = argmin_{k: y_k ∉ {y_a, y_n1}} D_{n1 k}``, the nearest sample of a third identity
    to ``n1`` — ``ℓ = [D_ap − D_{a n1} + α1]₊ + [D_ap − D_{n1 n2*} + α2]₊``. It ties the
    second pair to the first negative and looks at one pair per triplet; it is kept for runs
    trained with it and as a hard-mined alternative.

    Args:
        margin1: ``α1``, the margin of the anchor-sharing (triplet) term (≥ 0), or ``None``.
        margin2: ``α2``, the margin of the term against the second pair (≥ 0), or ``None``.
        second_pair: ``"all"`` (the paper) or ``"hardest_of_n1"`` (see above).
        margin_weights: ``(w_1, w_2)`` of the adaptive margin (≥ 0; only with ``None``
            margins).
        distance: the distance ``D`` (default Euclidean, or the miner's).
        miner: picks the triplets ``(a, p, n1)`` when none are passed to ``forward``.
    """

    def __init__(
        self,
        margin1: float | None = None,
        margin2: float | None = None,
        *,
        second_pair: str = "all",
        margin_weights: Sequence[float] = (1.0, 0.5),
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        super().__init__(distance=distance, miner=miner)
        if (margin1 is None) != (margin2 is None):
            raise ValueError(
                "QuadrupletLoss: give both margin1 and margin2 (fixed margins) or neither "
                f"(the paper's adaptive margin); got margin1={margin1}, margin2={margin2}"
            )
        if margin1 is not None and margin2 is not None and (margin1 < 0 or margin2 < 0):
            raise ValueError(
                f"QuadrupletLoss margins must be >= 0, got margin1={margin1}, margin2={margin2}"
            )
        if second_pair not in SECOND_PAIRS:
            raise ValueError(
                f"QuadrupletLoss: second_pair must be one of {SECOND_PAIRS}, got {second_pair!r}"
            )
        weights = tuple(float(w) for w in margin_weights)
        if len(weights) != 2 or min(weights) < 0:
            raise ValueError(
                f"QuadrupletLoss: margin_weights must be two numbers >= 0, got {margin_weights}"
            )
        if margin1 is not None and weights != (1.0, 0.5):
            raise ValueError(
                "QuadrupletLoss: margin_weights scale the adaptive margin, but fixed margins "
                "were given; drop margin_weights or set margin1 = margin2 = None"
            )
        self.margin1 = None if margin1 is None else float(margin1)
        self.margin2 = None if margin2 is None else float(margin2)
        self.second_pair = second_pair
        self.margin_weights = weights

    @property
    def adaptive(self) -> bool:
        """Whether the margins are recomputed from each batch (``margin1 is None``)."""
        return self.margin1 is None

    def margins(self, dist: Tensor, labels: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(α1, α2)`` for a batch: the fixed margins, or ``w_i · [μ_n − μ_p]₊`` (detached)."""
        if self.margin1 is not None and self.margin2 is not None:
            return self.margin1, self.margin2
        pos, neg = same_label_mask(labels)
        d = dist.detach()
        gap = (d[neg].mean() - d[pos].mean()).clamp_min(0.0)
        w1, w2 = self.margin_weights
        return w1 * gap, w2 * gap

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
        m1, m2 = self.margins(dist, labels)
        pos, neg = same_label_mask(labels)
        if triplets is None:
            count = (pos.sum(1) * neg.sum(1)).sum()
            total = all_triplets_hinge_sum(dist, dist, pos, neg, m1)
            a, p = pos.nonzero(as_tuple=True)
            n_per_pair = neg.sum(1)[a].to(dist.dtype)  # triplets sharing (a, p)
            if self.second_pair == "all":
                second = _second_pair_means(dist, labels, a, p, m2)
            else:
                near1, near2, near1_label = _two_nearest_identities(dist, labels)
                # second[a, n1] = D_{n1 n2*(a, n1)}
                d_second = torch.where(
                    labels[:, None] != near1_label[None, :], near1[None, :], near2[None, :]
                )
                total = total + all_triplets_hinge_sum(dist, d_second, pos, neg, m2)
                return total / count
            return (total + (second * n_per_pair).sum()) / count
        a, p, n = triplets.anchor, triplets.positive, triplets.negative
        d_ap = dist[a, p]
        first = (d_ap - dist[a, n] + m1).relu()
        if self.second_pair == "all":
            return (first + _second_pair_means(dist, labels, a, p, m2)).mean()
        near1, near2, near1_label = _two_nearest_identities(dist, labels)
        d_second = torch.where(labels[a] != near1_label[n], near1[n], near2[n])
        return (first + (d_ap - d_second + m2).relu()).mean()


def _second_pair_means(
    dist: Tensor, labels: Tensor, a: Tensor, p: Tensor, margin: Tensor | float
) -> Tensor:
    """For each positive pair ``(a[i], p[i])``: ``1/|Q| Σ_{(l,k)∈Q} [D_ap + margin − D_lk]₊``
    over the negative pairs ``Q`` of two identities other than ``y_a`` (shape of ``a``).

    The ``M`` unordered negative pairs are sorted once by distance. For a query
    ``q = D_ap + margin`` the active pairs (``D_lk < q``) are a prefix of that order,
    ``r = searchsorted(q)`` long; its count and sum come from prefix sums. Pairs that touch
    the anchor's identity ``c`` are taken out the same way: every pair is listed once under
    each of its two identities, keyed ``c·(M+1) + rank``, so the pairs of ``c`` ranked below
    ``r`` are one more binary search. Sums run in float64 so that the differences of prefix
    sums keep the precision of the per-pair terms.
    """
    B = dist.shape[0]
    _, cls = torch.unique(labels, return_inverse=True)
    C = int(cls.max()) + 1
    left, right = torch.triu_indices(B, B, 1, device=dist.device)
    keep = cls[left] != cls[right]
    left, right = left[keep], right[keep]
    M = int(left.numel())
    values = dist[left, right]
    keys, order = values.detach().sort()
    ordered = values[order].to(torch.float64)
    zero = ordered.new_zeros(1)
    prefix = torch.cat([zero, ordered.cumsum(0)])  # (M + 1,)
    # every pair under each of its identities, sorted by (identity, rank)
    rank = torch.arange(M, device=dist.device)
    owner = torch.cat([cls[left][order], cls[right][order]])
    entry_key, perm = (owner * (M + 1) + rank.repeat(2)).sort()
    entry_prefix = torch.cat([zero, ordered.repeat(2)[perm].cumsum(0)])  # (2M + 1,)
    starts = torch.searchsorted(entry_key, torch.arange(C + 1, device=dist.device) * (M + 1))
    own_total = starts[1:] - starts[:-1]  # pairs touching each identity

    c = cls[a]
    query = dist[a, p] + margin
    active = torch.searchsorted(keys, query.detach().contiguous())  # pairs with D_lk < q
    pos_in = torch.searchsorted(entry_key, c * (M + 1) + active)
    own_count = pos_in - starts[c]
    own_sum = entry_prefix[pos_in] - entry_prefix[starts[c]]
    count = (active - own_count).to(torch.float64)
    total = prefix[active] - own_sum
    hinge = (count * query.to(torch.float64) - total).clamp_min(0.0)
    size = (M - own_total[c]).to(torch.float64)  # |Q_a| >= 1 with three identities
    return (hinge / size).to(dist.dtype)


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


__all__ = ["SECOND_PAIRS", "QuadrupletLoss"]
