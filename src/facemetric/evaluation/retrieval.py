"""Retrieval metrics from labelled embeddings: precision@1, R-precision, MAP@R, recall@k.

Definitions (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020)
----------------------------------------------------------------------------------
For a query ``q`` let ``R`` be the number of references sharing its label (the query itself
excluded when queries and references are one set) and rank the references by decreasing
similarity. With ``rel(i) = 1`` when the i-th neighbour shares the label:

- precision@1  = ``rel(1)``;
- R-precision  = ``(1/R) Σ_{i≤R} rel(i)``;
- MAP@R        = ``(1/R) Σ_{i≤R} rel(i) · P(i)`` with ``P(i) = (1/i) Σ_{j≤i} rel(j)``;
- recall@k     = 1 when at least one of the ``k`` nearest neighbours shares the label
  (the "Recall@K" of the deep-metric-learning literature, e.g. Song et al. 2016 — a hit
  rate, not the fraction of the ``R`` relevant items found).

Each is averaged over the queries with ``R ≥ 1``; queries with ``R = 0`` are skipped and
counted in ``num_skipped``.

Memory: similarities are cosine (``normalize=True``) or raw inner products (float32, or
float64 for float64 inputs), computed for a block of queries at a time and reduced with
``torch.topk`` to the ``max(R, k)`` nearest references of each query, so no ``N × N``
matrix ever exists: ``max_block_bytes`` bounds one block's ``(block, num_references)``
similarities plus the work arrays of its neighbours. The order of references with equal
similarity is whatever ``torch.topk`` returns.

mAP (:func:`mean_average_precision`) ranks *every* reference: ``AP = (1/R) Σ_{i: rel(i)}
P(i)`` over all ``R`` relevant references (each query block is fully sorted, so it costs an
``N log N`` sort per query where the metrics above need a top-``k``).

Post-processing (``postprocess=``, a :class:`facemetric.index.PostProcessing`): each query's
first ``K = shortlist_size`` references by cosine are reordered by it (query
expansion, database-side augmentation, k-reciprocal re-ranking); references beyond the
shortlist keep their cosine order behind it. It needs cosine similarity
(``normalize=True``); database-side augmentation needs separate references (augmenting a set
searched against itself would mix each query into its neighbours' vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from facemetric.evaluation._arrays import (
    check_embeddings,
    normalize_rows,
    rows_per_block,
    to_numpy,
)

if TYPE_CHECKING:
    from facemetric.index.rerank import PostProcessing

_DEFAULT_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RetrievalReport:
    """Means over the ``num_queries`` queries that have at least one relevant reference."""

    precision_at_1: float
    r_precision: float
    map_at_r: float
    recall_at_k: dict[int, float]
    num_queries: int
    num_skipped: int


def retrieval_metrics(
    queries: Any,
    query_labels: Any,
    references: Any | None = None,
    reference_labels: Any | None = None,
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    normalize: bool = True,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
    postprocess: PostProcessing | None = None,
) -> RetrievalReport:
    """Precision@1, R-precision, MAP@R and recall@k of ``queries`` ``(N, D)``.

    Args:
        queries, query_labels: ``(N, D)`` embeddings and ``(N,)`` labels.
        references, reference_labels: a separate ``(M, D)`` database; when omitted the
            queries are searched among themselves, each query excluded from its own results.
        recall_ks: the ``k`` values of recall@k.
        normalize: cosine similarity (``True``) or inner product of the raw embeddings.
        max_block_bytes: memory bound of one query block's similarity matrix.
        postprocess: reorders each query's shortlist before the metrics (module docstring).
    """
    prep = _prepare(queries, query_labels, references, reference_labels, normalize, postprocess)
    q, r, shared = prep.queries, prep.references, prep.shared
    q_ids, r_ids, num_relevant = prep.query_ids, prep.reference_ids, prep.num_relevant
    ks = sorted({int(k) for k in recall_ks})
    if ks and ks[0] < 1:
        raise ValueError(f"recall_ks must be ≥ 1, got {list(recall_ks)}")

    num_refs = r.shape[0]
    max_neighbours = num_refs - 1 if shared else num_refs
    r_ids_t = torch.from_numpy(r_ids)
    max_depth = min(max(int(num_relevant.max()), ks[-1] if ks else 1), max_neighbours)
    # Per query row: its similarity row, then ~40 bytes per kept neighbour (indices,
    # hits, cumulative precision).
    step = rows_per_block(1, max_block_bytes, q.element_size() * num_refs + 40 * max_depth)

    prec1 = rprec = map_r = 0.0
    recall_hits = dict.fromkeys(ks, 0.0)
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        rel_count = num_relevant[start:stop]
        keep = np.flatnonzero(rel_count > 0)
        if keep.size == 0 or max_neighbours == 0:
            continue
        rows = torch.from_numpy(keep + start)
        sims = q[rows] @ r.T
        if shared:
            sims[torch.arange(rows.shape[0]), rows] = -torch.inf
        rel = torch.from_numpy(rel_count[keep])
        depth = min(max(int(rel.max()), ks[-1] if ks else 1), max_neighbours)
        nearest = _ranked(sims, depth, q[rows], prep, max_neighbours, postprocess)
        del sims
        hits = r_ids_t[nearest] == torch.from_numpy(q_ids[keep + start]).unsqueeze(1)
        hits_f = hits.double()
        position = torch.arange(1, depth + 1, dtype=torch.float64)
        within_r = position.unsqueeze(0) <= rel.unsqueeze(1)
        relf = rel.double()
        prec1 += float(hits_f[:, 0].sum())
        rprec += float(((hits_f * within_r).sum(dim=1) / relf).sum())
        precision_at_i = hits_f.cumsum(dim=1) / position
        map_r += float(((hits_f * precision_at_i * within_r).sum(dim=1) / relf).sum())
        for k in ks:
            recall_hits[k] += float(hits[:, : min(k, depth)].any(dim=1).sum())

    num_queries = int((num_relevant > 0).sum()) if max_neighbours > 0 else 0
    if num_queries == 0:
        raise ValueError("no query has a relevant reference (every label occurs once?)")
    return RetrievalReport(
        precision_at_1=prec1 / num_queries,
        r_precision=rprec / num_queries,
        map_at_r=map_r / num_queries,
        recall_at_k={k: recall_hits[k] / num_queries for k in ks},
        num_queries=num_queries,
        num_skipped=q.shape[0] - num_queries,
    )


def mean_average_precision(
    queries: Any,
    query_labels: Any,
    references: Any | None = None,
    reference_labels: Any | None = None,
    *,
    normalize: bool = True,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
    postprocess: PostProcessing | None = None,
) -> float:
    """mAP over the whole ranking: the mean over queries with ``R ≥ 1`` of
    ``AP = (1/R) Σ_{i: rel(i)} P(i)``, ``P(i) = (1/i) Σ_{j≤i} rel(j)``, ``i`` running over
    every reference (arguments as :func:`retrieval_metrics`; module docstring).

    Raises:
        ValueError: as :func:`retrieval_metrics`, or no query has a relevant reference.
    """
    prep = _prepare(queries, query_labels, references, reference_labels, normalize, postprocess)
    q, r, shared = prep.queries, prep.references, prep.shared
    num_refs = r.shape[0]
    max_neighbours = num_refs - 1 if shared else num_refs
    num_queries = int((prep.num_relevant > 0).sum()) if max_neighbours > 0 else 0
    if num_queries == 0:
        raise ValueError("no query has a relevant reference (every label occurs once?)")
    r_ids_t = torch.from_numpy(prep.reference_ids)
    # similarities, the sort (values + int64 order), hits and their running sums
    step = rows_per_block(num_refs, max_block_bytes, 2 * q.element_size() + 8 + 1 + 16)
    total = 0.0
    position = torch.arange(1, max_neighbours + 1, dtype=torch.float64)
    for start in range(0, q.shape[0], step):
        stop = min(start + step, q.shape[0])
        rel_count = prep.num_relevant[start:stop]
        keep = np.flatnonzero(rel_count > 0)
        if keep.size == 0:
            continue
        rows = torch.from_numpy(keep + start)
        sims = q[rows] @ r.T
        if shared:
            sims[torch.arange(rows.shape[0]), rows] = -torch.inf
        ranked = _ranked(sims, max_neighbours, q[rows], prep, max_neighbours, postprocess)
        del sims
        hits = (r_ids_t[ranked] == torch.from_numpy(prep.query_ids[keep + start]).unsqueeze(1))
        hits_f = hits.double()
        ap = (hits_f * hits_f.cumsum(dim=1) / position).sum(dim=1) / torch.from_numpy(
            rel_count[keep]).double()
        total += float(ap.sum())
    return total / num_queries


@dataclass(frozen=True, eq=False)  # holds arrays
class _Prepared:
    queries: torch.Tensor
    references: torch.Tensor
    shared: bool
    query_ids: np.ndarray
    reference_ids: np.ndarray
    num_relevant: np.ndarray
    database: Any  # a MatrixDatabase of the references when post-processing


def _prepare(queries: Any, query_labels: Any, references: Any, reference_labels: Any,
             normalize: bool, postprocess: PostProcessing | None) -> _Prepared:
    q = check_embeddings(queries, "queries")
    shared = references is None
    if shared != (reference_labels is None):
        raise ValueError("give references and reference_labels together, or neither")
    r = q if shared else check_embeddings(references, "references")
    if r.shape[1] != q.shape[1]:
        raise ValueError(
            f"queries and references differ in dimension: {q.shape[1]} vs {r.shape[1]}"
        )
    dtype = torch.float64 if torch.float64 in (q.dtype, r.dtype) else torch.float32
    q, r = q.to(dtype), r.to(dtype)
    if normalize:
        q = normalize_rows(q)
        r = q if shared else normalize_rows(r)
    ql = to_numpy(query_labels)
    rl = ql if shared else to_numpy(reference_labels)
    if ql.shape != (q.shape[0],):
        raise ValueError(f"query_labels must have shape ({q.shape[0]},), got {ql.shape}")
    if rl.shape != (r.shape[0],):
        raise ValueError(f"reference_labels must have shape ({r.shape[0]},), got {rl.shape}")
    # Shared integer label ids: query labels absent from the references get R = 0.
    all_ids, inverse = np.unique(np.r_[ql, rl] if not shared else ql, return_inverse=True)
    inverse = inverse.reshape(-1)
    q_ids = inverse[: q.shape[0]]
    r_ids = q_ids if shared else inverse[q.shape[0] :]
    ref_count = np.bincount(r_ids, minlength=all_ids.shape[0])
    num_relevant = ref_count[q_ids] - (1 if shared else 0)
    database = None
    if postprocess is not None and not postprocess.identity:
        if not normalize:
            raise ValueError("post-processing works on cosines: use normalize=True")
        if shared and postprocess.augmentation is not None:
            raise ValueError("database-side augmentation needs separate references: a set "
                             "searched against itself would mix each query into its "
                             "neighbours' augmented vectors; pass references=")
        from facemetric.index.rerank import MatrixDatabase

        database = MatrixDatabase(r.to(torch.float32),
                                  max_block_bytes=postprocess.max_block_bytes)
    return _Prepared(q, r, shared, q_ids, r_ids, num_relevant, database)


def _ranked(sims: torch.Tensor, depth: int, queries: torch.Tensor, prep: _Prepared,
            max_neighbours: int, postprocess: PostProcessing | None) -> torch.Tensor:
    """The ``depth`` best reference rows of each query row of ``sims`` (excluded references
    at ``-inf``): by similarity, or the post-processed shortlist then the rest by cosine."""
    if prep.database is None or postprocess is None:
        if depth >= sims.shape[1]:
            return torch.argsort(sims, dim=1, descending=True, stable=True)[:, :depth]
        return sims.topk(depth, dim=1, sorted=True).indices
    from facemetric.index.rerank import Shortlist

    width = min(postprocess.shortlist_size, max_neighbours)
    reach = max(width, depth)
    if reach >= sims.shape[1]:
        order = torch.argsort(sims, dim=1, descending=True, stable=True)
    else:
        order = sims.topk(reach, dim=1, sorted=True).indices
    cos = torch.gather(sims, 1, order[:, :width]).to(torch.float32)
    short = Shortlist(order[:, :width], cos.clone(), cos)
    refined = postprocess.apply(queries, short, prep.database).rows
    return torch.cat([refined, order[:, width:]], dim=1)[:, :depth]
