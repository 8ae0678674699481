"""k-nearest-neighbour tables of a set of unit vectors (global hard mining at scale).

:func:`knn_table` returns, for every row ``i`` of ``vectors (n, D)`` (or the rows asked for),
the ``k`` other rows of highest cosine ``x̂_i · x̂_j`` (``j ≠ i``), best first.

- **Exact** (small ``n``): blocks of ``X·Xᵀ`` with the diagonal masked, top-``k`` per block,
  merged; ``O(n²D)`` work, memory bounded by ``max_block_bytes``.
- **IVF** (large ``n``): the rows are split into ``nlist`` cells by spherical k-means; each
  query compares itself with the rows of its ``nprobe`` nearest cells only (Jégou et al.,
  *Product Quantization for Nearest Neighbor Search*, TPAMI 2011, the inverted file). Since
  the queries are the indexed rows themselves, the search is run as a *join*, cell by cell:
  the queries that probe cell ``c`` (gathered) times the rows of cell ``c``, one matrix
  product each, so every score comes out of a BLAS GEMM instead of a per-query scan. On 2
  shared cores, faiss's ``IndexIVFFlat.search`` at the same cells and ``nprobe`` took about
  twice as long as this join for 2·10⁵ rows (``benchmarks/index.py``, part d), and this
  needs no faiss. The join runs in ``workers`` threads over disjoint query shares.

**Choosing ``nprobe`` by measured recall.** Within the probed cells the search is exhaustive
and exact, so a true neighbour ``j`` of query ``q`` is found exactly when its cell is among
the first ``nprobe`` of ``q``'s probe order. On a sample of queries the exact top-``k`` is
computed by brute force, the rank ``r`` of each true neighbour's cell in its query's probe
order is recorded, and ``recall@k(nprobe) = mean(r < nprobe)`` is then known *for every*
``nprobe`` at once; the smallest ``nprobe`` reaching ``target_recall`` is used. The table's
rows for the sample are finally compared with the brute force (``sample_recall``), a true
measurement of what was returned.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from facemetric.index._search import (
    DEFAULT_BLOCK_BYTES,
    as_int64,
    as_matrix,
    block_shape,
    cell_ranks,
    exact_topk,
    gathered_rows,
    is_unit,
    nearest_cells,
    smallest_nprobe,
    spherical_kmeans,
    tensor_rows,
    unit_rows,
)

METHODS = ("auto", "exact", "ivf")


@dataclass(frozen=True)
class KnnTable:
    """The answer of :func:`knn_table`.

    Attributes:
        ids: ``(m, k)`` int64 row numbers of each query row's neighbours, best first (never
            the row itself; ``-1`` only when fewer than ``k`` other rows exist).
        scores: ``(m, k)`` float32 cosines (``-inf`` where ``ids`` is ``-1``).
        exact: whether the table is exact.
        nlist, nprobe: the IVF cells and cells probed per query (``None`` when exact).
        sample_recall: recall@k of the returned rows of the tuning sample against brute force
            (``1.0`` when exact, ``None`` if no sample was measured).
        seconds: wall time per phase (``kmeans``, ``tune``, ``assign``, ``join``, ``refill``:
            more cells for the rows whose probed cells held fewer than ``k`` others; or
            ``exact``).
    """

    ids: Tensor
    scores: Tensor
    exact: bool
    nlist: int | None = None
    nprobe: int | None = None
    sample_recall: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def knn_table(
    vectors: Tensor | np.ndarray,
    k: int,
    *,
    rows: Tensor | np.ndarray | None = None,
    method: str = "auto",
    exact_below: int = 20_000,
    target_recall: float = 0.9,
    nlist: int | None = None,
    nprobe: int | None = None,
    sample: int = 1000,
    kmeans_iters: int = 8,
    train_per_cell: int = 32,
    seed: int = 0,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    workers: int | None = None,
) -> KnnTable:
    """The ``k`` nearest other rows (cosine) of each row of ``vectors``.

    Args:
        vectors: ``(n, D)`` floats; rows are L2-normalised (a float32 copy is made only when
            they are not float32 unit rows already).
        k: neighbours per row, ``1 <= k < n``.
        rows: which rows to answer for (default all), ``(m,)``; the table is ``(m, k)``.
        method: ``"exact"``, ``"ivf"`` or ``"auto"`` (exact when ``n <= exact_below``).
        target_recall: IVF: the smallest ``nprobe`` whose recall@k, measured on the sample,
            reaches this.
        nlist: IVF cells (default ``√n``, at most ``n / train_per_cell``): a self-join
            assigns all ``n`` rows to cells (``n·nlist`` products) and scans ``≈ n²·nprobe /
            nlist``, so fewer cells than the ``4√n``+ usual for few queries pay off.
        nprobe: IVF cells probed per query; given, it is used as is (no tuning).
        sample: query rows drawn (with ``seed``) to tune ``nprobe`` and measure recall;
            ``0`` skips the measurement (then ``nprobe`` must be given).
        kmeans_iters, train_per_cell: k-means steps, and rows per cell it trains on.
        max_block_bytes: bound on one block of scores (and gathered rows) in memory.
        workers: threads of the IVF join (default ``torch.get_num_threads()``), each with
            single-threaded torch ops; the other phases use torch's own threads.

    Rows whose probed cells hold fewer than ``k`` other rows are searched again with twice
    the cells (repeatedly; brute force when that would be all of them), so every row gets
    ``k`` neighbours.

    Memory: the table ``(m, k)``, the probe lists ``(m, nprobe)`` int64 and one block; no
    ``n × n`` matrix and no copy of ``vectors`` when they are float32 unit rows.

    Raises:
        ValueError: bad shapes, NaN/Inf or zero rows, ``k`` out of range, a bad option.
    """
    x = as_matrix(vectors, None, "vectors")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, n) = [1, {n}) for {n} vectors, got {k}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if sample < 0 or kmeans_iters < 1 or train_per_cell < 1:
        raise ValueError(f"need sample >= 0, kmeans_iters >= 1 and train_per_cell >= 1, got "
                         f"{sample}, {kmeans_iters}, {train_per_cell}")
    if (nlist is not None and nlist < 1) or (nprobe is not None and nprobe < 1):
        raise ValueError(f"nlist and nprobe must be >= 1, got {nlist}, {nprobe}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not is_unit(x):
        x = unit_rows(x, "vectors")
    query_rows = torch.arange(n) if rows is None else as_int64(rows, "rows")
    if query_rows.numel() and (int(query_rows.min()) < 0 or int(query_rows.max()) >= n):
        raise ValueError(f"rows must lie in [0, {n}), got values in "
                         f"[{int(query_rows.min())}, {int(query_rows.max())}]")
    exact = method == "exact" or (method == "auto" and n <= exact_below)
    if exact or query_rows.numel() == 0:
        started = time.perf_counter()
        scores, ids = _exact(x, query_rows, k, max_block_bytes)
        return KnnTable(ids, scores, True, sample_recall=1.0,
                        seconds={"exact": time.perf_counter() - started})
    if sample == 0 and nprobe is None:
        raise ValueError("sample=0 leaves nothing to tune nprobe on: give nprobe or a sample")
    return _ivf(x, query_rows, k, target_recall, nlist, nprobe, sample, kmeans_iters,
                train_per_cell, seed, max_block_bytes, workers or torch.get_num_threads())


def _exact(x: Tensor, query_rows: Tensor, k: int, budget: int) -> tuple[Tensor, Tensor]:
    """Brute-force top-``k`` of ``x[query_rows]`` over ``x`` without each query's own row."""
    return exact_topk(gathered_rows(x, query_rows), query_rows.numel(), tensor_rows(x),
                      x.shape[0], k, dim=x.shape[1], base_copies=False, query_copies=True,
                      max_block_bytes=budget, self_rows=query_rows)


def _ivf(
    x: Tensor, query_rows: Tensor, k: int, target: float, nlist: int | None,
    nprobe: int | None, sample: int, iters: int, per_cell: int, seed: int, budget: int,
    workers: int,
) -> KnnTable:
    n = x.shape[0]
    m = query_rows.numel()
    seconds: dict[str, float] = {}
    gen = torch.Generator().manual_seed(seed)

    started = time.perf_counter()
    cells = max(1, min(nlist or round(math.sqrt(n)), n // per_cell))
    train = x
    if n > per_cell * cells:
        train = x[torch.sort(torch.randperm(n, generator=gen)[: per_cell * cells]).values]
    centroids = spherical_kmeans(train, cells, iters=iters, seed=seed, max_block_bytes=budget)
    del train
    seconds["kmeans"] = time.perf_counter() - started

    # exact answers of a sample of the queries, and nprobe from their cells' ranks
    started = time.perf_counter()
    picked = torch.empty(0, dtype=torch.int64)  # positions in query_rows
    truth = torch.empty(0, k, dtype=torch.int64)
    if sample and m:
        picked = torch.sort(torch.randperm(m, generator=gen)[: min(sample, m)]).values
        _, truth = _exact(x, query_rows[picked], k, budget)
        if nprobe is None:
            ranks = cell_ranks(x[query_rows[picked]], centroids)
            own_cell = nearest_cells(gathered_rows(x, truth.clamp_min(0).reshape(-1)),
                                     truth.numel(), centroids, 1,
                                     max_block_bytes=budget).view_as(truth)
            r = torch.gather(ranks, 1, own_cell)
            nprobe = smallest_nprobe(torch.where(truth >= 0, r, -1), target, cells)
    assert nprobe is not None
    nprobe = min(nprobe, cells)
    seconds["tune"] = time.perf_counter() - started

    started = time.perf_counter()
    if m == n and bool((query_rows == torch.arange(n)).all()):
        probes = nearest_cells(tensor_rows(x), n, centroids, nprobe, max_block_bytes=budget)
        home = probes[:, 0].contiguous()
    else:
        home = nearest_cells(tensor_rows(x), n, centroids, 1, max_block_bytes=budget)[:, 0]
        probes = nearest_cells(gathered_rows(x, query_rows), m, centroids, nprobe,
                               max_block_bytes=budget)
    seconds["assign"] = time.perf_counter() - started

    started = time.perf_counter()
    scores, ids = _join(x, query_rows, home, probes, cells, k, budget, workers)
    seconds["join"] = time.perf_counter() - started

    # rows whose probed cells held fewer than k others: probe twice as many cells for
    # them, and so on; brute force once that would be every cell
    short = (ids < 0).any(dim=1).nonzero().flatten()
    started, probed = time.perf_counter(), nprobe
    while short.numel():
        probed = min(cells, 2 * probed)
        if probed == cells:
            scores[short], ids[short] = _exact(x, query_rows[short], k, budget)
            break
        more = nearest_cells(gathered_rows(x, query_rows[short]), short.numel(), centroids,
                             probed, max_block_bytes=budget)
        scores[short], ids[short] = _join(x, query_rows[short], home, more, cells, k, budget,
                                          workers)
        short = short[(ids[short] < 0).any(dim=1)]
    if probed != nprobe:
        seconds["refill"] = time.perf_counter() - started
    measured = None
    if picked.numel():
        got = ids[picked]
        hits = ((got[:, :, None] == truth[:, None, :]) & (got[:, :, None] >= 0)).any(2)
        measured = float(hits.sum()) / max(1, int((truth >= 0).sum()))
    return KnnTable(ids, scores, False, cells, nprobe, measured, seconds)


def _join(
    x: Tensor, query_rows: Tensor, home: Tensor, probes: Tensor, cells: int, k: int,
    budget: int, workers: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each query over the rows of its probed cells (see :func:`_join_part`).

    With ``workers > 1`` the queries are dealt round-robin to that many Python threads,
    each running the join for its share with single-threaded torch ops (which release the
    GIL). Thousands of small products each split over 2 threads stalled whenever another
    process held a core (measured ~10× slower under load); whole-join threads do not.
    """
    m = probes.shape[0]
    members = torch.argsort(home, stable=True)  # rows grouped by cell
    counts = torch.bincount(home, minlength=cells)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(home)  # a row's position within its cell
    slot[members] = torch.arange(home.numel()) - starts[home[members]]
    cells_of = (members, counts, starts, slot)
    if workers <= 1 or m < 2 * workers:
        return _join_part(x, query_rows, home, probes, cells_of, k, budget)
    parts = [torch.arange(w, m, workers) for w in range(workers)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(
                lambda p: _join_part(x, query_rows[p], home, probes[p], cells_of, k,
                                     budget // workers), parts))
    finally:
        torch.set_num_threads(threads)
    best_s = torch.empty(m, k)
    best_i = torch.empty(m, k, dtype=torch.int64)
    for p, (s, i) in zip(parts, done, strict=True):
        best_s[p], best_i[p] = s, i
    return best_s, best_i


def _join_part(
    x: Tensor, query_rows: Tensor, home: Tensor, probes: Tensor,
    cells_of: tuple[Tensor, Tensor, Tensor, Tensor], k: int, budget: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each query over the rows of its probed cells, one cell at a time.

    ``home (n,)``: each row's cell; ``probes (m, p)``: each query's cells, nearest first;
    ``cells_of``: the rows grouped by cell (``members``), each cell's ``counts`` and
    ``starts`` in ``members``, and each row's ``slot`` within its cell. For cell ``c`` the
    queries probing it (``Pc``) are scored against its rows (``Lc``) by one product
    ``X[Pc]·X[Lc]ᵀ`` (split into blocks within ``budget``), each query's own row masked. The
    home cells (first probe) go first, so every query has a running ``k``-th best score
    ``τ`` before its other cells are visited; there, only the queries with some score above
    ``τ`` (a row count, cheap) take part in the top-``k`` merge.
    """
    dim = x.shape[1]
    members, counts, starts, slot_in_cell = cells_of
    cells = counts.numel()
    m = probes.shape[0]
    best_s = torch.full((m, k), -math.inf)
    best_i = torch.full((m, k), -1, dtype=torch.int64)
    own_home, own_slot = home[query_rows], slot_in_cell[query_rows]
    for phase in (probes[:, :1], probes[:, 1:]):
        if phase.numel() == 0:
            continue
        width = phase.shape[1]
        flat = phase.reshape(-1)
        askers = torch.argsort(flat, stable=True) // width  # queries grouped by probed cell
        ask_counts = torch.bincount(flat, minlength=cells)
        ask_starts = torch.cumsum(ask_counts, 0) - ask_counts
        for c in range(cells):
            n_rows, n_ask = int(counts[c]), int(ask_counts[c])
            if n_rows == 0 or n_ask == 0:
                continue
            cell_rows = members[int(starts[c]) : int(starts[c]) + n_rows]
            cell_askers = askers[int(ask_starts[c]) : int(ask_starts[c]) + n_ask]
            q_step, b_step = block_shape(n_ask, n_rows, dim, budget, dim)
            for b0 in range(0, n_rows, b_step):
                cols = cell_rows[b0 : b0 + b_step]
                # (D, b) contiguous: small GEMMs against a transposed view ran ~50× slower
                base_t = x.index_select(0, cols).T.contiguous()
                for q0 in range(0, n_ask, q_step):
                    who = cell_askers[q0 : q0 + q_step]
                    s = torch.mm(x.index_select(0, query_rows[who]), base_t)
                    mine = ((own_home[who] == c) & (own_slot[who] >= b0)
                            & (own_slot[who] < b0 + cols.numel())).nonzero().flatten()
                    s[mine, own_slot[who[mine]] - b0] = -math.inf
                    _merge(best_s, best_i, who, s, cols, k)
    best_i[best_s == -math.inf] = -1
    return best_s, best_i


def _merge(best_s: Tensor, best_i: Tensor, who: Tensor, s: Tensor, cols: Tensor,
           k: int) -> None:
    """Merge the scores ``s (len(who), len(cols))`` into the running top-``k`` of ``who``.

    Only entries above a query's current ``k``-th best can enter, so rows without one are
    skipped and the top-``j`` taken is only as wide as the most such entries in a row.
    """
    above = (s > best_s[who, -1:]).sum(dim=1)
    busy = (above > 0).nonzero().flatten()
    if busy.numel() == 0:
        return
    width = min(k, int(above.max()))
    if busy.numel() < who.numel():
        who, s = who[busy], s[busy]
    top_s, top_j = torch.topk(s, width, dim=1)
    cand_s = torch.cat([best_s[who], top_s], dim=1)
    cand_i = torch.cat([best_i[who], cols[top_j]], dim=1)
    keep_s, pick = torch.topk(cand_s, k, dim=1)
    best_s[who] = keep_s
    best_i[who] = torch.gather(cand_i, 1, pick)
