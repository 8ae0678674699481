"""Retrieval post-processing: query expansion, database-side augmentation and k-reciprocal
re-ranking of a query's shortlist — what won the metric-learning retrieval competitions
(Humpback Whale, Google Landmarks, Shopee).

The pieces
----------
A search first gives each query its **shortlist**: the ``K`` database vectors of highest
cosine ``q̂ · x̂`` (:class:`Shortlist`: rows, ordering score, cosine). A :class:`Refiner`
reorders that shortlist; :class:`PostProcessing` composes an optional
:class:`DatabaseAugmentation` with any refiners and runs them block by block. Vectors come
from a :class:`Database` (``vectors(rows)`` and ``search(vectors, k)``): a matrix
(:class:`MatrixDatabase`) or a gallery's :class:`~facemetric.index.TemplateIndex`
(:class:`TemplateDatabase`, rows are template ids).

- :class:`AverageQueryExpansion` (Chum, Philbin, Sivic, Isard, Zisserman, *Total Recall*,
  ICCV 2007): ``q' = normalise(q̂ + Σ_{i≤k} x̂_i)`` over the first ``k`` of the shortlist.
- :class:`AlphaQueryExpansion` (Radenović, Tolias, Chum, *Fine-tuning CNN Image Retrieval
  with No Human Annotation*, TPAMI 2018): ``q' = normalise(q̂ + Σ_{i≤k} max(0, q̂·x̂_i)^α x̂_i)``.
- :class:`DatabaseAugmentation` (Arandjelović & Zisserman, *Three things everyone should
  know to improve object retrieval*, CVPR 2012; weighted as in Gordo, Almazán, Revaud,
  Larlus, *End-to-end Learning of Deep Visual Representations for Image Retrieval*, IJCV
  2017): every database vector becomes ``x̃ = normalise(Σ_{j ∈ N_k(x)} max(0, x̂·x̂_j)^α x̂_j)``,
  ``N_k(x)`` its ``k`` nearest database vectors (itself included, weight 1).
- :class:`KReciprocalReranking` (Zhong, Zheng, Cao, Li, *Re-ranking Person Re-identification
  with k-reciprocal Encoding*, CVPR 2017): Jaccard distance of k-reciprocal neighbourhoods
  mixed with the original distance, ``d* = (1 − λ)·d_J + λ·d``.

After QE the shortlist is rescored with ``q'``; after DBA with the augmented vectors
``q̂ · x̃``; the re-ranking orders by ``−d*``. **The cosine is kept:** every
:class:`Shortlist` carries the original ``q̂ · x̂`` of each row next to the ordering score,
so a calibrated threshold (a cosine) still applies to whatever a refiner put first.

Only the shortlist is reordered: rows outside the first ``K`` by cosine are never brought
in, so ``K`` (``PostProcessing.shortlist_size``) bounds both the gain and the cost.

Memory: :meth:`PostProcessing.apply` handles ``block = max(1, max_block_bytes //
bytes_per_query)`` queries at a time, where each step states its ``bytes_per_query(K, D)``
(QE and DBA: the ``K × D`` shortlist vectors, DBA also ``k × D`` per row augmented;
re-ranking: a few ``(K+1)²`` matrices). No ``N × N`` matrix is ever formed; database
neighbours come from blocked exact top-``k`` searches (:class:`MatrixDatabase`) or the
index's own search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facemetric.index._search import DEFAULT_BLOCK_BYTES, as_matrix, exact_topk, tensor_rows

if TYPE_CHECKING:
    from facemetric.index.templates import TemplateIndex

_UNIT_TOL = 1e-3


class Shortlist(NamedTuple):
    """A query batch's shortlists, best first.

    ``rows (Q, K)`` int64 database rows (``-1``: none), ``scores (Q, K)`` the ordering score
    (higher first; ``-inf`` for none) and ``cosine (Q, K)`` the original ``q̂ · x̂`` of each
    row (``-inf`` for none) — the value a calibrated threshold applies to.
    """

    rows: Tensor
    scores: Tensor
    cosine: Tensor


@runtime_checkable
class Database(Protocol):
    """The vectors a shortlist points into."""

    def vectors(self, rows: Tensor) -> Tensor:
        """Unit float32 vectors ``(m, D)`` of ``rows (m,)`` (all valid, ``>= 0``)."""
        ...

    def search(self, vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(cosines, rows)``, both ``(m, k')``, of the ``k`` database vectors nearest each
        of ``vectors (m, D)``, best first (``-inf`` / ``-1`` pads)."""
        ...


@runtime_checkable
class Refiner(Protocol):
    """Reorders shortlists; ``bytes_per_query`` states its working memory per query."""

    def refine(self, queries: Tensor, shortlist: Shortlist, database: Database) -> Shortlist:
        """The shortlist of unit ``queries (Q, D)`` reordered (same rows, same cosines)."""
        ...

    def bytes_per_query(self, k: int, dim: int) -> int:
        """Bytes this step holds per query for a shortlist of ``k`` rows of ``dim`` floats."""
        ...


# ---------------------------------------------------------------------------- databases


class MatrixDatabase:
    """A database held as one matrix ``(N, D)`` (rows are L2-normalised here).

    :meth:`search` is an exact blocked top-``k`` (one block of scores at most
    ``max_block_bytes``); ``exclude`` in :meth:`shortlist` leaves each query's own row out
    (a set searched against itself).
    """

    def __init__(self, matrix: Tensor | np.ndarray, *,
                 max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        x = as_matrix(matrix, None, "database vectors")
        if x.shape[0] == 0:
            raise ValueError("the database is empty: give at least one vector")
        norms = torch.linalg.vector_norm(x, dim=1)
        if bool((norms == 0).any()):
            raise ValueError(f"{int((norms == 0).sum())} database vectors are all zeros; "
                             "drop them (they have no direction)")
        self.matrix = (x / norms.unsqueeze(1)).contiguous()
        self.max_block_bytes = int(max_block_bytes)

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def vectors(self, rows: Tensor) -> Tensor:
        return self.matrix.index_select(0, rows)

    def search(self, vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
        v = vectors.to(torch.float32).contiguous()
        return exact_topk(tensor_rows(v), v.shape[0], tensor_rows(self.matrix), len(self), k,
                          dim=self.matrix.shape[1], base_copies=False,
                          max_block_bytes=self.max_block_bytes)

    def shortlist(self, queries: Tensor | np.ndarray, k: int,
                  exclude: Tensor | None = None) -> Shortlist:
        """The ``k`` rows of highest cosine to each of ``queries (Q, D)``; ``exclude (Q,)``:
        a row to leave out per query (``-1``: none)."""
        q = _unit_queries(queries, self.matrix.shape[1])
        if k < 1:
            raise ValueError(f"the shortlist size k must be >= 1, got {k}")
        cos, rows = exact_topk(tensor_rows(q), q.shape[0], tensor_rows(self.matrix), len(self),
                               k, dim=q.shape[1], base_copies=False,
                               max_block_bytes=self.max_block_bytes, self_rows=exclude)
        return Shortlist(rows, cos.clone(), cos)


class TemplateDatabase:
    """A gallery's :class:`~facemetric.index.TemplateIndex`; rows are template ids."""

    def __init__(self, index: TemplateIndex) -> None:
        self.index = index

    def vectors(self, rows: Tensor) -> Tensor:
        return self.index.vectors(rows)

    def search(self, vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
        hits = self.index.search(vectors, k)
        return hits.scores, hits.ids

    def shortlist(self, queries: Tensor | np.ndarray, k: int) -> Shortlist:
        """The ``k`` templates of highest cosine to each query (template ids)."""
        hits = self.index.search(queries, k)
        return Shortlist(hits.ids, hits.scores.clone(), hits.scores)


# ---------------------------------------------------------------------------- helpers


def _unit_queries(queries: Tensor | np.ndarray, dim: int | None) -> Tensor:
    q = as_matrix(queries, dim, "queries")
    norms = torch.linalg.vector_norm(q, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("some queries are all zeros and cannot be L2-normalised; drop them")
    return q / norms


def _gather(database: Database, rows: Tensor, dim: int) -> Tensor:
    """Vectors ``(*rows.shape, D)`` of ``rows`` (zeros where ``-1``), each distinct row
    fetched once."""
    out = torch.zeros(rows.numel(), dim)
    flat = rows.reshape(-1)
    valid = flat >= 0
    if bool(valid.any()):
        distinct, inverse = torch.unique(flat[valid], return_inverse=True)
        out[valid] = database.vectors(distinct).to(torch.float32)[inverse]
    return out.view(*rows.shape, dim)


def _reorder(shortlist: Shortlist, scores: Tensor) -> Shortlist:
    """``shortlist`` sorted by ``scores`` (descending, stable; empty slots last)."""
    scores = scores.to(torch.float32).masked_fill(shortlist.rows < 0, -math.inf)
    new, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return Shortlist(torch.gather(shortlist.rows, 1, order), new,
                     torch.gather(shortlist.cosine, 1, order))


def _check_k(name: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")


def _check_alpha(alpha: float) -> None:
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _power_weights(sims: Tensor, alpha: float) -> Tensor:
    """``max(0, s)^α`` (``α = 0``: every weight 1, negative similarities included)."""
    if alpha == 0:
        return torch.ones_like(sims)
    return sims.clamp_min(0).pow(alpha)


# ---------------------------------------------------------------------------- query expansion


@dataclass(frozen=True)
class AlphaQueryExpansion:
    """αQE (Radenović, Tolias, Chum, TPAMI 2018).

    With the first ``k`` rows ``x̂_1..x̂_k`` of the current shortlist order,
    ``q' = normalise(q̂ + Σ_{i≤k} w_i x̂_i)``, ``w_i = max(0, q̂·x̂_i)^α`` (the query's own
    weight is ``1^α = 1``); each shortlisted row is then scored ``q' · x̂``. ``α = 0`` is
    average query expansion. Memory per query: the ``K × D`` shortlist vectors.
    """

    k: int = 2
    alpha: float = 3.0

    def __post_init__(self) -> None:
        _check_k("k", self.k)
        _check_alpha(self.alpha)

    def refine(self, queries: Tensor, shortlist: Shortlist, database: Database) -> Shortlist:
        dim = queries.shape[1]
        vecs = _gather(database, shortlist.rows, dim)  # (Q, K, D)
        sims = torch.bmm(vecs, queries.unsqueeze(2)).squeeze(2)  # (Q, K)
        top = min(self.k, shortlist.rows.shape[1])
        w = _power_weights(sims[:, :top], self.alpha) * (shortlist.rows[:, :top] >= 0)
        expanded = F.normalize(queries + torch.bmm(w.unsqueeze(1), vecs[:, :top]).squeeze(1),
                               dim=1)
        return _reorder(shortlist, torch.bmm(vecs, expanded.unsqueeze(2)).squeeze(2))

    def bytes_per_query(self, k: int, dim: int) -> int:
        return 4 * (k * dim + 4 * k + 2 * dim)


@dataclass(frozen=True)
class AverageQueryExpansion:
    """Average query expansion (Chum et al., *Total Recall*, ICCV 2007):
    ``q' = normalise(q̂ + Σ_{i≤k} x̂_i)`` over the first ``k`` rows of the shortlist; the
    shortlist is rescored ``q' · x̂`` (it is :class:`AlphaQueryExpansion` with ``α = 0``)."""

    k: int = 2

    def __post_init__(self) -> None:
        _check_k("k", self.k)

    def refine(self, queries: Tensor, shortlist: Shortlist, database: Database) -> Shortlist:
        return AlphaQueryExpansion(self.k, 0.0).refine(queries, shortlist, database)

    def bytes_per_query(self, k: int, dim: int) -> int:
        return AlphaQueryExpansion(self.k, 0.0).bytes_per_query(k, dim)


# ---------------------------------------------------------------------------- DBA


@dataclass(frozen=True)
class DatabaseAugmentation:
    """DBA (Arandjelović & Zisserman, CVPR 2012; α-weighted as Gordo et al., IJCV 2017).

    ``x̃ = normalise(Σ_{j ∈ N_k(x)} max(0, x̂·x̂_j)^α x̂_j)`` with ``N_k(x)`` the ``k`` nearest
    database vectors of ``x``, itself included (``k = 1`` leaves ``x`` unchanged; ``α = 0``
    is the plain average). :meth:`augment` wraps a database so that ``vectors(rows)``
    returns ``x̃`` — computed on demand for the rows asked (a search of ``k`` neighbours
    each), so it always follows a gallery that changes; :meth:`transform` augments a whole
    matrix at once. Its ``search`` still ranks by the original vectors.
    """

    k: int = 2
    alpha: float = 3.0

    def __post_init__(self) -> None:
        _check_k("k", self.k)
        _check_alpha(self.alpha)

    def augment(self, database: Database) -> AugmentedDatabase:
        return AugmentedDatabase(database, self)

    def transform(self, matrix: Tensor | np.ndarray, *,
                  max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Tensor:
        """The augmented ``(N, D)`` of a whole matrix, ``max_block_bytes`` at a time."""
        db = MatrixDatabase(matrix, max_block_bytes=max_block_bytes)
        aug = self.augment(db)
        n, dim = db.matrix.shape
        step = max(1, max_block_bytes // max(1, 4 * dim * (self.k + 1)))
        return torch.cat([aug.vectors(torch.arange(a, min(n, a + step)))
                          for a in range(0, n, step)])

    def bytes_per_query(self, k: int, dim: int) -> int:
        return 4 * (k * dim * (self.k + 2) + 4 * k * self.k)


class AugmentedDatabase:
    """A :class:`Database` whose ``vectors`` are DBA's ``x̃`` (search: the original)."""

    def __init__(self, base: Database, augmentation: DatabaseAugmentation) -> None:
        self.base, self.augmentation = base, augmentation

    def vectors(self, rows: Tensor) -> Tensor:
        x = self.base.vectors(rows).to(torch.float32)
        if self.augmentation.k == 1 or x.shape[0] == 0:
            return x
        sims, nb = self.base.search(x, self.augmentation.k)
        w = _power_weights(sims.clamp_min(-1.0), self.augmentation.alpha) * (nb >= 0)
        neighbours = _gather(self.base, nb, x.shape[1])  # (m, k, D)
        return F.normalize(torch.bmm(w.unsqueeze(1), neighbours).squeeze(1), dim=1)

    def search(self, vectors: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.base.search(vectors, k)


# ---------------------------------------------------------------------------- k-reciprocal


@dataclass(frozen=True)
class KReciprocalReranking:
    """k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017) within each shortlist.

    For a query ``q`` with shortlist ``x_1..x_K`` the universe is ``U = {q, x_1..x_K}``
    (each query on its own: its answer never depends on the other queries of a batch) with
    the original distance ``d(a, b) = ‖â − b̂‖² = 2 − 2 â·b̂``.

    - ``N(a, k)``: ``a`` and its ``k`` nearest in ``U``; ``R(a, k) = {b ∈ N(a, k) : a ∈
      N(b, k)}`` (k-reciprocal).
    - ``R*(a) = R(a, k1) ∪ R(c, ⌊k1/2⌉)`` for every ``c ∈ R(a, k1)`` with
      ``|R(a, k1) ∩ R(c, ⌊k1/2⌉)| > ⅔ |R(c, ⌊k1/2⌉)|`` (the ½-expansion).
    - ``V_a[b] = exp(−d(a, b)) / Σ_{b' ∈ R*(a)} exp(−d(a, b'))`` for ``b ∈ R*(a)``, else 0.
    - Local query expansion: ``V_a ← mean_{b ∈ N(a, k2−1)} V_b`` (the ``k2`` nearest, ``a``
      included; ``k2 = 1`` skips it).
    - ``d_J(q, x) = 1 − Σ min(V_q, V_x) / Σ max(V_q, V_x)``, and since both sum to 1,
      ``= 1 − m / (2 − m)`` with ``m = Σ min(V_q, V_x)``.
    - ``d*(q, x) = (1 − λ)·d_J(q, x) + λ·d(q, x)``; the shortlist is ordered by ``−d*``.

    Defaults are the paper's ``k1 = 20, k2 = 6, λ = 0.3``. Memory per query: about sixteen
    ``(K+1)²`` float32 matrices (``K = 100``: 0.65 MB). Ties in distance are broken by
    shortlist position.
    """

    k1: int = 20
    k2: int = 6
    lam: float = 0.3

    def __post_init__(self) -> None:
        _check_k("k1", self.k1)
        _check_k("k2", self.k2)
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam (λ) must lie in [0, 1], got {self.lam!r}")

    def refine(self, queries: Tensor, shortlist: Shortlist, database: Database) -> Shortlist:
        n_q, k = shortlist.rows.shape
        if k == 0:
            return shortlist
        dim = queries.shape[1]
        universe = torch.cat([queries.unsqueeze(1), _gather(database, shortlist.rows, dim)],
                             dim=1)  # (Q, n, D), n = K + 1
        valid = torch.cat([torch.ones(n_q, 1, dtype=torch.bool), shortlist.rows >= 0], dim=1)
        dist = (2 - 2 * torch.bmm(universe, universe.transpose(1, 2))).clamp_min_(0)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        dist = dist.masked_fill_(~valid.unsqueeze(1), math.inf)
        order = torch.argsort(dist, dim=2, stable=True)
        n = k + 1
        pos = torch.empty_like(order).scatter_(
            2, order, torch.arange(n).expand(n_q, n, n).contiguous())
        near = (pos <= self.k1) & pair
        reciprocal = near & near.transpose(1, 2)
        half = (pos <= round(self.k1 / 2)) & pair
        half_rec = (half & half.transpose(1, 2)).float()
        overlap = torch.bmm(reciprocal.float(), half_rec.transpose(1, 2))  # |R(a) ∩ R_h(c)|
        size = half_rec.sum(dim=2).unsqueeze(1)  # |R_h(c)|
        accept = reciprocal & (overlap > size * (2.0 / 3.0))
        expanded = reciprocal | (torch.bmm(accept.float(), half_rec) > 0)
        weight = torch.exp(-dist).masked_fill_(~expanded, 0.0)
        v = weight / weight.sum(dim=2, keepdim=True).clamp_min(1e-30)
        if self.k2 > 1:
            qe = ((pos < self.k2) & pair).float()
            v = torch.bmm(qe, v) / qe.sum(dim=2, keepdim=True).clamp_min(1.0)
        m = torch.minimum(v[:, :1, :], v[:, 1:, :]).sum(dim=2)  # (Q, K)
        jaccard = 1 - m / (2 - m)
        final = (1 - self.lam) * jaccard + self.lam * dist[:, 0, 1:]
        return _reorder(shortlist, -final)

    def bytes_per_query(self, k: int, dim: int) -> int:
        return 4 * ((k + 1) * dim + 16 * (k + 1) ** 2)


# ---------------------------------------------------------------------------- composition


@dataclass(frozen=True)
class PostProcessing:
    """Optional DBA, then refiners in order, on shortlists of ``shortlist_size``.

    ``PostProcessing()`` changes nothing; ``PostProcessing((AlphaQueryExpansion(),),
    augmentation=DatabaseAugmentation())`` is DBA + αQE. With ``augmentation`` the
    shortlist is first rescored ``q̂ · x̃`` and the refiners see the augmented vectors.
    Queries go ``max(1, max_block_bytes // Σ bytes_per_query)`` at a time (module docstring).
    """

    refiners: tuple[Refiner, ...] = ()
    augmentation: DatabaseAugmentation | None = None
    shortlist_size: int = 100
    max_block_bytes: int = DEFAULT_BLOCK_BYTES

    def __post_init__(self) -> None:
        _check_k("shortlist_size", self.shortlist_size)
        if self.max_block_bytes < 1:
            raise ValueError(f"max_block_bytes must be >= 1, got {self.max_block_bytes}")
        for r in self.refiners:
            if not isinstance(r, Refiner):
                raise ValueError(f"{r!r} is not a refiner (it needs refine() and "
                                 "bytes_per_query())")

    @property
    def identity(self) -> bool:
        """Whether this post-processing leaves every shortlist as it is."""
        return not self.refiners and self.augmentation is None

    def block_queries(self, k: int, dim: int) -> int:
        """Queries handled at once for shortlists of ``k`` rows of ``dim`` floats."""
        steps: list[Refiner] = list(self.refiners)
        per = 4 * k * (3 + dim) + sum(s.bytes_per_query(k, dim) for s in steps)
        if self.augmentation is not None:
            per += self.augmentation.bytes_per_query(k, dim)
        return max(1, self.max_block_bytes // per)

    def apply(self, queries: Tensor | np.ndarray, shortlist: Shortlist,
              database: Database) -> Shortlist:
        """Refined shortlists of ``queries (Q, D)`` (normalised here).

        Raises:
            ValueError: queries with NaN/Inf or zero rows, or a shortlist of another shape.
        """
        rows = shortlist.rows
        if rows.dim() != 2 or shortlist.scores.shape != rows.shape or (
                shortlist.cosine.shape != rows.shape):
            raise ValueError("shortlist rows, scores and cosine must share one (Q, K) shape")
        q = _unit_queries(queries, None)
        if q.shape[0] != rows.shape[0]:
            raise ValueError(f"got {q.shape[0]} queries for {rows.shape[0]} shortlists")
        if self.identity or rows.shape[1] == 0:
            return shortlist
        db = database if self.augmentation is None else self.augmentation.augment(database)
        step = self.block_queries(rows.shape[1], q.shape[1])
        parts: list[Shortlist] = []
        for a in range(0, q.shape[0], step):
            qb = q[a:a + step]
            sl = Shortlist(rows[a:a + step], shortlist.scores[a:a + step],
                           shortlist.cosine[a:a + step])
            if self.augmentation is not None:
                vecs = _gather(db, sl.rows, q.shape[1])
                sl = _reorder(sl, torch.bmm(vecs, qb.unsqueeze(2)).squeeze(2))
            for refiner in self.refiners:
                sl = refiner.refine(qb, sl, db)
            parts.append(sl)
        return Shortlist(*(torch.cat(t) for t in zip(*parts, strict=True)))

    def apply_to_matrix(self, queries: Tensor | np.ndarray, references: Tensor | np.ndarray,
                        shortlist: Shortlist) -> Shortlist:
        """:meth:`apply` with the references given as a matrix ``(N, D)``."""
        return self.apply(queries, shortlist,
                          MatrixDatabase(references, max_block_bytes=self.max_block_bytes))


__all__ = [
    "AlphaQueryExpansion",
    "AugmentedDatabase",
    "AverageQueryExpansion",
    "Database",
    "DatabaseAugmentation",
    "KReciprocalReranking",
    "MatrixDatabase",
    "PostProcessing",
    "Refiner",
    "Shortlist",
    "TemplateDatabase",
]
