"""Multi-similarity loss (Wang, Han, Huang, Dong, Scott, CVPR 2019).

"Multi-Similarity Loss with General Pair Weighting". With similarities ``S = 1 − d`` (the
cosine similarity for the default ``CosineDistance``), for each anchor i with positives P_i
and negatives N_i of the batch (or of the given pairs):

    L_i = 1/α · log(1 + Σ_{k∈P_i} exp(−α (S_ik − λ)))
        + 1/β · log(1 + Σ_{k∈N_i} exp( β (S_ik − λ)))

Reduction: mean of L_i over all B anchors of the batch (an anchor without pairs adds 0).
Paper defaults α = 2, β = 50, λ = 0.5; pair with ``MultiSimilarityMiner(epsilon=0.1)`` for
the paper's hard-pair mining step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.distances import CosineDistance, Distance
from facemetric.losses.pair.base import TupleLoss
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, as_pairs, pair_masks, same_label_mask

# Masked-out entries of a log-sum-exp get this exponent instead of −inf: exp underflows to 0
# and, unlike −inf, an all-masked row keeps a finite (zero) gradient.
_MASKED = -1.0e4


def log1p_sum_exp(z: Tensor, mask: Tensor) -> Tensor:
    """Row-wise ``log(1 + Σ_{k: mask} exp(z_k))``, stable, finite for rows with no entry."""
    z = z.masked_fill(~mask, _MASKED)
    zero = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
    return torch.logsumexp(torch.cat([zero, z], dim=1), dim=1)


class MultiSimilarityLoss(TupleLoss):
    """Multi-similarity loss; see the module docstring for the formula and reduction."""

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        if distance is None and miner is None:
            distance = CosineDistance()
        super().__init__(distance=distance, miner=miner)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"alpha and beta must be positive, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)

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
        else:
            pos, neg = pair_masks(as_pairs(tuples), labels.numel())
        sim = 1.0 - dist
        pos_term = log1p_sum_exp(-self.alpha * (sim - self.base), pos) / self.alpha
        neg_term = log1p_sum_exp(self.beta * (sim - self.base), neg) / self.beta
        return (pos_term + neg_term).mean()
