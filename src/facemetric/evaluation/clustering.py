"""Clustering: quality metrics against true labels, and three ways to cluster embeddings.

Metrics (``labels_true`` = classes U, ``labels_pred`` = clusters V, ``n`` samples), all
computed from the sparse contingency table ``n_ij`` (samples of class i in cluster j) with
class sizes ``a_i`` and cluster sizes ``b_j``:

- NMI = ``MI / ((H(U) + H(V)) / 2)`` (arithmetic normalisation), with
  ``MI = Σ n_ij/n · log(n·n_ij / (a_i b_j))``; 1.0 when both labelings have one group.
- AMI = ``(MI − E[MI]) / ((H(U) + H(V))/2 − E[MI])`` with ``E[MI]`` under the hypergeometric
  model of random labelings with the same group sizes (Vinh, Epps, Bailey, JMLR 2010);
  1.0 for identical partitions.
- Pairwise precision/recall over the ``n(n−1)/2`` sample pairs: a pair is predicted positive
  when clustered together and truly positive when of one class. ``TP = Σ C(n_ij, 2)``,
  precision ``= TP / Σ C(b_j, 2)``, recall ``= TP / Σ C(a_i, 2)``; a ratio with no pair in its
  denominator is 1.0 (nothing was claimed, or nothing could be found).
- BCubed (Bagga & Baldwin 1998; Amigó et al. 2009), averaged over samples: precision
  ``= (1/n) Σ n_ij² / b_j``, recall ``= (1/n) Σ n_ij² / a_i``.

F is the harmonic mean of precision and recall (0 when both are 0).

Clustering algorithms (cosine geometry unless stated):

- ``kmeans``: Lloyd's algorithm on the given vectors (Euclidean) from a k-means++ start
  (Arthur & Vassilvitskii 2007), in torch, chunked. Normalise embeddings first for
  spherical data. (faiss is not needed.)
- ``threshold_clustering``: connected components of the graph whose edges join samples of
  cosine similarity ≥ ``threshold``; similarity blocks are computed a chunk of rows at a time
  and merged with a vectorised union–find, so memory is ``O(chunk × n)``.
- ``agglomerative_clustering``: average linkage on cosine distance ``1 − cos``, merging while
  the closest pair of clusters is at distance ``< distance_threshold`` (scikit-learn's
  convention). Nearest-neighbour-chain algorithm with Lance–Williams updates: ``O(n²)`` time
  and a dense float64 ``n × n`` matrix, i.e. ``8 n²`` bytes (0.8 GB at n = 10,000): meant for
  n up to about 10k.

Cluster labels returned by the algorithms are ``0..C−1`` in order of first appearance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facemetric.evaluation._arrays import (
    check_embeddings,
    encode_labels,
    normalize_rows,
    rows_per_block,
)

_DEFAULT_BLOCK_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class _Contingency:
    counts: np.ndarray  # (nnz,) non-zero n_ij
    row: np.ndarray  # (nnz,) class index i of each cell
    col: np.ndarray  # (nnz,) cluster index j of each cell
    class_sizes: np.ndarray  # (R,) a_i
    cluster_sizes: np.ndarray  # (C,) b_j
    n: int


def _contingency(labels_true: Any, labels_pred: Any) -> _Contingency:
    t = encode_labels(labels_true, "labels_true")
    p = encode_labels(labels_pred, "labels_pred", length=t.shape[0])
    if t.shape[0] == 0:
        raise ValueError("no samples: labels are empty")
    num_clusters = int(p.max()) + 1
    cells, counts = np.unique(t * num_clusters + p, return_counts=True)
    return _Contingency(
        counts=counts.astype(np.float64),
        row=cells // num_clusters,
        col=cells % num_clusters,
        class_sizes=np.bincount(t).astype(np.float64),
        cluster_sizes=np.bincount(p).astype(np.float64),
        n=int(t.shape[0]),
    )


def _entropy(sizes: np.ndarray, n: int) -> float:
    p = sizes / n
    return float(-np.sum(p * np.log(p)))


def _mutual_info(c: _Contingency) -> float:
    a = c.class_sizes[c.row]
    b = c.cluster_sizes[c.col]
    # n·n_ij and a_i·b_j are exact integers in float64 (below 2**53), so independent cells
    # give log(1) = 0 exactly.
    mi = np.sum(c.counts / c.n * np.log((c.n * c.counts) / (a * b)))
    return max(float(mi), 0.0)


def _lgamma(x: np.ndarray) -> np.ndarray:
    return torch.lgamma(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _expected_mutual_info(class_sizes: np.ndarray, cluster_sizes: np.ndarray, n: int) -> float:
    """``E[MI]`` over random labelings with the given group sizes (hypergeometric n_ij).

    ``E[MI] = Σ_i Σ_j Σ_{k} k/n · log(n k / (a_i b_j)) · P(n_ij = k)`` for
    ``k = max(1, a_i + b_j − n) .. min(a_i, b_j)``, grouped by distinct sizes.
    """
    a_vals, a_mult = np.unique(class_sizes.astype(np.int64), return_counts=True)
    b_vals, b_mult = np.unique(cluster_sizes.astype(np.int64), return_counts=True)
    lg_n1 = _lgamma(np.array([n + 1]))[0]
    total = 0.0
    for a, a_m in zip(a_vals.tolist(), a_mult.tolist(), strict=True):
        lo = np.maximum(1, a + b_vals - n)
        hi = np.minimum(a, b_vals)
        length = np.maximum(hi - lo + 1, 0)
        if length.sum() == 0:
            continue
        b = np.repeat(b_vals, length)
        weight = np.repeat(b_mult, length).astype(np.float64)
        offsets = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        k = np.repeat(lo, length) + offsets
        kf = k.astype(np.float64)
        log_term = np.log(n) + np.log(kf) - np.log(a) - np.log(b.astype(np.float64))
        log_p = (
            _lgamma(np.array([a + 1, n - a + 1])).sum()
            + _lgamma(b + 1)
            + _lgamma(n - b + 1)
            - lg_n1
            - _lgamma(k + 1)
            - _lgamma(a - k + 1)
            - _lgamma(b - k + 1)
            - _lgamma(n - a - b + k + 1)
        )
        total += a_m * float(np.sum(weight * kf / n * log_term * np.exp(log_p)))
    return total


def normalized_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """NMI with arithmetic-mean normalisation (module docstring)."""
    c = _contingency(labels_true, labels_pred)
    return _nmi(c)


def _nmi(c: _Contingency) -> float:
    hu, hv = _entropy(c.class_sizes, c.n), _entropy(c.cluster_sizes, c.n)
    if c.class_sizes.shape[0] == 1 and c.cluster_sizes.shape[0] == 1:
        return 1.0
    denom = 0.5 * (hu + hv)
    return float(min(_mutual_info(c) / denom, 1.0)) if denom > 0 else 0.0


def adjusted_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    """AMI with arithmetic-mean normalisation (module docstring)."""
    return _ami(_contingency(labels_true, labels_pred))


def _identical_partitions(c: _Contingency) -> bool:
    return c.counts.shape[0] == c.class_sizes.shape[0] == c.cluster_sizes.shape[0]


def _ami(c: _Contingency) -> float:
    if _identical_partitions(c):
        return 1.0
    mi = _mutual_info(c)
    emi = _expected_mutual_info(c.class_sizes, c.cluster_sizes, c.n)
    denom = 0.5 * (_entropy(c.class_sizes, c.n) + _entropy(c.cluster_sizes, c.n)) - emi
    return float((mi - emi) / denom)


@dataclass(frozen=True)
class PrecisionRecallF:
    precision: float
    recall: float
    f1: float


def _prf(precision: float, recall: float) -> PrecisionRecallF:
    total = precision + recall
    f1 = 2.0 * precision * recall / total if total > 0 else 0.0
    return PrecisionRecallF(float(precision), float(recall), float(f1))


def _pairs(x: np.ndarray) -> float:
    return float(np.sum(x * (x - 1.0) / 2.0))


def _pairwise(c: _Contingency) -> PrecisionRecallF:
    tp = _pairs(c.counts)
    pred, true = _pairs(c.cluster_sizes), _pairs(c.class_sizes)
    return _prf(tp / pred if pred > 0 else 1.0, tp / true if true > 0 else 1.0)


def pairwise_scores(labels_true: Any, labels_pred: Any) -> PrecisionRecallF:
    """Pairwise precision, recall and F over all sample pairs (module docstring)."""
    return _pairwise(_contingency(labels_true, labels_pred))


def _bcubed(c: _Contingency) -> PrecisionRecallF:
    sq = c.counts**2
    precision = np.sum(sq / c.cluster_sizes[c.col]) / c.n
    recall = np.sum(sq / c.class_sizes[c.row]) / c.n
    return _prf(precision, recall)


def bcubed_scores(labels_true: Any, labels_pred: Any) -> PrecisionRecallF:
    """BCubed precision, recall and F (module docstring)."""
    return _bcubed(_contingency(labels_true, labels_pred))


@dataclass(frozen=True)
class ClusteringReport:
    nmi: float
    ami: float
    pairwise: PrecisionRecallF
    bcubed: PrecisionRecallF
    num_classes: int
    num_clusters: int


def clustering_report(labels_true: Any, labels_pred: Any) -> ClusteringReport:
    """NMI, AMI, pairwise and BCubed scores of a clustering against true labels."""
    c = _contingency(labels_true, labels_pred)
    return ClusteringReport(
        nmi=_nmi(c),
        ami=_ami(c),
        pairwise=_pairwise(c),
        bcubed=_bcubed(c),
        num_classes=int(c.class_sizes.shape[0]),
        num_clusters=int(c.cluster_sizes.shape[0]),
    )


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Relabel to ``0..C−1`` in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.shape[0])
    return rank[inverse.reshape(-1)]


# --------------------------------------------------------------------------- k-means


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class KMeansResult:
    """``labels (n,)``, ``centroids (k, d)``, ``inertia = Σ ‖x − c(x)‖²``, the number of Lloyd
    iterations run and whether the assignment stopped changing."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    num_iters: int
    converged: bool


def _nearest_centroid(x: Tensor, centroids: Tensor, max_block_bytes: int) -> tuple[Tensor, Tensor]:
    """``(index, squared distance)`` of each row's nearest centroid, in row blocks."""
    c2 = (centroids * centroids).sum(dim=1)
    step = rows_per_block(centroids.shape[0], max_block_bytes, x.element_size())
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    dist = torch.empty(x.shape[0], dtype=x.dtype)
    for s in range(0, x.shape[0], step):
        xb = x[s : s + step]
        d2 = (xb * xb).sum(dim=1, keepdim=True) - 2.0 * (xb @ centroids.T) + c2
        best = d2.min(dim=1)
        idx[s : s + step] = best.indices
        dist[s : s + step] = best.values.clamp_min(0.0)
    return idx, dist


def kmeans(
    embeddings: Any,
    num_clusters: int,
    *,
    max_iters: int = 100,
    seed: int = 0,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
) -> KMeansResult:
    """k-means (Lloyd) from a k-means++ start, reproducible from ``seed``.

    k-means++: the first centre is a uniformly drawn sample, each next one a sample drawn
    with probability ∝ its squared distance to the nearest chosen centre. Lloyd iterations
    alternate nearest-centroid assignment and centroid = mean of its members, until the
    assignment no longer changes or ``max_iters`` updates. A cluster that empties is moved
    to the sample farthest from its centroid.
    """
    x = check_embeddings(embeddings)
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must lie in [1, {n}], got {num_clusters}")
    gen = torch.Generator().manual_seed(seed)

    x2 = (x * x).sum(dim=1)

    def sq_dist_to(i: int) -> Tensor:  # ‖x − x_i‖² for every row, one matrix-vector product
        return (x2 - 2.0 * (x @ x[i]) + x2[i]).clamp_min(0.0)

    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = sq_dist_to(chosen[0])
    for _ in range(1, num_clusters):
        weights = d2.double()
        weights[chosen] = 0.0  # rounding must not pick a centre twice
        if float(weights.sum()) <= 0.0:  # every other sample coincides with a centre
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0.0
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, sq_dist_to(nxt))
    centroids = x[chosen].clone()

    labels, dist = _nearest_centroid(x, centroids, max_block_bytes)
    converged = False
    iters = 0
    while iters < max_iters:
        iters += 1
        counts = torch.bincount(labels, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() > 0:
            far = dist.topk(empty.numel()).indices
            centroids[empty] = x[far]
        new_labels, dist = _nearest_centroid(x, centroids, max_block_bytes)
        if bool((new_labels == labels).all()) and empty.numel() == 0:
            converged = True
            break
        labels = new_labels
    return KMeansResult(
        labels=labels.numpy(),
        centroids=centroids.numpy(),
        inertia=float(dist.double().sum()),
        num_iters=iters,
        converged=converged,
    )


# --------------------------------------------------------------------------- threshold graph


def _compress(parent: np.ndarray) -> None:
    """Point every node straight at its root (pointer jumping)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the components of every edge ``(u[e], v[e])``; roots hook to smaller roots."""
    while u.size:
        _compress(parent)
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
        if not u.size:
            return
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def threshold_clustering(
    embeddings: Any,
    threshold: float,
    *,
    normalize: bool = True,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
) -> np.ndarray:
    """Connected components of the graph "similarity ≥ ``threshold``" (cosine if
    ``normalize``, else inner product), as labels ``(n,)``. Single-linkage in effect: one
    chain of similar pairs joins two groups."""
    x = check_embeddings(embeddings)
    if normalize:
        x = normalize_rows(x)
    n = x.shape[0]
    parent = np.arange(n, dtype=np.int64)
    step = rows_per_block(n, max_block_bytes, 2 * x.element_size())
    for s in range(0, n, step):
        # rows s..s+c against columns s..n: the upper triangle, each pair once
        block = x[s : s + step] @ x[s:].T
        c = block.shape[0]
        upper = torch.arange(n - s).unsqueeze(0) > torch.arange(c).unsqueeze(1)
        edges = torch.nonzero((block >= threshold) & upper)
        del block, upper
        if edges.numel():
            _union(parent, edges[:, 0].numpy() + s, edges[:, 1].numpy() + s)
    _compress(parent)
    return _first_appearance(parent)


# --------------------------------------------------------------------------- average linkage


def agglomerative_clustering(
    embeddings: Any, distance_threshold: float, *, normalize: bool = True
) -> np.ndarray:
    """Average-linkage clustering on cosine distance, cut at ``distance_threshold``.

    Two clusters' distance is the mean ``1 − cos`` over their cross pairs; clusters merge
    while the closest two are at distance ``< distance_threshold``. With
    ``normalize=False`` the distance is ``1 − x·y`` of the raw embeddings. Returns labels
    ``(n,)``. Memory: a dense float64 ``n × n`` matrix (module docstring).
    """
    x = check_embeddings(embeddings).double()
    if normalize:
        x = normalize_rows(x)
    n = x.shape[0]
    dist = (x @ x.T).neg_().add_(1.0).numpy()  # in place: one n × n buffer
    np.fill_diagonal(dist, np.inf)
    size = np.ones(n)
    active = np.ones(n, dtype=bool)
    parent = np.arange(n, dtype=np.int64)
    num_active = n
    start = 0
    chain: list[int] = []
    # Nearest-neighbour chain: follow nearest neighbours until two clusters are each other's
    # nearest (reciprocal), merge them, continue from the rest of the chain. Valid because
    # average linkage is reducible (a merged cluster is never closer to a third cluster than
    # the nearer of its parts).
    while num_active > 1:
        if not chain:
            while not active[start]:
                start += 1
            chain.append(start)
        a = chain[-1]
        row = dist[a]
        b = int(np.argmin(row))
        d = row[b]
        if len(chain) >= 2 and row[chain[-2]] <= d:  # prefer the chain on ties
            b = chain[-2]
            d = row[b]
        if d >= distance_threshold:
            # Every cluster on the chain is at ≥ threshold from everything, and averages of
            # such distances stay ≥ threshold: none of them will merge again.
            for c in chain:
                active[c] = False
                dist[c, :] = np.inf
                dist[:, c] = np.inf
            num_active -= len(chain)
            chain.clear()
            continue
        if len(chain) >= 2 and b == chain[-2]:
            chain.pop()
            chain.pop()
            merged = (size[a] * dist[a] + size[b] * dist[b]) / (size[a] + size[b])
            dist[a, :] = merged
            dist[:, a] = merged
            dist[b, :] = np.inf
            dist[:, b] = np.inf
            dist[a, a] = np.inf
            size[a] += size[b]
            active[b] = False
            parent[b] = a
            num_active -= 1
        else:
            chain.append(b)
    _compress(parent)
    return _first_appearance(parent)
