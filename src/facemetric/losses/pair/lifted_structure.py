"""Lifted structured loss, smooth upper bound (Song, Xiang, Jegelka & Savarese, "Deep Metric
Learning via Lifted Structured Feature Embedding", CVPR 2016, eq. 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, as_pairs, same_label_mask


class LiftedStructureLoss(TupleLoss):
    """Each positive pair against *all* negatives of both its ends, smoothly::

        J_ij = log( Σ_{(i,k)∈N} exp(α − D_ik) + Σ_{(j,l)∈N} exp(α − D_jl) ) + D_ij
        L    = 1/(2|P|) Σ_{(i,j)∈P} [J_ij]₊²

    **Reduction**: the mean over the positive pairs ``P`` formed of ``½ [J_ij]₊²``. Without
    tuples or a miner ``P`` is every ordered positive pair and ``N`` every negative pair of
    the batch; listing each unordered pair twice gives exactly the paper's value. With
    explicit ``Pairs`` (or ``Triplets``, through their distinct ``(a,p)``/``(a,n)`` pairs)
    ``P`` is the given positive pairs and ``N`` the given negative pairs, taken as unordered
    (``(i,k)`` or ``(k,i)`` listed makes ``k`` a negative of ``i`` and ``i`` one of ``k``). A
    positive pair neither of whose ends has a negative has ``J = −∞`` and costs 0.

    Computed in ``O(B²)``: one masked log-sum-exp per row, ``lse_i = log Σ_{k∈N(i)}
    exp(α − D_ik)``, then ``J_ij = logaddexp(lse_i, lse_j) + D_ij``.

    Args:
        distance: the distance ``D`` (default Euclidean, or the miner's).
        miner: picks the pairs when none are passed to ``forward``.
        margin: ``α``, how far negatives should be beyond positives (> 0).
    """

    def __init__(
        self,
        margin: float = 1.0,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        super().__init__(distance=distance, miner=miner)
        if margin <= 0:
            raise ValueError(f"LiftedStructureLoss margin must be > 0, got {margin}")
        self.margin = float(margin)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        assert dist is not None
        if tuples is None:
            pos, neg = same_label_mask(labels)
            if not bool(neg.any()):
                return zero_loss(embeddings)
            lse = self._negative_lse(dist, neg)
            J = torch.logaddexp(lse[:, None], lse[None, :]) + dist
            return torch.where(pos, J, 0.0).relu().square().sum() / (2 * pos.sum())
        pairs = as_pairs(tuples)
        if pairs.num_pos == 0:
            return zero_loss(embeddings)
        B = dist.shape[0]
        neg = torch.zeros(B, B, dtype=torch.bool, device=dist.device)
        neg[pairs.neg_a, pairs.neg_b] = True
        neg[pairs.neg_b, pairs.neg_a] = True
        lse = self._negative_lse(dist, neg)
        i, j = pairs.pos_a, pairs.pos_b
        J = torch.logaddexp(lse[i], lse[j]) + dist[i, j]
        return J.relu().pow(2).mean() / 2

    def _negative_lse(self, dist: Tensor, neg: Tensor) -> Tensor:
        """``lse_i = log Σ_{k: neg[i,k]} exp(α − D_ik)`` for every row ``i``."""
        flush_subnormal_grad(dist)
        return masked_logsumexp(self.margin - dist, neg)


#: how far below its row's maximum an exponent may lie; e^-50 ≈ 2e-22 is below the float64
#: resolution of any sum that contains the maximum, so raising smaller ones changes nothing
_EXP_RANGE = 50.0


def masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """``log Σ_{k: mask[i,k]} exp(x[i,k])`` per row of ``(N, M)`` ``x``, safe and fast.

    A row with no entry gives ``finfo.min`` (+ log M) — a finite stand-in for −∞ whose
    ``exp`` is 0 downstream, so no NaN reaches the gradient. In other rows every term below
    e^-50 of the row's largest (masked-out ones included) is raised to it, with no gradient:
    at most ``M · e^-50 ≈ M · 2e-22`` of the sum, below float64 resolution, and it keeps
    ``exp`` and its gradient out of the subnormal floats, on which CPU kernels run about ten
    times slower.
    """
    masked = torch.where(mask, x, torch.finfo(x.dtype).min)
    low = masked.detach().amax(dim=1, keepdim=True) - _EXP_RANGE
    return masked.clamp(min=low).logsumexp(1)


def flush_subnormal_grad(t: Tensor) -> None:
    """Zero the subnormal entries of ``t``'s gradient when it arrives (flush-to-zero).

    A ``B × B`` gradient holding products of small probabilities can be mostly subnormal,
    which makes the matmuls of the backward pass through the distance ~10× slower on CPU.
    """
    if t.requires_grad:
        t.register_hook(_flush_subnormal)


def _flush_subnormal(grad: Tensor | None) -> Tensor | None:
    if grad is None:  # an undefined gradient (autograd's checks pass one)
        return None
    return grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0)


__all__ = ["LiftedStructureLoss", "flush_subnormal_grad", "masked_logsumexp"]
