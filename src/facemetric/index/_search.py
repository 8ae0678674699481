"""Shared pieces of the indexes: input checks, chunked exact top-k by matrix product, and
spherical k-means for the IVF cells.

Every similarity here is an inner product of unit vectors (a cosine). The exact search
computes ``Q·Bᵀ`` one block at a time, so memory is bounded by ``max_block_bytes`` whatever
the sizes of ``Q`` and ``B`` (plus the ``(Q, k)`` answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: ``rows(start, stop)``: rows ``[start, stop)`` of a matrix as float32 ``(stop - start, D)``
Rows = Callable[[int, int], Tensor]

#: default bound on one block of scores (plus any dequantised copy of the base rows)
DEFAULT_BLOCK_BYTES = 64 * 2**20
# GEMMs narrower than this run far below peak: shrink the query side of a block first
_MIN_BASE_ROWS = 1024


def import_faiss() -> Any | None:
    """The ``faiss`` module, or ``None`` when the ``facemetric[index]`` extra is missing."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def require_faiss(what: str) -> Any:
    """The ``faiss`` module; a ``ValueError`` saying how to install it when it is missing."""
    faiss = import_faiss()
    if faiss is None:
        raise ValueError(f"{what} needs faiss, which is not installed: "
                         "pip install 'facemetric[index]' (faiss-cpu)")
    return faiss


def as_labels(labels: Sequence[int] | Tensor | np.ndarray, n: int | None = None) -> Tensor:
    """Identity labels as a 1-D int64 tensor (``n`` of them when given).

    Raises:
        ValueError: not a 1-D integer sequence, or not ``n`` labels.
    """
    lab = torch.as_tensor(labels)
    if lab.dim() != 1 or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D sequence of integers, got dtype {lab.dtype} and shape "
            f"{tuple(lab.shape)}"
        )
    if n is not None and lab.numel() != n:
        raise ValueError(f"got {lab.numel()} labels for {n} embeddings")
    return lab.to(torch.int64)


def as_int64(values: Sequence[int] | Tensor | np.ndarray | int, name: str,
             n: int | None = None) -> Tensor:
    """A 1-D int64 tensor of ``values`` (a scalar becomes one element).

    Raises:
        ValueError: not integers, not 1-D, or not ``n`` of them.
    """
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = np.array(values)  # torch refuses to alias read-only memory
    t = torch.as_tensor(values)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got dtype {t.dtype} and "
                         f"shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"got {t.numel()} {name} for {n} vectors; pass one per vector")
    return t.to(torch.int64)


def as_matrix(x: Tensor | np.ndarray, dim: int | None, name: str) -> Tensor:
    """``x`` as a contiguous float32 CPU tensor ``(n, dim)`` (no copy when it already is one).

    Raises:
        ValueError: not 2-D, the wrong width, or NaN/Inf entries.
    """
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = np.array(x)  # torch refuses to alias read-only memory (e.g. a store's snapshot)
    t = torch.as_tensor(x).detach()
    if t.dim() != 2 or (dim is not None and t.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, D)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}; stack the "
                         "vectors as rows (a single vector: v.reshape(1, -1))")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    t = t.to("cpu", torch.float32).contiguous()
    if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} contain NaN or Inf in {bad} of {t.shape[0]} rows; "
                         "check the model's output")
    return t


def unit_rows(x: Tensor, name: str) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (a new tensor).

    Raises:
        ValueError: a row of norm 0 (it has no direction to compare).
    """
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = norms == 0
    if bool(zero.any()):
        raise ValueError(f"{int(zero.sum())} of the {name} are all zeros and cannot be "
                         f"L2-normalised (first at row {int(zero.nonzero()[0])}); drop them")
    return x / norms.unsqueeze(1)


def is_unit(x: Tensor, tol: float = 1e-4) -> bool:
    """Whether every row of ``x`` has L2 norm within ``tol`` of 1."""
    return bool((torch.linalg.vector_norm(x, dim=1) - 1).abs().max() <= tol) if len(x) else True


def block_shape(n_queries: int, n_base: int, copy_dim: int, budget: int,
                query_copy_dim: int = 0) -> tuple[int, int]:
    """Rows ``(q, b)`` of one block: its ``q × b`` float32 scores, plus ``b × copy_dim`` and
    ``q × query_copy_dim`` floats of base and query rows copied to float32 (``0`` when they
    are views), fit ``budget`` bytes.

    Queries are taken up to 2048 at a time and halved while the base side would be narrower
    than 1024 rows (or the whole base); at least one row of each.
    """
    if budget < 4:
        raise ValueError(f"max_block_bytes must be >= 4, got {budget}")
    q = max(1, min(n_queries, 2048))
    while True:
        b = (budget // 4 - q * query_copy_dim) // (q + copy_dim)
        if b >= min(n_base, _MIN_BASE_ROWS) or q == 1:
            return q, int(max(1, min(n_base, b)))
        q = max(1, q // 2)


def exact_topk(
    queries: Rows, n_queries: int, base: Rows, n_base: int, k: int, *,
    dim: int, base_copies: bool, query_copies: bool = False,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES, self_rows: Tensor | None = None,
    dead: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` base rows of highest inner product with each query, by blocks of ``Q·Bᵀ``.

    Each block of scores is written into one preallocated buffer (so memory stays at one
    block, with no page faults per block); its top-``k`` are kept, and the kept candidates
    are reduced to the top-``k`` whenever they reach ``max(8k, 1024)`` columns and at the end.

    Args:
        queries, base: row accessors (float32 ``(rows, dim)``); ``base_copies`` and
            ``query_copies`` say whether they return fresh copies (counted in the block
            budget) or views.
        self_rows: base row to leave out for each query (``-1``: none) — a k-NN table's self.
        dead: ``(n_base,)`` bool, base rows never returned (free slots).

    Returns:
        ``(scores, rows)``, both ``(n_queries, min(k, n_base))``, best first; where fewer
        than that many rows are eligible (left out or dead) the tail is ``-inf`` / ``-1``.
    """
    kk = min(k, n_base)
    scores = torch.full((n_queries, kk), -math.inf)
    rows = torch.full((n_queries, kk), -1, dtype=torch.int64)
    if kk == 0 or n_queries == 0:
        return scores, rows
    q_step, b_step = block_shape(n_queries, n_base, dim if base_copies else 0, max_block_bytes,
                                 dim if query_copies else 0)
    any_dead = dead is not None and bool(dead[:n_base].any())
    buffer = torch.empty(q_step * b_step)
    spill = max(8 * kk, 1024)
    for q0 in range(0, n_queries, q_step):
        q1 = min(n_queries, q0 + q_step)
        q = queries(q0, q1)
        own = None if self_rows is None else self_rows[q0:q1]
        kept_s: list[Tensor] = []
        kept_r: list[Tensor] = []
        width = 0
        for b0 in range(0, n_base, b_step):
            b1 = min(n_base, b0 + b_step)
            s = buffer[: (q1 - q0) * (b1 - b0)].view(q1 - q0, b1 - b0)
            torch.mm(q, base(b0, b1).T, out=s)
            if any_dead:
                assert dead is not None
                s.masked_fill_(dead[b0:b1].unsqueeze(0), -math.inf)
            if own is not None:
                hit = ((own >= b0) & (own < b1)).nonzero().flatten()
                s[hit, own[hit] - b0] = -math.inf
            top_s, top_r = torch.topk(s, min(kk, b1 - b0), dim=1)
            kept_s.append(top_s)
            kept_r.append(top_r.add_(b0))
            width += top_s.shape[1]
            if width >= spill:
                kept_s, kept_r = _reduce(kept_s, kept_r, kk)
                width = kept_s[0].shape[1]
        best_s, best_r = _reduce(kept_s, kept_r, kk)
        scores[q0:q1, : best_s[0].shape[1]] = best_s[0]
        rows[q0:q1, : best_r[0].shape[1]] = best_r[0]
    if any_dead or self_rows is not None:
        rows[scores == -math.inf] = -1
    return scores, rows


def _reduce(kept_s: list[Tensor], kept_r: list[Tensor], k: int) -> tuple[list[Tensor],
                                                                          list[Tensor]]:
    """The top-``k`` of the kept candidate columns, as one-element lists."""
    if len(kept_s) == 1 and kept_s[0].shape[1] <= k:
        return kept_s, kept_r
    cand_s, cand_r = torch.cat(kept_s, dim=1), torch.cat(kept_r, dim=1)
    best_s, pick = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
    return [best_s], [torch.gather(cand_r, 1, pick)]


def tensor_rows(x: Tensor) -> Rows:
    """A :data:`Rows` accessor of the views ``x[start:stop]``."""
    return lambda start, stop: x[start:stop]


def gathered_rows(x: Tensor, index: Tensor) -> Rows:
    """A :data:`Rows` accessor of ``x[index[start:stop]]`` (copies)."""
    return lambda start, stop: x.index_select(0, index[start:stop])


def nearest_cells(rows: Rows, n: int, centroids: Tensor, p: int, *,
                  max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Tensor:
    """The ``p`` centroids of highest inner product with each row, best first ``(n, p)``."""
    _, cells = exact_topk(rows, n, tensor_rows(centroids), centroids.shape[0], p,
                          dim=centroids.shape[1], base_copies=False, query_copies=True,
                          max_block_bytes=max_block_bytes)
    return cells


def spherical_kmeans(x: Tensor, n_cells: int, *, iters: int = 8, seed: int = 0,
                     max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> Tensor:
    """Unit centroids ``(n_cells, D)`` of the unit rows ``x`` (spherical k-means, Lloyd).

    Starts from ``n_cells`` distinct rows drawn with ``seed``; each step assigns every row to
    its centroid of highest cosine and sets each centroid to the normalised sum of its rows
    (Dhillon & Modha, *Concept Decompositions for Large Sparse Text Data using Clustering*,
    2001). A cell left empty is re-seeded with a random row.
    """
    n, dim = x.shape
    if not 1 <= n_cells <= n:
        raise ValueError(f"need 1 <= cells <= rows for k-means, got {n_cells} cells for {n}")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:n_cells]].clone()
    for _ in range(iters):
        cell = nearest_cells(tensor_rows(x), n, centroids, 1,
                             max_block_bytes=max_block_bytes)[:, 0]
        sums = torch.zeros(n_cells, dim).index_add_(0, cell, x)
        empty = torch.bincount(cell, minlength=n_cells) == 0
        if bool(empty.any()):
            sums[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=gen)]
        centroids = F.normalize(sums, dim=1)
    return centroids


def cell_ranks(queries: Tensor, centroids: Tensor) -> Tensor:
    """``ranks[q, c]``: position of cell ``c`` in query ``q``'s probe order (0 = nearest)."""
    order = torch.argsort(queries @ centroids.T, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(centroids.shape[0]).expand_as(order).contiguous())
    return ranks


def smallest_nprobe(neighbour_ranks: Tensor, target: float, n_cells: int) -> int:
    """Smallest ``nprobe`` whose recall ``mean(rank < nprobe)`` over the true neighbours'
    cell ranks reaches ``target`` (``neighbour_ranks`` ``-1`` entries are ignored)."""
    r = torch.sort(neighbour_ranks[neighbour_ranks >= 0]).values
    if r.numel() == 0:
        return 1
    need = min(r.numel(), max(1, math.ceil(target * r.numel() - 1e-9)))
    return int(min(n_cells, int(r[need - 1]) + 1))
