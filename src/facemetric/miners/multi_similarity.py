"""Multi-similarity pair mining (Wang et al., CVPR 2019, "Multi-Similarity Loss").

With similarities ``S = 1 − d``, keep for anchor i

- the negatives k with ``S_ik + ε > min_{j∈P_i} S_ij`` (more similar than its least similar
  positive, up to ε), and
- the positives j with ``S_ij − ε < max_{k∈N_i} S_ik`` (less similar than its most similar
  negative, up to ε).

Returns ``Pairs``. An anchor without positives keeps no negatives and vice versa.
"""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.distances import CosineDistance, Distance
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, same_label_mask


class MultiSimilarityMiner(Miner):
    """Hard positive/negative pairs relative to each anchor's hardest opposite pair."""

    def __init__(self, epsilon: float = 0.1, distance: Distance | None = None) -> None:
        super().__init__(CosineDistance() if distance is None else distance)
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Pairs:
        pos, neg = same_label_mask(labels)
        sim = 1.0 - dist
        inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
        least_similar_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
        most_similar_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
        hard_neg = neg & (sim + self.epsilon > least_similar_pos)
        hard_pos = pos & (sim - self.epsilon < most_similar_neg)
        pa, pb = hard_pos.nonzero(as_tuple=True)
        na, nb = hard_neg.nonzero(as_tuple=True)
        return Pairs(pa, pb, na, nb)
