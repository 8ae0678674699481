"""Agglomerative clustering with cannot-link constraints on a sparse k-NN graph.

Faces are unit vectors compared by cosine similarity ``s(x, y) = x·y``. The similarity of
two clusters ``A`` and ``B`` is their *linkage*:

- ``single``:   ``max_{a∈A, b∈B} s(a, b)``
- ``complete``: ``min_{a∈A, b∈B} s(a, b)``
- ``average``:  ``(1 / |A||B|) Σ_{a∈A, b∈B} s(a, b) = (ΣA)·(ΣB) / (|A||B|)`` (UPGMA; the
  sum form needs only each cluster's vector sum, so no pair is ever stored for it).

Greedy merging (the classic agglomerative rule, e.g. Müllner 2011, "Modern hierarchical,
agglomerative clustering algorithms"): repeatedly merge the pair of clusters with the
highest linkage, while that linkage is ``>= threshold`` (a calibrated
:class:`~facemetric.inference.Threshold`'s value: the same rule as "same person"). A
**cannot-link** constraint (Wagstaff et al., ICML 2001) keeps two faces of one photo apart:
every cluster carries the set of *tokens* (photo ids) of its faces, and two clusters whose
token sets intersect never merge — the pair is dropped and the next best pair is taken.
Token sets only grow, so a forbidden pair stays forbidden for every later superset.

No ``n × n`` matrix: candidate pairs come from the k-NN table of
:func:`facemetric.index.knn.knn_table` (exact below 20k rows, IVF above), keeping only
pairs with ``s >= threshold``. Because a merge needs ``linkage >= threshold`` and each
linkage is at most the best cross pair, two clusters with no such pair can never merge; so
when ``k`` covers every neighbour above the threshold, the result equals exact
agglomerative clustering on the full matrix (scikit-learn's ``AgglomerativeClustering``
with ``distance_threshold = 1 − threshold``, which merges while the distance is below it).
With a smaller ``k`` single linkage may miss a chain and complete linkage is stricter
(a missing pair counts as ``−∞``); average linkage values stay exact (sums), only
candidate pairs can be missed.

Memory: the edge list (at most ``n·k`` pairs), one dict of neighbours per cluster, a heap
of candidate pairs (rebuilt from the live pairs whenever stale entries have doubled it),
and (average linkage) the ``n × D`` float64 cluster sums. Time:
``O(E log E)`` heap work plus ``O(deg · D)`` per average-linkage merge.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

LINKAGES = ("average", "single", "complete")
"""The linkages :func:`constrained_agglomerative` knows (module docstring)."""

DEFAULT_NEIGHBOURS = 30
"""k of the k-NN graph when the caller names none."""


@dataclass(frozen=True, eq=False)  # holds arrays
class Edges:
    """A sparse undirected similarity graph: pairs ``u[e] < v[e]`` with cosine ``sim[e]``
    (float64, recomputed from the vectors, not the float32 search scores)."""

    u: np.ndarray
    v: np.ndarray
    sim: np.ndarray

    def __len__(self) -> int:
        return int(self.u.shape[0])


@dataclass(frozen=True, eq=False)
class AgglomerativeResult:
    """Labels ``(n,)`` in ``0..C−1`` (order of first appearance), the number of merges
    done, and how many best-pair merges the cannot-link constraint refused."""

    labels: np.ndarray
    merges: int
    refused: int


def unit_float32(embeddings: Any, what: str = "embeddings") -> np.ndarray:
    """``(n, D)`` finite, non-zero rows as L2-normalised float32 (a copy only if needed).

    Raises:
        ValueError: not 2-D, empty rows, NaN/Inf or zero rows.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{what} must be an (n, D) array with D >= 1, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be floats, got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} hold NaN or Inf values: drop or re-embed those faces")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if x.shape[0] and norms.min() == 0:
        raise ValueError(f"{what} hold an all-zero row, which has no direction")
    if x.dtype == np.float32 and np.allclose(norms, 1.0, atol=1e-5):
        return x
    return (x / norms[:, None]).astype(np.float32)


def photo_tokens(photos: Any, n: int) -> np.ndarray:
    """Check ``photos``: ``(n,)`` ints, the photo each face comes from (``-1``: no
    constraint); ``None`` means no constraint at all."""
    if photos is None:
        return np.full(n, -1, dtype=np.int64)
    p = np.asarray(photos)
    if p.shape != (n,) or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"photos must be ({n},) integers (the photo of each face, -1 for "
                         f"none), got shape {p.shape} and dtype {p.dtype}")
    return p.astype(np.int64)


def cannot_link_violations(labels: Any, photos: Any) -> int:
    """Pairs of faces from one photo (``photos[i] == photos[j] >= 0``) placed in one
    cluster (``labels[i] == labels[j] >= 0``): ``Σ C(count, 2)`` over (photo, cluster)."""
    lab = np.asarray(labels, dtype=np.int64)
    ph = np.asarray(photos, dtype=np.int64)
    if lab.shape != ph.shape:
        raise ValueError(f"labels and photos differ in shape: {lab.shape} vs {ph.shape}")
    keep = (lab >= 0) & (ph >= 0)
    if not keep.any():
        return 0
    _, counts = np.unique(np.stack([ph[keep], lab[keep]]), axis=1, return_counts=True)
    return int(np.sum(counts * (counts - 1) // 2))


def knn_edges(
    x: np.ndarray, threshold: float, neighbours: int = DEFAULT_NEIGHBOURS,
    *, method: str = "auto", rows: np.ndarray | None = None,
) -> Edges:
    """The pairs among each row's ``neighbours`` nearest others (of ``rows``, default all)
    with cosine ``>= threshold``, deduplicated as ``u < v``.

    ``x`` must be unit float32 rows (:func:`unit_float32`); ``method`` is
    :func:`~facemetric.index.knn.knn_table`'s (``auto``: exact up to 20k rows).
    """
    import torch

    from facemetric.index.knn import knn_table

    n = x.shape[0]
    if neighbours < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    if n < 2:
        return Edges(*(np.zeros(0, np.int64),) * 2, np.zeros(0))
    query = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    table = knn_table(torch.from_numpy(x), min(neighbours, n - 1), rows=torch.from_numpy(query),
                      method=method)
    ids = table.ids.numpy()
    scores = table.scores.numpy()
    u = np.repeat(query, ids.shape[1])
    v = ids.reshape(-1)
    # float32 scores only preselect (a margin for rounding); sims are recomputed in float64
    keep = (v >= 0) & (scores.reshape(-1) >= threshold - 1e-4)
    u, v = u[keep], v[keep]
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    pairs = np.unique(np.stack([lo, hi]), axis=1) if lo.size else np.zeros((2, 0), np.int64)
    sim = _pair_sims(x, pairs[0], pairs[1])
    ok = sim >= threshold
    return Edges(pairs[0][ok], pairs[1][ok], sim[ok])


def _pair_sims(x: np.ndarray, u: np.ndarray, v: np.ndarray, block: int = 8192) -> np.ndarray:
    """``x[u[e]] · x[v[e]]`` in float64, a block of pairs at a time (two ``block × D``
    float64 gathers: 32 MiB at D = 256 — gathering all pairs at once took 4.4 GB for 1M)."""
    out = np.empty(u.shape[0])
    for s in range(0, u.shape[0], block):
        a = x[u[s : s + block]].astype(np.float64)
        b = x[v[s : s + block]].astype(np.float64)
        out[s : s + block] = np.einsum("ij,ij->i", a, b)
    return out


def constrained_agglomerative(
    embeddings: Any,
    threshold: float,
    *,
    linkage: str = "average",
    photos: Any = None,
    groups: Any = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    knn_method: str = "auto",
    edges: Edges | None = None,
) -> AgglomerativeResult:
    """Greedy agglomerative clustering with cannot-link constraints (module docstring).

    Args:
        embeddings: ``(n, D)`` floats (normalised here).
        threshold: merge while the best pair's linkage (cosine) is ``>= threshold``.
        linkage: ``"average"``, ``"single"`` or ``"complete"``.
        photos: ``(n,)`` ints, the photo of each face; two faces with the same value ``>= 0``
            never share a cluster. ``None``: no constraint.
        groups: ``(n,)`` ints: faces with the same value ``>= 0`` start as one cluster (an
            existing cluster), and two such starting clusters never merge with each other
            (so new faces can join at most one of them); ``-1`` = a face on its own.
        neighbours: k of the k-NN graph (ignored when ``edges`` is given).
        knn_method: ``"auto"``, ``"exact"`` or ``"ivf"`` (see
            :func:`~facemetric.index.knn.knn_table`).
        edges: a precomputed graph (:func:`knn_edges` with the same threshold).

    Raises:
        ValueError: bad shapes or values, an unknown linkage, or starting groups that
            already hold two faces of one photo.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine in [-1, 1], got {threshold}")
    x = unit_float32(embeddings)
    n = x.shape[0]
    tokens = photo_tokens(photos, n)
    if groups is None:
        g = np.full(n, -1, dtype=np.int64)
    else:
        g = np.asarray(groups)
        if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"groups must be ({n},) integers (-1: no group), got {g.shape} "
                             f"{g.dtype}")
        g = g.astype(np.int64)
        if cannot_link_violations(np.where(g >= 0, g, -1), tokens):
            raise ValueError("two faces of one photo are in one starting group: split that "
                             "cluster first")
    if n == 0:
        return AgglomerativeResult(np.zeros(0, np.int64), 0, 0)
    if edges is None:
        edges = knn_edges(x, threshold, neighbours, method=knn_method)
    node = _start_nodes(g)
    loop = _MergeLoop(x, node, tokens, g, linkage, threshold)
    loop.add_edges(edges)
    loop.run()
    return AgglomerativeResult(_first_appearance(loop.root_of_faces()), loop.merges, loop.refused)


def _start_nodes(groups: np.ndarray) -> np.ndarray:
    """A starting cluster per face: its group's (one per group) or its own."""
    n = groups.shape[0]
    node = np.arange(n, dtype=np.int64)
    grouped = np.flatnonzero(groups >= 0)
    if grouped.size:
        _, first = np.unique(groups[grouped], return_index=True)
        _, inverse = np.unique(groups[grouped], return_inverse=True)
        node[grouped] = grouped[first][inverse]
    return node


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.shape[0])
    return rank[inverse.reshape(-1)]


_FROZEN = -2  # the token every starting group carries: two of them never merge


class _MergeLoop:
    """The merge loop over clusters named by one of their faces (``node``).

    ``adj[a]`` maps each neighbouring cluster to the linkage (only values ``>= threshold``
    are kept: a pair below it can only become mergeable through a third cluster that has
    its own edge, and then the union of neighbour sets brings it back). The heap holds
    ``(−linkage, a, b)``; an entry is live while both clusters exist and ``adj[a][b]`` still
    equals its linkage.
    """

    def __init__(self, x: np.ndarray, node: np.ndarray, tokens: np.ndarray, groups: np.ndarray,
                 linkage: str, threshold: float) -> None:
        self.x, self.node, self.linkage, self.threshold = x, node, linkage, float(threshold)
        n = x.shape[0]
        self.size = np.bincount(node, minlength=n).astype(np.int64)
        self.tokens: dict[int, set[int]] = {}
        for face in np.flatnonzero(tokens >= 0):
            self.tokens.setdefault(int(node[face]), set()).add(int(tokens[face]))
        for face in np.flatnonzero(groups >= 0):
            self.tokens.setdefault(int(node[face]), set()).add(_FROZEN)
        self.sums: np.ndarray | None = None
        if linkage == "average":
            self.sums = x.astype(np.float64)  # each face's own vector, summed into its root
            moved = np.flatnonzero(node != np.arange(n))
            if moved.size:
                np.add.at(self.sums, node[moved], self.sums[moved])
                self.sums[moved] = 0.0
        self.adj: dict[int, dict[int, float]] = {}
        self.heap: list[tuple[float, int, int]] = []
        self.parent = np.arange(n, dtype=np.int64)
        self.merges = 0
        self.refused = 0

    def _linkage_to(self, a: int, others: np.ndarray) -> np.ndarray:
        assert self.sums is not None
        return (self.sums[others] @ self.sums[a]) / (self.size[others] * self.size[a])

    def add_edges(self, edges: Edges) -> None:
        """Face pairs → starting-cluster pairs, reduced by the linkage."""
        a, b = self.node[edges.u], self.node[edges.v]
        sim = edges.sim
        keep = a != b
        a, b, sim = a[keep], b[keep], sim[keep]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        if lo.size == 0:
            return
        pairs, inverse, counts = np.unique(np.stack([lo, hi]), axis=1, return_inverse=True,
                                           return_counts=True)
        inverse = inverse.reshape(-1)
        pu, pv = pairs[0], pairs[1]
        if self.linkage == "average":
            assert self.sums is not None
            value = _pair_sims(self.sums, pu, pv) / (self.size[pu] * self.size[pv])
        elif self.linkage == "single":
            value = np.full(pu.shape[0], -np.inf)
            np.maximum.at(value, inverse, sim)
        else:  # complete: every cross pair must be a known edge
            value = np.full(pu.shape[0], np.inf)
            np.minimum.at(value, inverse, sim)
            value[counts < self.size[pu] * self.size[pv]] = -np.inf
        ok = value >= self.threshold
        for u, v, s in zip(pu[ok].tolist(), pv[ok].tolist(), value[ok].tolist(), strict=True):
            self.adj.setdefault(u, {})[v] = s
            self.adj.setdefault(v, {})[u] = s
            self.heap.append((-s, u, v))
        heapq.heapify(self.heap)

    def _conflict(self, a: int, b: int) -> bool:
        ta, tb = self.tokens.get(a), self.tokens.get(b)
        if not ta or not tb:
            return False
        small, large = (ta, tb) if len(ta) <= len(tb) else (tb, ta)
        return any(t in large for t in small)

    def _drop(self, a: int, b: int) -> None:
        self.adj[a].pop(b, None)
        self.adj[b].pop(a, None)

    def run(self) -> None:
        adj = self.adj
        limit = self._compact_limit()
        while self.heap:
            neg, a, b = heapq.heappop(self.heap)
            if adj.get(a, {}).get(b) != -neg:
                continue  # stale: a or b merged since, or the linkage changed
            if self._conflict(a, b):
                self.refused += 1
                self._drop(a, b)
                continue
            self._merge(a, b)
            if len(self.heap) > limit:
                self._compact()
                limit = self._compact_limit()

    def _compact_limit(self) -> int:
        return 2 * len(self.heap) + 100_000

    def _compact(self) -> None:
        """Rebuild the heap from the live pairs: stale entries (every rescored neighbour of
        every merge leaves one) would otherwise grow it without bound — measured 5 GB at
        100k faces with 1M edges before this."""
        self.heap = [(-s, a, c) for a, row in self.adj.items() for c, s in row.items() if a < c]
        heapq.heapify(self.heap)

    def _merge(self, a: int, b: int) -> None:
        """Merge ``b`` into ``a`` (the one with more neighbours survives). Single linkage
        touches only ``b``'s neighbours (``max`` leaves ``a``'s other values as they are);
        complete linkage keeps only common neighbours (a missing pair is ``−∞``); average
        linkage rescores every neighbour from the new sum."""
        adj = self.adj
        if len(adj[a]) < len(adj[b]):
            a, b = b, a
        na, nb = adj[a], adj.pop(b)
        na.pop(b, None)
        nb.pop(a, None)
        self._merge_tokens(a, b)
        for c in nb:
            del adj[c][b]
        self.size[a] += self.size[b]
        self.parent[b] = a
        self.merges += 1
        if self.linkage == "single":
            for c, s in nb.items():
                old = na.get(c)
                if old is None or s > old:
                    na[c] = s
                    adj[c][a] = s
                    self._push(s, a, c)
            return
        if self.linkage == "complete":
            small, large = (na, nb) if len(na) <= len(nb) else (nb, na)
            new = {c: min(s, large[c]) for c, s in small.items() if c in large}
            for c in na:
                if c not in new:
                    del adj[c][a]
            for c, s in new.items():
                adj[c][a] = s
                if s != na.get(c):
                    self._push(s, a, c)
            adj[a] = new
            return
        assert self.sums is not None
        self.sums[a] += self.sums[b]
        around = set(na) | set(nb)
        if not around:
            return
        others = np.fromiter(around, dtype=np.int64, count=len(around))
        values = self._linkage_to(a, others).tolist()
        new = {}
        for c, s in zip(others.tolist(), values, strict=True):
            if s >= self.threshold:
                new[c] = s
                adj[c][a] = s
                self._push(s, a, c)
            else:
                adj[c].pop(a, None)
        adj[a] = new

    def _push(self, s: float, a: int, c: int) -> None:
        heapq.heappush(self.heap, (-s, a, c) if a < c else (-s, c, a))

    def _merge_tokens(self, a: int, b: int) -> None:
        tb = self.tokens.pop(b, None)
        if not tb:
            return
        ta = self.tokens.get(a)
        if ta is None:
            self.tokens[a] = tb
        elif len(ta) < len(tb):
            tb |= ta
            self.tokens[a] = tb
        else:
            ta |= tb

    def root_of_faces(self) -> np.ndarray:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        return parent[self.node]


__all__ = [
    "DEFAULT_NEIGHBOURS",
    "LINKAGES",
    "AgglomerativeResult",
    "Edges",
    "cannot_link_violations",
    "constrained_agglomerative",
    "knn_edges",
    "photo_tokens",
    "unit_float32",
]
