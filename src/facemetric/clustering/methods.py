"""Embeddings → clusters: the options, the two methods, and assignment to existing clusters.

- **agglomerative** (default): :func:`~facemetric.clustering.graph.constrained_agglomerative`
  at the model's calibrated threshold, the linkage the user chooses, cannot-link inside the
  merge loop.
- **hdbscan**: scikit-learn's HDBSCAN (Campello, Moulavi, Sander, PAKDD 2013) on the unit
  vectors with Euclidean distance (``‖a − b‖ = √(2 − 2 cos)``, so it orders pairs as cosine
  does), ``min_cluster_size = max(2, min_size)``, ``min_samples = 1`` (most people have few
  photos). It takes no threshold: the natural one, ``cluster_selection_epsilon = √(2 − 2t)``,
  crashes scikit-learn 1.9 with NumPy 2.x (scikit-learn issue #33219, "only 0-dimensional
  arrays can be converted to Python scalars"), so :func:`hdbscan_labels` accepts an
  ``epsilon`` for when that is fixed but the method does not pass one. HDBSCAN takes no
  constraints, so each of its clusters holding two faces of one photo is **split
  afterwards**: its members are re-clustered by constrained average linkage with no
  threshold (everything merges that may), which leaves the fewest groups the constraint
  allows. It builds a tree over all points: meant for collections up to ~50k faces.

A cluster smaller than ``min_size`` fits no cluster: its faces are *unclustered*
(label ``-1``).

**Assignment** (incremental runs): a new face ``x`` joins the existing cluster ``C`` with the
highest *score* when the score reaches the threshold and ``C`` holds no face of ``x``'s
photo. The score is the linkage of ``{x}`` and ``C`` — the very rule that merges clusters:
``mean_{c∈C} x·c`` (average; equal to ``x · ΣC / |C|``), ``max`` (single) or ``min``
(complete) — so a face joins a cluster exactly when a fresh agglomerative step would merge
it there. Faces of one photo are placed best score first, so they take different clusters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from facemetric.clustering.graph import (
    DEFAULT_NEIGHBOURS,
    LINKAGES,
    cannot_link_violations,
    constrained_agglomerative,
    photo_tokens,
    unit_float32,
)

METHODS = ("agglomerative", "hdbscan")
"""The clustering methods (module docstring)."""

DEFAULT_CLUSTER_FAR = 1e-3
"""The false-accept rate the clustering threshold is taken at when none is named."""


@dataclass(frozen=True)
class ClusterOptions:
    """How to cluster.

    Attributes:
        far: the false-accept rate whose calibrated threshold decides "same person".
        method: ``"agglomerative"`` or ``"hdbscan"``.
        linkage: ``"average"``, ``"single"`` or ``"complete"`` (agglomerative, and the score
            of assignment for both methods).
        min_size: clusters with fewer faces are reported as unclustered.
        neighbours: k of the k-NN graph (agglomerative).
    """

    far: float = DEFAULT_CLUSTER_FAR
    method: str = "agglomerative"
    linkage: str = "average"
    min_size: int = 2
    neighbours: int = DEFAULT_NEIGHBOURS

    def __post_init__(self) -> None:
        if not 0 < self.far < 1:
            raise ValueError(f"far must be in (0, 1), got {self.far}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if self.neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {self.neighbours}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClusterOptions:
        return cls(**{k: raw[k] for k in ("far", "method", "linkage", "min_size", "neighbours")
                      if k in raw})


@dataclass(frozen=True, eq=False)
class Clustering:
    """Labels ``(n,)`` (``-1``: unclustered), every face's group before the ``min_size``
    cut (``groups``, all ``>= 0``), and the cannot-link bookkeeping: ``refused`` merges the
    agglomerative loop turned down, ``split`` HDBSCAN clusters split afterwards and the
    same-photo pairs they held (``violations_split``)."""

    labels: np.ndarray
    groups: np.ndarray
    refused: int = 0
    split: int = 0
    violations_split: int = 0


def cluster_embeddings(
    embeddings: Any, threshold: float, photos: Any = None,
    options: ClusterOptions | None = None,
) -> Clustering:
    """Cluster ``(n, D)`` embeddings at cosine ``threshold`` with ``options`` (module
    docstring); ``photos (n,)`` ints name each face's photo (``-1`` / ``None``: no
    constraint)."""
    opts = options or ClusterOptions()
    x = unit_float32(embeddings)
    n = x.shape[0]
    tokens = photo_tokens(photos, n)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Clustering(empty, empty)
    if opts.method == "agglomerative":
        res = constrained_agglomerative(x, threshold, linkage=opts.linkage, photos=tokens,
                                        neighbours=opts.neighbours)
        return Clustering(_cut(res.labels, opts.min_size), res.labels, refused=res.refused)
    return _hdbscan(x, tokens, opts.min_size)


def _cut(groups: np.ndarray, min_size: int) -> np.ndarray:
    """``-1`` for the members of groups smaller than ``min_size``; the rest renumbered."""
    sizes = np.bincount(groups)
    keep = sizes[groups] >= min_size
    labels = np.full(groups.shape[0], -1, dtype=np.int64)
    if keep.any():
        _, labels[keep] = np.unique(groups[keep], return_inverse=True)
    return labels


def hdbscan_labels(x: np.ndarray, min_size: int, epsilon_threshold: float | None = None
                   ) -> np.ndarray:
    """scikit-learn HDBSCAN on unit rows (module docstring); ``-1`` for noise.
    ``epsilon_threshold``: a cosine whose Euclidean distance ``√(2 − 2t)`` becomes
    ``cluster_selection_epsilon`` (see the module docstring for why it is off)."""
    from sklearn.cluster import HDBSCAN

    if x.shape[0] < 2:
        return np.full(x.shape[0], -1, dtype=np.int64)
    eps = 0.0 if epsilon_threshold is None else float(
        np.sqrt(max(0.0, 2.0 - 2.0 * epsilon_threshold)))
    model = HDBSCAN(min_cluster_size=max(2, min_size), min_samples=1, metric="euclidean",
                    cluster_selection_epsilon=eps, copy=True)
    return model.fit(x.astype(np.float64)).labels_.astype(np.int64)


def split_cannot_link(x: np.ndarray, labels: np.ndarray, photos: np.ndarray
                      ) -> tuple[np.ndarray, int, int]:
    """Split every cluster of ``labels`` that holds two faces of one photo (module
    docstring). Returns ``(new labels, clusters split, same-photo pairs they held)``;
    ``-1`` stays ``-1``."""
    out = labels.copy()
    split = held = 0
    next_label = int(labels.max()) + 1 if labels.size else 0
    for c in np.unique(labels[labels >= 0]).tolist():
        members = np.flatnonzero(labels == c)
        bad = cannot_link_violations(np.zeros(members.size, np.int64), photos[members])
        if not bad:
            continue
        split += 1
        held += bad
        part = constrained_agglomerative(x[members], -1.0, linkage="average",
                                         photos=photos[members],
                                         neighbours=min(members.size - 1, 200)).labels
        out[members] = np.where(part == 0, c, next_label + part - 1)
        next_label += int(part.max())
    return out, split, held


def _hdbscan(x: np.ndarray, tokens: np.ndarray, min_size: int) -> Clustering:
    raw = hdbscan_labels(x, min_size)
    labels, split, held = split_cannot_link(x, raw, tokens)
    # noise points are their own groups; then the min_size cut applies to split parts too
    groups = labels.copy()
    noise = np.flatnonzero(groups < 0)
    groups[noise] = (int(groups.max()) + 1 if groups.size else 0) + np.arange(noise.size)
    groups = np.unique(groups, return_inverse=True)[1].reshape(-1)
    return Clustering(_cut(groups, min_size), groups, split=split, violations_split=held)


def member_scores(embeddings: Any, labels: Any) -> np.ndarray:
    """Each face's score to its cluster: the mean cosine to the cluster's *other* members,
    ``(x·ΣC − x·x) / (|C| − 1)``; NaN for faces alone (``labels`` ``-1`` or a cluster of
    one). ``O(n·D)``, no pair matrix."""
    x = unit_float32(embeddings).astype(np.float64)
    lab = np.asarray(labels, dtype=np.int64)
    out = np.full(x.shape[0], np.nan)
    keep = np.flatnonzero(lab >= 0)
    if keep.size == 0:
        return out
    ids, dense = np.unique(lab[keep], return_inverse=True)
    sums = np.zeros((ids.size, x.shape[1]))
    np.add.at(sums, dense, x[keep])
    sizes = np.bincount(dense)
    own = np.einsum("ij,ij->i", x[keep], x[keep])
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (np.einsum("ij,ij->i", x[keep], sums[dense]) - own) / (sizes[dense] - 1)
    out[keep] = np.where(sizes[dense] > 1, score, np.nan)
    return out


@dataclass(frozen=True, eq=False)
class Assignment:
    """``cluster (m,)``: the existing cluster each new face joins (``-1``: none), and its
    ``score`` to that cluster (NaN when none)."""

    cluster: np.ndarray
    score: np.ndarray


def assign_to_clusters(
    new: Any, new_photos: Any, members: Any, member_clusters: Any, member_photos: Any,
    threshold: float, linkage: str = "average", *, block_bytes: int = 64 * 2**20,
) -> Assignment:
    """Place new faces in existing clusters (module docstring).

    Args:
        new: ``(m, D)`` new faces; ``new_photos (m,)`` their photo ids.
        members: ``(n, D)`` faces already clustered; ``member_clusters (n,)`` their cluster
            ids (any non-negative ints); ``member_photos (n,)`` their photo ids.
        threshold: the calibrated cosine threshold.
        linkage: the score: ``average`` (mean cosine), ``single`` (max), ``complete`` (min).
        block_bytes: bound on one block of new × member scores.

    Memory: one ``(rows, n)`` float32 block of scores and one ``(rows, clusters)`` block.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    q = unit_float32(new, "new faces")
    m = q.shape[0]
    qp = photo_tokens(new_photos, m)
    cluster = np.full(m, -1, dtype=np.int64)
    score = np.full(m, np.nan)
    mem = np.asarray(members)
    if m == 0 or mem.shape[0] == 0:
        return Assignment(cluster, score)
    e = unit_float32(mem, "members")
    if e.shape[1] != q.shape[1]:
        raise ValueError(f"new faces have D = {q.shape[1]} but members D = {e.shape[1]}")
    ids, dense = np.unique(np.asarray(member_clusters, dtype=np.int64), return_inverse=True)
    dense = dense.reshape(-1)
    mp = photo_tokens(member_photos, e.shape[0])
    order = np.argsort(dense, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(dense[order]) != 0])
    sizes = np.bincount(dense).astype(np.float64)
    taken = {(int(p), int(c)) for p, c in zip(mp.tolist(), dense.tolist(), strict=True)
             if p >= 0}
    rows = max(1, block_bytes // (4 * (e.shape[0] + ids.size)))
    top = min(5, ids.size)
    cand_c = np.empty((m, top), dtype=np.int64)
    cand_s = np.empty((m, top))
    for s in range(0, m, rows):
        sims = (q[s : s + rows] @ e.T)[:, order].astype(np.float64)
        if linkage == "average":
            per = np.add.reduceat(sims, starts, axis=1) / sizes
        elif linkage == "single":
            per = np.maximum.reduceat(sims, starts, axis=1)
        else:
            per = np.minimum.reduceat(sims, starts, axis=1)
        best = np.argsort(-per, axis=1, kind="stable")[:, :top]
        cand_c[s : s + rows] = best
        cand_s[s : s + rows] = np.take_along_axis(per, best, axis=1)
    # best scores first, so the faces of one photo take different clusters
    flat = np.argsort(-cand_s, axis=None, kind="stable")
    for f, j in zip(*np.unravel_index(flat, cand_s.shape), strict=True):
        s_val = cand_s[f, j]
        if s_val < threshold:
            break
        if cluster[f] >= 0:
            continue
        c = int(cand_c[f, j])
        if qp[f] >= 0 and (int(qp[f]), c) in taken:
            continue
        cluster[f] = c
        score[f] = s_val
        if qp[f] >= 0:
            taken.add((int(qp[f]), c))
    hit = cluster >= 0
    cluster[hit] = ids[cluster[hit]]
    return Assignment(cluster, score)


__all__ = [
    "DEFAULT_CLUSTER_FAR",
    "METHODS",
    "Assignment",
    "ClusterOptions",
    "Clustering",
    "assign_to_clusters",
    "cluster_embeddings",
    "hdbscan_labels",
    "member_scores",
    "split_cannot_link",
]
