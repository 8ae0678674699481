"""Facility-location clustering loss (Song, Jegelka, Rathod, Murphy, CVPR 2017).

"Deep Metric Learning via Facility Location". A structured hinge between the best clustering
the model's embedding admits (loss-augmented, found greedily) and the ground-truth clustering,
with ``1 − NMI`` as the structured margin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss
from facemetric.tuples import Pairs, Triplets


def nmi_from_contingency(table: Tensor) -> Tensor:
    """NMI of the clusterings behind contingency tables ``(..., R, K)`` of counts -> ``(...)``.

    ``NMI = I(U; V) / ((H(U) + H(V)) / 2)`` (arithmetic normalisation, natural log), and 1 when
    both clusterings are a single group (both entropies 0). Empty rows/columns are ignored.
    """
    p = table.to(torch.float64)
    p = p / p.sum((-2, -1), keepdim=True)
    pu, pv = p.sum(-1), p.sum(-2)
    hu = -torch.special.xlogy(pu, pu).sum(-1)
    hv = -torch.special.xlogy(pv, pv).sum(-1)
    huv = -torch.special.xlogy(p, p).sum((-2, -1))
    return _nmi(hu, hv, huv)


def _nmi(hu: Tensor, hv: Tensor, huv: Tensor) -> Tensor:
    """NMI from the entropies of U, V and (U, V); 1 when both are a single group."""
    mi = (hu + hv - huv).clamp_min(0.0)  # I(U; V) = H(U) + H(V) − H(U, V)
    both_single = (hu <= 1e-12) & (hv <= 1e-12)
    return torch.where(both_single, torch.ones_like(mi), mi / ((hu + hv) / 2.0).clamp_min(1e-300))


def normalized_mutual_info(pred: Tensor, true: Tensor) -> Tensor:
    """NMI between two labelings ``(N,)`` of the same items (float64 scalar); see
    ``nmi_from_contingency``. Equals scikit-learn's ``normalized_mutual_info_score``."""
    if pred.shape != true.shape or pred.dim() != 1 or pred.numel() == 0:
        raise ValueError("pred and true must be non-empty 1-D tensors of equal length")
    _, u = torch.unique(pred, return_inverse=True)
    _, v = torch.unique(true, return_inverse=True)
    R, K = int(u.max()) + 1, int(v.max()) + 1
    table = torch.zeros(R * K, dtype=torch.float64, device=pred.device)
    table.index_add_(0, u * K + v, torch.ones(u.numel(), dtype=torch.float64, device=u.device))
    return nmi_from_contingency(table.view(R, K))


class FacilityLocationLoss(TupleLoss):
    """Structured facility-location loss, divided by the batch size ``B``:

    ``ℓ = 1/B · [ max_{|S| = |Y|} { F(X, S) + γ Δ(g(S), y) } − F̃(X, y) ]₊``

    - ``F(X, S) = −Σ_i min_{j∈S} d(x_i, x_j)``: facility location with medoids ``S``;
    - ``g(S)`` assigns every sample to its nearest medoid, ``Δ = 1 − NMI(g(S), y)``;
    - ``F̃(X, y) = Σ_k max_{j∈C_k} F(X_{C_k}, {j})``: each true class keeps its best medoid;
    - the max over ``S`` (``|S|`` = number of classes in the batch) is the paper's greedy
      loss-augmented inference: ``|Y|`` steps, each adding the sample that most increases
      ``F + γΔ``, all ``B`` candidates scored at once (Song et al., CVPR 2017, eq. 5 and
      Alg. 1; the pairwise-exchange refinement is not done).

    The choices (``S``, the oracle medoids) are discrete; the gradient flows through the
    distances of every sample to its chosen medoid and to its class's oracle medoid.
    ``distance`` defaults to the plain (unsquared) Euclidean distance, as in the paper; the
    diagonal of its matrix is set to exactly 0. The
    ``1/B`` makes the scale independent of the batch size; it does not change the inference,
    and ``γ`` keeps the paper's meaning. ``tuples`` are not used (``ValueError`` if given).
    """

    def __init__(self, gamma: float = 1.0, *, distance: Distance | None = None) -> None:
        super().__init__(distance=distance)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        assert dist is not None
        if tuples is not None:
            raise ValueError("FacilityLocationLoss clusters the whole batch; pass tuples=None")
        # a sample is at distance 0 from itself (the matmul form leaves rounding noise there)
        eye = torch.eye(dist.shape[0], dtype=torch.bool, device=dist.device)
        dist = dist.masked_fill(eye, 0.0)
        with torch.no_grad():
            medoids = greedy_loss_augmented_inference(dist.detach(), labels, self.gamma)
            oracle = oracle_medoids(dist.detach(), labels)
            delta = 1.0 - clustering_nmi(dist.detach(), medoids, labels)
        f_s = -dist[:, medoids].min(dim=1).values.sum()
        same = labels[:, None] == labels[None, :]
        f_oracle = -(dist * same)[:, oracle].sum()
        gap = f_s + self.gamma * delta.to(dist.dtype) - f_oracle
        return F.relu(gap) / embeddings.shape[0]


def greedy_loss_augmented_inference(dist: Tensor, labels: Tensor, gamma: float) -> Tensor:
    """Greedy ``argmax_{|S| = |Y|} F(X, S) + γ (1 − NMI(g(S), y))`` over a distance matrix.

    ``dist`` ``(B, B)``, ``labels`` ``(B,)``; returns the medoid indices in the order picked.
    Each step scores every candidate ``j ∉ S`` at once: the new nearest-medoid distances
    ``min(m_i, d_ij)``, and the clustering in which the samples strictly closer to ``j`` move
    to it. The NMI of all ``B`` candidate clusterings comes from per-point counts:
    ``Σ_cells n log n = Σ_i log n_{cell(i)}``, the counts found by one scatter and one gather,
    so a step costs ``O(B²)`` besides a ``B × |S|·|Y|`` count table. Ties go to the lowest index.
    """
    B = dist.shape[0]
    dev = dist.device
    _, y = torch.unique(labels, return_inverse=True)
    K = int(y.max()) + 1
    log_b = math.log(B)
    log_n = torch.arange(B + 1, dtype=torch.float64, device=dev).log()  # log of a count
    class_size = torch.bincount(y, minlength=K)
    h_v = log_b - log_n[class_size[y]].sum() / B  # entropy of the true labels
    ones = torch.ones(B, B, dtype=torch.float32, device=dev)
    # count tables ((candidate, cluster) sizes, (candidate, cluster·class) cells), allocated
    # once as flat buffers so every step's table is a contiguous view
    size_buf = torch.empty(B * K, dtype=torch.float32, device=dev)
    cell_buf = torch.empty(B * K * K, dtype=torch.float32, device=dev)
    nearest = torch.full((B,), float("inf"), dtype=dist.dtype, device=dev)
    assign = torch.zeros(B, dtype=torch.long, device=dev)
    picked = torch.zeros(B, dtype=torch.bool, device=dev)
    order: list[Tensor] = []
    for step in range(K):
        closer = dist < nearest[None, :]  # (candidate j, sample i)
        f = -torch.minimum(dist, nearest[None, :]).sum(1)
        cluster = torch.where(closer, step, assign[None, :])
        cells = cluster * K + y[None, :]
        sizes = size_buf[: B * (step + 1)].view(B, step + 1).zero_()
        sizes.scatter_add_(1, cluster, ones)
        counts = cell_buf[: B * (step + 1) * K].view(B, (step + 1) * K).zero_()
        counts.scatter_add_(1, cells, ones)
        h_u = log_b - log_n[sizes.gather(1, cluster).long()].sum(1) / B
        h_uv = log_b - log_n[counts.gather(1, cells).long()].sum(1) / B
        nmi = _nmi(h_u, h_v.expand_as(h_u), h_uv)
        score = f.to(torch.float64) + gamma * (1.0 - nmi)
        score = score.masked_fill(picked, float("-inf"))
        j = torch.argmax(score)
        assign = torch.where(closer[j], step, assign)
        nearest = torch.minimum(nearest, dist[j])
        picked[j] = True
        order.append(j)
    return torch.stack(order)


def oracle_medoids(dist: Tensor, labels: Tensor) -> Tensor:
    """Per class (in sorted label order), the member minimising the summed distance to its
    class: ``argmax_{j∈C_k} F(X_{C_k}, {j})``. Ties go to the lowest index."""
    B = dist.shape[0]
    _, y = torch.unique(labels, return_inverse=True)
    K = int(y.max()) + 1
    cost = (dist * (y[:, None] == y[None, :])).sum(0)  # cost[j] = Σ_{i in j's class} d(i, j)
    best = torch.full((K,), float("inf"), dtype=cost.dtype, device=cost.device)
    best = best.scatter_reduce(0, y, cost, "amin")
    idx = torch.arange(B, device=dist.device)
    hit = cost == best[y]
    pick = torch.full((K,), B, dtype=torch.long, device=dist.device)
    return pick.scatter_reduce(0, y[hit], idx[hit], "amin")


def clustering_nmi(dist: Tensor, medoids: Tensor, labels: Tensor) -> Tensor:
    """NMI between the nearest-medoid clustering ``g(S)`` and ``labels``. Ties between medoids
    go to the one listed first (as in the greedy inference)."""
    assign = torch.argmin(dist[:, medoids], dim=1)
    return normalized_mutual_info(assign, labels)


__all__ = [
    "FacilityLocationLoss",
    "greedy_loss_augmented_inference",
    "normalized_mutual_info",
    "oracle_medoids",
]
