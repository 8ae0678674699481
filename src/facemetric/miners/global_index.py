"""Global hard-negative mining: an index of the dataset's embeddings, refreshed every ``N``
steps, that builds P×K batches from identities the model confuses with each other.

A batch miner only sees the negatives its batch happens to hold; with thousands of
identities, a random P×K batch rarely holds two people the model mixes up. Here the whole
dataset is embedded every ``N`` steps, each identity is summarised by its *centroid*

    c_y = normalise( Σ_{i: y_i = y} e_i / ‖e_i‖ )

and each batch is built around a few *seed* identities plus the identities whose centroids
are nearest to theirs (highest cosine ``c_a · c_b``), ``K`` images each. The batch miner and
pair loss then find hard negatives inside the batch (the idea of "smart mining"/doppelganger
batches, e.g. Smirnov et al., *Doppelganger Mining for Face Representation Learning*, 2017).

Scaling: indexing identities rather than images keeps the index at ``C × D`` (100k identities
× 512 floats = 200 MB) however many images there are; ``refresh_from_model`` accumulates the
centroid sums batch by batch, so memory does not grow with the number of images either. A
per-image index (``per_image=True``) is available for smaller sets: an identity's
confusability is then its closest image pair, ``max_{i ∈ a, j ∈ b} ê_i · ê_j``.

Search uses faiss (the optional ``facemetric[index]`` extra): ``IndexFlatIP`` (exact) up to
``approximate_above`` vectors, ``IndexIVFFlat`` or ``IndexHNSWFlat`` (approximate) above. Without
faiss a pure-torch exact search runs instead (chunked matmul + top-k, memory bounded by
``chunk_size²`` scores).

:class:`HardIdentitySampler` is the batch sampler (same contract as ``PKSampler``) and
:class:`IndexRefresher` the hook the training loop calls after each step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from facemetric.data.samplers import (
    batches_per_replica,
    draw_images,
    epoch_generator,
    identity_images,
    shuffled_groups,
)
from facemetric.validation import check_embeddings

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
APPROXIMATE = ("ivf", "hnsw")


def _import_faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _as_labels(labels: Sequence[int] | Tensor | np.ndarray, n: int | None = None) -> Tensor:
    lab = torch.as_tensor(labels)
    if lab.dim() != 1 or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D sequence of integers, got dtype {lab.dtype} and shape "
            f"{tuple(lab.shape)}"
        )
    if n is not None and lab.numel() != n:
        raise ValueError(f"got {lab.numel()} labels for {n} embeddings")
    return lab.to(torch.int64)


# --------------------------------------------------------------------------- the index


class EmbeddingIndex:
    """Nearest-identity search over the dataset's (normalised) embeddings.

    Args:
        per_image: index every image instead of one centroid per identity.
        backend: ``"faiss"``, ``"torch"`` (exact, chunked) or ``"auto"``: the chunked torch
                search while exact search is asked for (measured about 4× faster than faiss's
                flat index on a 2-core CPU), faiss for the approximate indexes if installed.
        approximate_above: with faiss, an index of more vectors than this is approximate
            (``None``: always exact). The torch backend is always exact.
        approximate: ``"ivf"`` (``IndexIVFFlat``: k-means cells, ``nprobe`` visited) or
            ``"hnsw"`` (``IndexHNSWFlat``: graph, ``ef_search`` candidates).
        nlist: IVF cells (default ``√n``, at most ``n/39`` so k-means has data; trained on
            at most ``64·nlist`` vectors).
        nprobe: IVF cells visited per query (default ``max(8, nlist/4)``).
        hnsw_m: HNSW links per node.
        ef_search: HNSW search breadth (raised to ``k`` when smaller).
        chunk_size: rows per block of the torch search (``chunk_size²`` scores in memory).
        fetch_factor: per-image mode fetches ``fetch_factor·(k + 1)`` images per query image
            first, and doubles that for identities still short of ``k`` distinct neighbours.

    Similarities are inner products of unit vectors (cosine). ``refresh`` replaces the
    contents; ``neighbours`` answers in identity labels.
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
        if (nlist is not None and nlist < 1) or (nprobe is not None and nprobe < 1):
            raise ValueError(f"nlist and nprobe must be >= 1, got {nlist}, {nprobe}")
        faiss = _import_faiss()
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
        self._identities = torch.empty(0, dtype=torch.int64)  # sorted labels
        self._vectors = torch.empty(0, 0)
        self._owner = torch.empty(0, dtype=torch.int64)  # identity position of each vector
        self._faiss_index: Any = None
        self.exact = True
        #: seconds the last refresh took, split into ``embed`` (model pass) and ``build``
        self.last_refresh: dict[str, float] = {}

    # ---- contents

    @property
    def ready(self) -> bool:
        """Whether ``refresh`` has filled the index."""
        return self._vectors.shape[0] > 0

    @property
    def backend(self) -> str:
        """``"faiss"`` or ``"torch"``: what searches."""
        return "faiss" if self._faiss_index is not None else "torch"

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
        lab = _as_labels(labels, emb.shape[0])
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        started = time.perf_counter()
        loader = DataLoader(
            _Prepared(dataset, transform), batch_size=batch_size, shuffle=False,
            num_workers=num_workers, generator=torch.Generator(),
        )
        sums = torch.zeros(0, 0)
        counts = torch.zeros(0, dtype=torch.int64)
        chunks: list[Tensor] = []
        all_labels: list[Tensor] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), tqdm(total=len(loader), unit="batch", desc="index",
                                       disable=not progress, leave=False) as bar:
                for images, labels in loader:
                    out = model(images.to(device, non_blocking=True))
                    emb = F.normalize(out.detach().float().cpu(), dim=1)
                    check_embeddings(emb)
                    lab = _as_labels(labels)
                    if self.per_image:
                        chunks.append(emb)
                        all_labels.append(lab)
                    else:
                        sums, counts = _accumulate(sums, counts, emb, lab)
                    bar.update(1)
        finally:
            model.train(was_training)
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
        n, dim = vectors.shape
        self.exact = self.approximate_above is None or n <= self.approximate_above
        if self.exact and not self._exact_with_faiss:
            return
        if self._faiss is None:
            if not self.exact:
                logger.info("faiss is not installed: exact torch search over %d vectors", n)
            self.exact = True
            return
        faiss = self._faiss
        data = vectors.numpy().astype(np.float32, copy=False)
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
        self._faiss_index = index

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
        if self._faiss_index is not None:
            index = self._faiss_index
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = max(self.ef_search, k)
            scores, rows = index.search(q.numpy(), min(k, n))
            scores_t, rows_t = torch.from_numpy(scores), torch.from_numpy(rows).long()
        else:
            scores_t, rows_t = _torch_search(q, self._vectors, min(k, n), self.chunk_size)
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

    def _neighbour_positions(self, pos: Tensor, k: int) -> Tensor:
        """Identity positions ``(len(pos), k)`` of each queried identity's neighbours."""
        n_q, n = pos.numel(), self._vectors.shape[0]
        out = torch.full((n_q, k), -1, dtype=torch.int64)
        if self.per_image:
            order = torch.argsort(self._owner, stable=True)
            counts = torch.bincount(self._owner, minlength=self._identities.numel())
            starts = torch.cumsum(counts, 0) - counts
        fetch = min(n, k + 1 if not self.per_image else self.fetch_factor * (k + 1))
        todo = torch.arange(n_q)
        while todo.numel() > 0:
            if self.per_image:
                c = counts[pos[todo]]
                query_owner = torch.repeat_interleave(torch.arange(todo.numel()), c)
                first = torch.repeat_interleave(starts[pos[todo]], c)
                offset = torch.arange(query_owner.numel()) - torch.repeat_interleave(
                    torch.cumsum(c, 0) - c, c)
                rows_q = order[first + offset]
            else:
                query_owner = torch.arange(todo.numel())
                rows_q = pos[todo]
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


def _torch_search(queries: Tensor, base: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products, ``chunk × chunk`` scores at a time."""
    all_scores, all_rows = [], []
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0 : q0 + chunk]
        best_s = torch.full((q.shape[0], 0), -math.inf)
        best_r = torch.empty((q.shape[0], 0), dtype=torch.int64)
        for b0 in range(0, base.shape[0], chunk):
            s = q @ base[b0 : b0 + chunk].T
            top_s, top_r = torch.topk(s, min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top_s], dim=1)
            cand_r = torch.cat([best_r, top_r + b0], dim=1)
            best_s, idx = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
            best_r = torch.gather(cand_r, 1, idx)
        all_scores.append(best_s)
        all_rows.append(best_r)
    return torch.cat(all_scores), torch.cat(all_rows)


class _Prepared(Dataset):
    """``base[i]`` with an array image passed through ``transform(image, rng_i)``."""

    def __init__(self, base: Dataset, transform: Callable[..., Tensor] | None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        if isinstance(image, np.ndarray):
            if self.transform is None:
                raise ValueError("the dataset yields arrays: pass a transform (eval_transform)")
            image = self.transform(image, np.random.default_rng(index))
        return image, int(label)


# --------------------------------------------------------------------------- the sampler


class HardIdentitySampler(Sampler[list[int]]):
    """P×K batches built around seed identities and the identities they are confused with.

    Every batch starts from ``s = ⌈p / (neighbours + 1)⌉`` *seed* identities; each seed is
    followed by its ``neighbours`` nearest identities (per the last :meth:`use_index`) that
    are not in the batch yet, until the batch has ``p`` identities; any slot left (an
    identity unknown to the index, or none given yet) is filled with identities drawn at
    random. Each identity contributes ``k`` images (as ``PKSampler``: distinct when it has
    ``k``, otherwise all plus repeats); the batch is laid out identity by identity.

    - **Epoch**: the eligible identities (``>= min_images`` images) are shuffled and cut
      into groups of ``s`` seeds, so every identity is a seed once per epoch, and an epoch
      has ``⌈C / s⌉`` batches (``⌊C / s⌋`` with ``drop_last``) whatever the index — about
      ``neighbours + 1`` times as many as ``PKSampler``'s. The seed order is
      ``PKSampler``'s, so with ``neighbours=0`` the identity groups are ``PKSampler``'s.
    - **Before any index**, fills are uniform random: P distinct identities × K images.
    - **Determinism**: batch ``b`` of an epoch depends only on ``(seed, epoch, b)`` and the
      neighbour table in use when it is drawn (saved by :meth:`state_dict`), so a resumed
      run reproduces the batches of an uninterrupted one.
    - **Several processes**: each takes every ``num_replicas``-th batch starting at ``rank``.

    Args:
        labels: identity label of every dataset item.
        p: identities per batch (``>= 2``); k: images per identity (``>= 2``).
        neighbours: identities added per seed (``0 <= neighbours < p``).
        min_images, drop_last, seed, num_replicas, rank: as for ``PKSampler``.
        table_width: neighbours kept per identity by :meth:`use_index` (default
            ``2·neighbours + 2``, the spares replace neighbours already in the batch).
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor | np.ndarray,
        p: int,
        k: int,
        *,
        neighbours: int = 3,
        min_images: int = 2,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        table_width: int | None = None,
    ) -> None:
        super().__init__()
        lab = _as_labels(labels)
        if p < 2 or k < 2:
            raise ValueError(f"need p >= 2 identities and k >= 2 images each, got p={p}, k={k}")
        if not 0 <= neighbours < p:
            raise ValueError(f"neighbours must be in [0, p) = [0, {p}), got {neighbours}")
        if min_images < 1 or seed < 0:
            raise ValueError(f"need min_images >= 1 and seed >= 0, got {min_images}, {seed}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad rank {rank} for num_replicas {num_replicas}")
        # label of identity position i (ascending) and its image indices
        self.identity_labels, self._images, _ = identity_images(lab, min_images)
        if len(self._images) < p:
            raise ValueError(
                f"need at least p={p} identities with >= {min_images} images, got "
                f"{len(self._images)}; lower p or min_images"
            )
        self.p, self.k, self.neighbours = int(p), int(k), int(neighbours)
        self.seeds_per_batch = math.ceil(self.p / (self.neighbours + 1))
        self.table_width = table_width or 2 * self.neighbours + 2
        self.drop_last, self.seed, self.epoch = drop_last, int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self._len = batches_per_replica(len(self._images), self.seeds_per_batch,
                                        self.num_replicas, drop_last)
        self._table: Tensor | None = None  # (C, table_width) identity positions, -1 = none

    @property
    def num_identities(self) -> int:
        """How many identities are eligible."""
        return len(self._images)

    @property
    def batch_size(self) -> int:
        """``p * k``."""
        return self.p * self.k

    @property
    def has_index(self) -> bool:
        """Whether a neighbour table is in use (``use_index`` was called)."""
        return self._table is not None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next ``iter()`` produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return self._len

    def use_index(self, index: EmbeddingIndex) -> None:
        """Take each identity's nearest identities from ``index`` for the batches drawn from
        now on. Identities the index lacks get random company; neighbours that are not
        eligible here are skipped."""
        known = torch.isin(self.identity_labels, index.identities)
        table = torch.full((self.num_identities, self.table_width), -1, dtype=torch.int64)
        if bool(known.any()):
            found = index.neighbours(self.identity_labels[known], self.table_width)
            pos = torch.searchsorted(self.identity_labels, found.clamp_min(0))
            pos = pos.clamp_max(self.num_identities - 1)
            ok = (found >= 0) & (self.identity_labels[pos] == found)
            table[known] = torch.where(ok, pos, -1)
        self._table = table

    def state_dict(self) -> dict[str, Any]:
        """The neighbour table in use (what a checkpoint needs to resume exactly)."""
        return {"identity_labels": self.identity_labels.clone(),
                "table": None if self._table is None else self._table.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same labels and ``min_images`` required)."""
        if not torch.equal(state["identity_labels"], self.identity_labels):
            raise ValueError("the saved sampler state is for other identities")
        table = state["table"]
        self._table = None if table is None else table.clone()

    def _seed_groups(self) -> list[list[int]]:
        """All processes' seed groups of this epoch (the ``PKSampler`` shuffle, ``s`` each)."""
        return shuffled_groups(self.num_identities, self.seeds_per_batch,
                               self._len * self.num_replicas,
                               epoch_generator(self.seed, self.epoch, 0), self.drop_last)

    def plan(self) -> Iterator[tuple[list[int], list[int]]]:
        """This process's batches of the epoch as ``(seed labels, identity labels)``,
        without drawing images (``__iter__`` draws ``k`` images for each identity)."""
        labels = self.identity_labels.tolist()
        for seeds, identities, _ in self._batches():
            yield [labels[i] for i in seeds], [labels[i] for i in identities]

    def _batches(self) -> Iterator[tuple[list[int], list[int], int]]:
        groups = self._seed_groups()
        for b in range(self.rank, len(groups), self.num_replicas):
            yield groups[b], self._fill(groups[b], b), b

    def _fill(self, seeds: list[int], batch: int) -> list[int]:
        """``p`` distinct identity positions: each seed, then its nearest not yet taken."""
        chosen: list[int] = []
        taken: set[int] = set()
        table = self._table
        for s in seeds:
            if len(chosen) == self.p:
                break
            added = 0
            if s not in taken:
                chosen.append(s)
                taken.add(s)
                added = 1
            if table is None:
                continue
            for nb in table[s].tolist():
                if added == self.neighbours + 1 or len(chosen) == self.p:
                    break
                if nb >= 0 and nb not in taken:
                    chosen.append(nb)
                    taken.add(nb)
                    added += 1
        if len(chosen) < self.p:
            gen = epoch_generator(self.seed, self.epoch, 0xF111, batch)
            for cand in torch.randperm(self.num_identities, generator=gen).tolist():
                if cand not in taken:
                    chosen.append(cand)
                    taken.add(cand)
                    if len(chosen) == self.p:
                        break
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        for _, identities, b in self._batches():
            gen = epoch_generator(self.seed, self.epoch, 0x1A6E, b)
            batch: list[int] = []
            for identity in identities:
                batch.extend(self._draw(self._images[identity], gen))
            yield batch

    def _draw(self, images: Tensor, gen: torch.Generator) -> list[int]:
        return draw_images(images, self.k, gen)


# --------------------------------------------------------------------------- the hook


class IndexRefresher:
    """Re-embeds the dataset every ``every`` steps and hands the index to the sampler.

    The training loop calls ``refresher(model, step)`` after each optimiser step; the
    seconds each refresh took are returned (so the loop can keep them out of its
    throughput) and kept in :attr:`history` as ``(step, seconds)``.
    """

    def __init__(
        self,
        index: EmbeddingIndex,
        sampler: HardIdentitySampler,
        dataset: Dataset,
        *,
        every: int,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        transform: Callable[[np.ndarray, np.random.Generator], Tensor] | None = None,
        num_workers: int = 0,
        progress: bool = False,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.index, self.sampler, self.dataset = index, sampler, dataset
        self.every, self.batch_size, self.device = int(every), int(batch_size), device
        self.transform, self.num_workers, self.progress = transform, num_workers, progress
        self.history: list[tuple[int, float]] = []

    def due(self, step: int) -> bool:
        """Whether the index is refreshed after optimiser step ``step``."""
        return step > 0 and step % self.every == 0

    def refresh(self, model: nn.Module, step: int) -> float:
        """Embed, index and update the sampler now; returns the seconds it took."""
        started = time.perf_counter()
        self.index.refresh_from_model(
            model, self.dataset, batch_size=self.batch_size, device=self.device,
            transform=self.transform, num_workers=self.num_workers, progress=self.progress,
        )
        search_started = time.perf_counter()
        self.sampler.use_index(self.index)
        seconds = time.perf_counter() - started
        self.history.append((step, seconds))
        timing = self.index.last_refresh
        logger.info(
            "step %d: hard-identity index refreshed in %.2f s (embed %.2f s, build %.2f s, "
            "neighbours %.2f s; %d vectors, %s%s)", step, seconds, timing.get("embed", 0.0),
            timing.get("build", 0.0), time.perf_counter() - search_started,
            self.index.vectors.shape[0], self.index.backend,
            "" if self.index.exact else f" {self.index.approximate}",
        )
        return seconds

    def __call__(self, model: nn.Module, step: int) -> float | None:
        """Refresh if ``due(step)``; the seconds taken, or ``None``."""
        return self.refresh(model, step) if self.due(step) else None


__all__ = ["EmbeddingIndex", "HardIdentitySampler", "IndexRefresher"]
