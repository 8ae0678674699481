"""Nearest-identity index for global hard mining: each identity of a training set summarised
by its centroid (or its images), searched for the identities most confused with it.

Each identity is summarised by its *centroid*

    c_y = normalise( Σ_{i: y_i = y} e_i / ‖e_i‖ )

and identities ``a ≠ b`` are confusable in proportion to ``c_a · c_b`` (per-image mode:
``max_{i ∈ a, j ∈ b} ê_i · ê_j``). Indexing identities rather than images keeps the index at
``C × D`` (100k identities × 512 floats = 200 MB) however many images there are;
``refresh_from_model`` accumulates the centroid sums batch by batch, so memory does not grow
with the number of images either.

**Neighbour tables.** In identity mode :meth:`EmbeddingIndex.neighbours` is a k-NN table of
the centroids, computed by :func:`facemetric.index.knn_table`: exact (chunked matmul + top-k)
up to ``approximate_above`` identities, above it an inverted file searched as a cell-by-cell
join whose ``nprobe`` is the smallest reaching ``target_recall`` measured on a sample against
brute force. Per-image mode searches images (``search``) and keeps each identity's best pair.

:meth:`EmbeddingIndex.search` uses faiss (the optional ``facemetric[index]`` extra):
``IndexFlatIP`` (exact) up to ``approximate_above`` vectors, ``IndexIVFFlat`` or
``IndexHNSWFlat`` (approximate) above; without faiss a torch exact search runs instead
(chunked matmul + top-k, memory bounded by ``chunk_size²`` scores). The faiss index is built
on the first ``search`` after a refresh, so identity-mode refreshes never pay for it.

Moved here from ``facemetric.miners.global_index`` (which re-exports it) so that the miners
and the gallery share one index package.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from facemetric.index._search import (
    as_labels,
    exact_topk,
    import_faiss,
    tensor_rows,
)
from facemetric.index.knn import knn_table
from facemetric.inference.dataset import embed_dataset
from facemetric.validation import check_embeddings

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
APPROXIMATE = ("ivf", "hnsw")


class EmbeddingIndex:
    """Nearest-identity search over the dataset's (normalised) embeddings.

    Args:
        per_image: index every image instead of one centroid per identity.
        backend: ``"faiss"``, ``"torch"`` (exact, chunked) or ``"auto"``: the chunked torch
                search while exact search is asked for (measured about 4× faster than faiss's
                flat index on a 2-core CPU), faiss for the approximate indexes if installed.
        approximate_above: with faiss, an index of more vectors than this is approximate
            (``None``: always exact). The torch backend is always exact.
        approximate: what ``search`` (and per-image neighbours) use when approximate:
            ``"ivf"`` (``IndexIVFFlat``: k-means cells, ``nprobe`` visited) or ``"hnsw"``
            (``IndexHNSWFlat``: graph, ``ef_search`` candidates). Identity-mode neighbour
            tables are always an IVF join (:func:`~facemetric.index.knn_table`).
        nlist: IVF cells (``search``: default ``√n``, at most ``n/39``, trained on at most
            ``64·nlist`` vectors; neighbour tables: ``knn_table``'s default ``√n``).
        nprobe: IVF cells visited per query (``search``: default ``max(8, nlist/4)``;
            neighbour tables: default tuned to ``target_recall``).
        target_recall: recall@k that approximate neighbour tables are tuned to reach,
            measured on a sample of identities against brute force.
        hnsw_m: HNSW links per node.
        ef_search: HNSW search breadth (raised to ``k`` when smaller).
        chunk_size: rows per block of the torch search (``chunk_size²`` scores in memory;
            the neighbour tables use the same byte bound).
        fetch_factor: per-image mode fetches ``fetch_factor·(k + 1)`` images per query image
            first, and doubles that for identities still short of ``k`` distinct neighbours.

    Similarities are inner products of unit vectors (cosine). ``refresh`` replaces the
    contents; ``neighbours`` answers in identity labels. :attr:`last_table` describes the
    last identity-mode neighbour table (exact or not, ``nprobe``, measured sample recall).
    """

    def __init__(
        self,
        *,
        per_image: bool = False,
        backend: str = "auto",
        approximate_above: int | None = 100_000,
        approximate: str = "ivf",
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        chunk_size: int = 4096,
        fetch_factor: int = 4,
        target_recall: float = 0.95,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if approximate not in APPROXIMATE:
            raise ValueError(f"approximate must be one of {APPROXIMATE}, got {approximate!r}")
        if approximate_above is not None and approximate_above < 0:
            raise ValueError(f"approximate_above must be >= 0 or None, got {approximate_above}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_search", ef_search),
                            ("chunk_size", chunk_size), ("fetch_factor", fetch_factor)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        if (nlist is not None and nlist < 1) or (nprobe is not None and nprobe < 1):
            raise ValueError(f"nlist and nprobe must be >= 1, got {nlist}, {nprobe}")
        faiss = import_faiss()
        if backend == "faiss" and faiss is None:
            raise ValueError("backend='faiss' but faiss is not installed: "
                             "pip install 'facemetric[index]'")
        self._faiss = faiss if backend != "torch" else None
        self._exact_with_faiss = backend == "faiss"
        self.per_image = per_image
        self.approximate_above = approximate_above
        self.approximate = approximate
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.chunk_size, self.fetch_factor = chunk_size, fetch_factor
        self.target_recall = target_recall
        self._identities = torch.empty(0, dtype=torch.int64)  # sorted labels
        self._vectors = torch.empty(0, 0)
        self._owner = torch.empty(0, dtype=torch.int64)  # identity position of each vector
        self._faiss_index: Any = None
        self.exact = True
        #: seconds the last refresh took, split into ``embed`` (model pass) and ``build``
        self.last_refresh: dict[str, float] = {}
        #: the last identity-mode neighbour table: ``exact``, ``nprobe``, ``sample_recall``,
        #: ``seconds`` (empty before the first)
        self.last_table: dict[str, Any] = {}

    # ---- contents

    @property
    def ready(self) -> bool:
        """Whether ``refresh`` has filled the index."""
        return self._vectors.shape[0] > 0

    @property
    def backend(self) -> str:
        """``"faiss"`` or ``"torch"``: what ``search`` uses (faiss is built on first use)."""
        uses_faiss = self._faiss is not None and (not self.exact or self._exact_with_faiss)
        return "faiss" if self.ready and uses_faiss else "torch"

    @property
    def identities(self) -> Tensor:
        """Labels of the indexed identities, ascending ``(C,)``."""
        return self._identities

    @property
    def vectors(self) -> Tensor:
        """The indexed unit vectors ``(n, D)``: centroids ``(C, D)`` in order of
        :attr:`identities`, or the images' embeddings in per-image mode."""
        return self._vectors

    @property
    def vector_labels(self) -> Tensor:
        """The identity label of each indexed vector ``(n,)``."""
        return self._identities[self._owner]

    def _check_ready(self) -> None:
        if not self.ready:
            raise ValueError("the index is empty: call refresh() or refresh_from_model() first")

    # ---- refresh

    def refresh(self, embeddings: Tensor, labels: Sequence[int] | Tensor | np.ndarray) -> None:
        """Rebuild from ``embeddings (N, D)`` of the images with identity ``labels (N,)``.

        Each embedding is L2-normalised; identity mode keeps one centroid per identity
        (mean of its unit embeddings, renormalised), per-image mode keeps them all.

        Raises:
            ValueError: bad shapes/dtypes, NaN or Inf, or fewer than 2 identities.
        """
        check_embeddings(embeddings)
        emb = embeddings.detach().to("cpu", torch.float32)
        lab = as_labels(labels, emb.shape[0])
        started = time.perf_counter()
        identities, owner = torch.unique(lab, return_inverse=True)
        unit = F.normalize(emb, dim=1)
        if self.per_image:
            self._set(identities, unit.contiguous(), owner)
        else:
            sums = torch.zeros(identities.numel(), emb.shape[1]).index_add_(0, owner, unit)
            self._set(identities, F.normalize(sums, dim=1), torch.arange(identities.numel()))
        self.last_refresh = {"embed": 0.0, "build": time.perf_counter() - started}

    def refresh_from_model(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        transform: Callable[[np.ndarray, np.random.Generator], Tensor] | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        """Embed ``dataset`` (items ``(image, label)``) with ``model`` and rebuild.

        The model runs in eval mode under ``no_grad`` (its mode is restored afterwards),
        in dataset order; nothing is drawn from the global RNGs. An image given as an
        ``(H, W, 3)`` array goes through ``transform(image, rng)`` (a facemetric
        transform, e.g. ``eval_transform(112)``; ``rng`` is seeded by the item index);
        a tensor is used as it is. In identity mode only the per-identity sums are kept
        (labels must then be ``>= 0``), so memory is ``O(C·D)`` whatever the dataset size.
        """
        started = time.perf_counter()
        sums = torch.zeros(0, 0)
        counts = torch.zeros(0, dtype=torch.int64)
        chunks: list[Tensor] = []
        all_labels: list[Tensor] = []

        def consume(out: Tensor, labels: Tensor) -> None:
            nonlocal sums, counts
            emb = F.normalize(out.cpu(), dim=1)
            lab = as_labels(labels)
            if self.per_image:
                chunks.append(emb)
                all_labels.append(lab)
            else:
                sums, counts = _accumulate(sums, counts, emb, lab)

        embed_dataset(model, dataset, consume, batch_size=batch_size, device=device,
                      transform=transform, num_workers=num_workers, progress=progress,
                      desc="index")
        embed_s = time.perf_counter() - started
        if self.per_image:
            if not chunks:
                raise ValueError("the dataset is empty")
            self.refresh(torch.cat(chunks), torch.cat(all_labels))
        else:
            present = torch.nonzero(counts > 0).flatten()
            if present.numel() == 0:
                raise ValueError("the dataset is empty")
            started = time.perf_counter()
            self._set(present, F.normalize(sums[present], dim=1), torch.arange(present.numel()))
            self.last_refresh = {"build": time.perf_counter() - started}
        self.last_refresh["embed"] = embed_s

    def _set(self, identities: Tensor, vectors: Tensor, owner: Tensor) -> None:
        if identities.numel() < 2:
            raise ValueError(f"need at least 2 identities to index, got {identities.numel()}")
        self._identities, self._vectors, self._owner = identities, vectors.contiguous(), owner
        self._faiss_index = None
        n = vectors.shape[0]
        self.exact = self.approximate_above is None or n <= self.approximate_above
        if not self.exact and self._faiss is None:
            logger.info("faiss is not installed: exact torch search over %d vectors", n)
            self.exact = True

    def _build_faiss(self) -> Any:
        """The faiss index of :attr:`vectors` (built on the first ``search`` that needs it)."""
        faiss = self._faiss
        n, dim = self._vectors.shape
        data = self._vectors.numpy().astype(np.float32, copy=False)
        if self.exact:
            index = faiss.IndexFlatIP(dim)
        elif self.approximate == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
        else:
            nlist = self.nlist or int(math.sqrt(n))
            nlist = max(1, min(nlist, n // 39))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = data
            if n > 64 * nlist:  # k-means needs no more; fixed subsample for determinism
                pick = np.random.default_rng(0).choice(n, 64 * nlist, replace=False)
                sample = data[np.sort(pick)]
            index.train(sample)
            index.nprobe = min(nlist, self.nprobe or max(8, nlist // 4))
        index.add(data)
        return index

    # ---- search

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` indexed vectors most similar to each query.

        Returns:
            ``(scores, rows)``, both ``(Q, k)``, best first: inner products (float32) and
            row numbers into :attr:`vectors` (``-1`` where fewer than ``k`` were found).
        """
        self._check_ready()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = queries.detach().to("cpu", torch.float32).contiguous()
        if q.dim() != 2 or q.shape[1] != self._vectors.shape[1]:
            raise ValueError(
                f"queries must have shape (Q, {self._vectors.shape[1]}), got {tuple(q.shape)}"
            )
        n = self._vectors.shape[0]
        if self.backend == "faiss":
            if self._faiss_index is None:
                self._faiss_index = self._build_faiss()
            index = self._faiss_index
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = max(self.ef_search, k)
            scores, rows = index.search(q.numpy(), min(k, n))
            scores_t, rows_t = torch.from_numpy(scores), torch.from_numpy(rows).long()
        else:
            scores_t, rows_t = exact_topk(tensor_rows(q), q.shape[0], tensor_rows(self._vectors),
                                          n, k, dim=q.shape[1], base_copies=False,
                                          max_block_bytes=self._block_bytes)
        if k > n:
            pad = k - n
            scores_t = F.pad(scores_t, (0, pad), value=-math.inf)
            rows_t = F.pad(rows_t, (0, pad), value=-1)
        return scores_t, rows_t

    def neighbours(self, identity: int | Sequence[int] | Tensor, k: int) -> Tensor:
        """The ``k`` identities most confusable with ``identity``, most similar first.

        Similarity of identities ``a ≠ b``: ``c_a · c_b`` (centroids), or in per-image mode
        ``max_{i ∈ a, j ∈ b} ê_i · ê_j``. The identity itself is never returned.

        Args:
            identity: one label, or a 1-D sequence of labels (all must be indexed).
            k: how many neighbours per identity.

        Returns:
            labels ``(k,)`` for one identity, ``(n, k)`` for ``n``; ``-1`` pads rows that
            have fewer than ``k`` other identities (or, approximately searched, found fewer).

        Raises:
            ValueError: an identity that is not in the index, ``k < 1``, an empty index.
        """
        self._check_ready()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        single = isinstance(identity, int | np.integer) or (
            isinstance(identity, Tensor) and identity.dim() == 0
        )
        wanted = torch.as_tensor(identity, dtype=torch.int64).reshape(-1)
        pos = torch.searchsorted(self._identities, wanted).clamp_max(self._identities.numel() - 1)
        missing = self._identities[pos] != wanted
        if bool(missing.any()):
            raise ValueError(
                f"identities not in the index: {wanted[missing][:10].tolist()} "
                f"({int(missing.sum())} in all)"
            )
        out = self._neighbour_positions(pos, k)
        labels = torch.where(out >= 0, self._identities[out.clamp_min(0)], -1)
        return labels[0] if single else labels

    @property
    def _block_bytes(self) -> int:
        return 4 * self.chunk_size**2

    def _neighbour_positions(self, pos: Tensor, k: int) -> Tensor:
        """Identity positions ``(len(pos), k)`` of each queried identity's neighbours."""
        n_q, n = pos.numel(), self._vectors.shape[0]
        out = torch.full((n_q, k), -1, dtype=torch.int64)
        if not self.per_image:
            table = knn_table(
                self._vectors, min(k, n - 1), rows=pos,
                method="exact" if self.exact else "ivf", target_recall=self.target_recall,
                nlist=self.nlist, nprobe=self.nprobe, max_block_bytes=self._block_bytes,
            )
            self.last_table = {"exact": table.exact, "nprobe": table.nprobe,
                               "sample_recall": table.sample_recall,
                               "seconds": sum(table.seconds.values())}
            out[:, : table.ids.shape[1]] = table.ids
            return out
        order = torch.argsort(self._owner, stable=True)
        counts = torch.bincount(self._owner, minlength=self._identities.numel())
        starts = torch.cumsum(counts, 0) - counts
        fetch = min(n, self.fetch_factor * (k + 1))
        todo = torch.arange(n_q)
        while todo.numel() > 0:
            c = counts[pos[todo]]
            query_owner = torch.repeat_interleave(torch.arange(todo.numel()), c)
            first = torch.repeat_interleave(starts[pos[todo]], c)
            offset = torch.arange(query_owner.numel()) - torch.repeat_interleave(
                torch.cumsum(c, 0) - c, c)
            rows_q = order[first + offset]
            scores, rows = self.search(self._vectors[rows_q], fetch)
            found, got = _best_distinct(scores, rows, self._owner, pos[todo][query_owner],
                                        query_owner, todo.numel(), k)
            out[todo] = found
            short = got < k
            if fetch >= n or not bool(short.any()):
                break
            todo, fetch = todo[short], min(n, 2 * fetch)
        return out


def _accumulate(
    sums: Tensor, counts: Tensor, emb: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """``sums[label] += emb`` and ``counts[label] += 1`` row by row, growing both to the
    largest label seen."""
    if labels.numel() == 0:
        return sums, counts
    if int(labels.min()) < 0:
        raise ValueError("refresh_from_model needs labels >= 0 in identity mode")
    need = int(labels.max()) + 1
    if sums.shape[0] < need or sums.shape[1] != emb.shape[1]:
        size = max(need, 2 * sums.shape[0])
        grown = torch.zeros(size, emb.shape[1])
        grown_counts = torch.zeros(size, dtype=torch.int64)
        if sums.numel():
            grown[: sums.shape[0]] = sums
            grown_counts[: counts.shape[0]] = counts
        sums, counts = grown, grown_counts
    sums.index_add_(0, labels, emb)
    counts.index_add_(0, labels, torch.ones_like(labels))
    return sums, counts


def _best_distinct(
    scores: Tensor, rows: Tensor, owner: Tensor, self_pos: Tensor, query_owner: Tensor,
    n_groups: int, k: int,
) -> tuple[Tensor, Tensor]:
    """Per group of queries, the ``k`` other identities with the highest best score.

    ``scores, rows (Q, f)`` are search results of ``Q`` query vectors; query ``q`` belongs
    to group ``query_owner[q]`` whose own identity ``self_pos[q]`` is excluded. Returns the
    identity positions ``(n_groups, k)`` (``-1`` padded) and how many were found per group.
    """
    f = rows.shape[1]
    group = query_owner[:, None].expand(-1, f).reshape(-1)
    own = self_pos[:, None].expand(-1, f).reshape(-1)
    flat_rows, flat_scores = rows.reshape(-1), scores.reshape(-1)
    ident = torch.where(flat_rows >= 0, owner[flat_rows.clamp_min(0)], -1)
    keep = (ident >= 0) & (ident != own)
    group, ident, score = group[keep], ident[keep], flat_scores[keep]
    # best score per (group, identity): sort by score, then (stably) by the pair
    o = torch.argsort(score, descending=True, stable=True)
    group, ident, score = group[o], ident[o], score[o]
    pair = group * (int(owner.max()) + 1) + ident
    o = torch.argsort(pair, stable=True)
    group, ident, score, pair = group[o], ident[o], score[o], pair[o]
    first = torch.ones_like(pair, dtype=torch.bool)
    first[1:] = pair[1:] != pair[:-1]
    group, ident, score = group[first], ident[first], score[first]
    # rank identities within each group by their best score
    o = torch.argsort(score, descending=True, stable=True)
    group, ident = group[o], ident[o]
    o = torch.argsort(group, stable=True)
    group, ident = group[o], ident[o]
    counts = torch.bincount(group, minlength=n_groups)
    rank = torch.arange(group.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                 counts)
    out = torch.full((n_groups, k), -1, dtype=torch.int64)
    take = rank < k
    out[group[take], rank[take]] = ident[take]
    return out, counts.clamp_max(k)


__all__ = ["APPROXIMATE", "BACKENDS", "EmbeddingIndex"]
