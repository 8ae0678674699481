"""The gallery's template index: unit templates with template ids and owner (person) ids,
searched for the best templates or the best persons of each probe.

The gallery (a SQLite store) is the record; this index is a cache it refills with
:meth:`TemplateIndex.add` when it opens, so nothing here is persisted.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facemetric.index._search import (
    DEFAULT_BLOCK_BYTES,
    Rows,
    as_int64,
    as_matrix,
    cell_ranks,
    exact_topk,
    nearest_cells,
    require_faiss,
    smallest_nprobe,
    spherical_kmeans,
    tensor_rows,
    unit_rows,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
APPROXIMATE = ("hnsw", "ivf")
MODES = ("max", "mean")

_GROWTH = 1.5  # capacity factor when the preallocated rows run out
_MIN_CAPACITY = 1024
_TRAIN_PER_CELL = 32  # IVF k-means trains on this many templates per cell
_TUNE_QUERIES = 1000  # stored templates used as queries to tune the IVF nprobe
_IVF_RETRAIN_GROWTH = 4  # retrain the IVF cells once the index is this many times larger
_IVF_LABEL_SLACK = 4  # re-add IVF contents when labels issued exceed this × live templates


class Hits(NamedTuple):
    """Search answer, best first; unpacks as ``scores, ids = index.search(...)``.

    ``scores (Q, w)`` float32 cosines and ``ids (Q, w)`` int64 (template or owner ids), where
    ``w = min(k, available)``; an approximate search that found fewer for a query pads its
    row with ``-inf`` / ``-1``.
    """

    scores: Tensor
    ids: Tensor


class TemplateIndex:
    """Unit templates of ``dim`` floats with int64 template ids and int64 owner (person) ids.

    **Similarity.** Templates and queries are L2-normalised; a template ``t`` scores
    ``cos(q, t) = q̂ · t̂`` (computed from the stored, possibly compact, ``t̂``).
    :meth:`search_owners` scores a person ``p`` with templates ``T_p`` by

    - ``mode="max"``: ``max_{t ∈ T_p} q̂ · t̂`` (the person's best template), or
    - ``mode="mean"``: ``q̂ · normalise(Σ_{t ∈ T_p} t̂)`` (the normalised mean template; the
      sums are kept per person and updated on every add/remove).

    **Storage.** Rows live in one preallocated matrix (grown by ×1.5 when full) with an
    id → row map. ``dtype``: ``"float32"`` (4·D bytes a template), ``"float16"`` (2·D) or
    ``"int8"`` (D + 4: symmetric per-template scale ``s = max_i |t̂_i| / 127``, codes
    ``round(t̂ / s)``, decoded as ``s·code``); see :attr:`bytes_per_template`.

    **Updates without rebuilds.** :meth:`add` appends rows; :meth:`remove` moves the last
    rows into the holes (swap-with-last), so rows stay dense in ``[0, len)`` and a removal
    costs ``O(removed · D)``; the per-person counts and sums are decremented.

    **Exact search** (default): blocks of ``Q·Gᵀ`` by ``torch.mm`` in float32 (compact rows
    are decoded one block at a time into one scratch block), each block's top-``k`` kept and
    merged; one block of scores (plus decoded rows) never exceeds ``max_block_bytes``. Persons by
    ``max`` are the first ``k`` distinct owners of the top-``T`` templates, which is exact
    once ``T`` holds ``k`` distinct owners — guaranteed at ``T = k · (most templates of one
    person)``; ``T`` starts at ``min(that, max(fetch_factor·k, 256))`` and doubles for the
    queries still short. Persons by ``mean`` are an exact search of the mean templates.

    **Approximate search** (``approximate="hnsw"`` or ``"ivf"``, used while ``len(index) >
    approximate_above``; needs faiss): HNSW (Malkov & Yashunin, *Efficient and robust
    approximate nearest neighbor search using Hierarchical Navigable Small World graphs*,
    TPAMI 2018) or an inverted file (Jégou et al., *Product Quantization for Nearest Neighbor
    Search*, TPAMI 2011) propose candidate templates, which are then rescored from the
    stored rows. The faiss index stores the vectors in the storage's precision (flat, or
    scalar-quantised fp16/8-bit), is built on the first search that needs it and then
    follows every add. HNSW cannot delete: removed templates become tombstones, filtered
    out of each answer (the search over-fetches by ``total / live`` and refetches queries
    left short), and the graph is rebuilt once tombstones exceed ``rebuild_fraction`` of it.
    IVF deletes in place (``remove_ids``); its cells come from spherical k-means, and its
    ``nprobe`` (unless given) is the smallest whose recall@``tune_k``, measured with 1,000
    stored templates as queries (themselves excluded) against exact search, reaches
    ``target_recall``. The default ``tune_k = 1`` asks that a template's nearest other
    template — for a gallery, usually the same person's — be found: recall@10 over
    templates would also demand the 6th–10th neighbours of a 5-template person, which are
    near-random strangers and would need nearly every cell probed. The IVF cells are
    retrained once the index has grown 4× since, and the contents re-added once the labels
    handed out (one per add) exceed 4× the templates. Persons are aggregated from the
    over-fetched candidates (``mean``: candidate persons rescored by their mean template).

    **Empty index / small ``k``.** With no templates every search returns ``(Q, 0)``
    tensors; asking for more templates or persons than exist returns all there are.

    Not thread-safe: guard it with a lock if several threads add, remove and search.

    Args:
        dim: template length ``D``.
        dtype: ``"float32"``, ``"float16"`` or ``"int8"``.
        approximate: ``None`` (always exact), ``"hnsw"`` or ``"ivf"``.
        approximate_above: the approximate index is used while there are more templates.
        track_means: keep per-person sums and means (``2·D`` float32 a person) for
            ``mode="mean"``.
        hnsw_m, ef_construction, ef_search: HNSW links per node, build and search breadth.
        nlist, nprobe: IVF cells (default ``2·√n``, at most ``n/32``) and cells probed.
        target_recall, tune_k: the recall@``tune_k`` the IVF ``nprobe`` is tuned to.
        rebuild_fraction: HNSW tombstone share that triggers a rebuild.
        fetch_factor: persons' first fetch is ``fetch_factor·k`` templates (at least 256).
        max_block_bytes: bound on one block of scores (and decoded rows) in memory.
        seed: k-means and sampling seed.
    """

    def __init__(
        self,
        dim: int,
        *,
        dtype: str = "float32",
        approximate: str | None = None,
        approximate_above: int = 0,
        track_means: bool = True,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int | None = None,
        target_recall: float = 0.95,
        tune_k: int = 1,
        rebuild_fraction: float = 0.25,
        fetch_factor: int = 4,
        max_block_bytes: int = DEFAULT_BLOCK_BYTES,
        seed: int = 0,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if approximate is not None and approximate not in APPROXIMATE:
            raise ValueError(f"approximate must be None or one of {APPROXIMATE}, "
                             f"got {approximate!r}")
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search), ("fetch_factor", fetch_factor),
                            ("tune_k", tune_k)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if approximate_above < 0:
            raise ValueError(f"approximate_above must be >= 0, got {approximate_above}")
        if (nlist is not None and nlist < 1) or (nprobe is not None and nprobe < 1):
            raise ValueError(f"nlist and nprobe must be >= 1, got {nlist}, {nprobe}")
        if not 0 < target_recall <= 1 or not 0 < rebuild_fraction < 1:
            raise ValueError(f"need 0 < target_recall <= 1 and 0 < rebuild_fraction < 1, got "
                             f"{target_recall}, {rebuild_fraction}")
        if max_block_bytes < 4 * (dim + 1):
            raise ValueError(f"max_block_bytes must hold one decoded row and its score "
                             f"(>= {4 * (dim + 1)}), got {max_block_bytes}")
        self._faiss = require_faiss(f"approximate={approximate!r}") if approximate else None
        self.dim, self.dtype = int(dim), dtype
        self.approximate, self.approximate_above = approximate, int(approximate_above)
        self.track_means = track_means
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe = nlist, nprobe
        self.target_recall, self.tune_k = target_recall, tune_k
        self.rebuild_fraction, self.fetch_factor = rebuild_fraction, fetch_factor
        self.max_block_bytes, self.seed = int(max_block_bytes), int(seed)
        self.clear()

    # ------------------------------------------------------------------ contents

    def clear(self) -> None:
        """Remove every template and person and free the memory (the options stay)."""
        self._n = 0
        self._data = torch.empty(0, self.dim, dtype=DTYPES[self.dtype])
        self._scale = torch.empty(0)  # int8 only
        self._ids = torch.empty(0, dtype=torch.int64)
        self._slot = torch.empty(0, dtype=torch.int64)  # owner slot of each row
        self._row_of: dict[int, int] = {}
        # owners: dense slots, reused once a person has no template left
        self._slot_of: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._n_slots = 0
        self._slot_owner = torch.empty(0, dtype=torch.int64)
        self._counts = torch.empty(0, dtype=torch.int64)
        self._sums = torch.empty(0, self.dim)
        self._means = torch.empty(0, self.dim)
        self._dirty = torch.empty(0, dtype=torch.bool)
        self._drop_ann()

    def __len__(self) -> int:
        """How many templates are indexed."""
        return self._n

    def __contains__(self, template_id: object) -> bool:
        return isinstance(template_id, int | np.integer) and int(template_id) in self._row_of

    @property
    def num_owners(self) -> int:
        """How many persons have at least one template."""
        return len(self._slot_of)

    @property
    def ids(self) -> Tensor:
        """Template ids ``(len,)`` in storage order (a copy)."""
        return self._ids[: self._n].clone()

    @property
    def owners(self) -> Tensor:
        """Owner id of each template ``(len,)``, in the order of :attr:`ids`."""
        return self._slot_owner[self._slot[: self._n]]

    def vectors(self, ids: Any) -> Tensor:
        """The stored unit templates ``(m, D)`` float32 of template ``ids (m,)`` (decoded
        from the storage dtype).

        Raises:
            ValueError: an id that is not indexed.
        """
        wanted = as_int64(ids, "ids").tolist()
        rows = torch.tensor(list(map(self._row_of.get, wanted, repeat(-1))), dtype=torch.int64)
        if bool((rows < 0).any()):
            lost = [w for w, r in zip(wanted, rows.tolist(), strict=True) if r < 0]
            raise ValueError(f"template ids not in the index: {lost[:10]} ({len(lost)} in all)")
        return self._decode_rows(rows)

    @property
    def bytes_per_template(self) -> int:
        """Bytes of one stored template vector (``+ 4`` for the int8 scale). On top come
        24 bytes of tensors (id, owner slot, faiss label), the id → row ``dict`` (about 100
        bytes of Python objects a template), and the faiss index when there is one."""
        size = self._data.element_size() * self.dim
        return size + 4 if self.dtype == "int8" else size

    @property
    def nbytes(self) -> int:
        """Bytes allocated by this index's own tensors (capacity included, faiss not)."""
        own = [self._data, self._scale, self._ids, self._slot, self._slot_owner, self._counts,
               self._sums, self._means, self._dirty, self._row_label, self._label_row]
        return sum(t.numel() * t.element_size() for t in own)

    @property
    def uses_approximate(self) -> bool:
        """Whether searches go through the faiss index now."""
        return self.approximate is not None and self._n > self.approximate_above

    @property
    def approximate_total(self) -> int:
        """Vectors the faiss index holds, HNSW tombstones included (0 before it is built)."""
        return 0 if self._ann is None else int(self._ann.ntotal)

    def build_approximate(self) -> None:
        """Build (or rebuild when stale) the faiss index now instead of at the first search
        that needs it, e.g. right after a gallery reload.

        Raises:
            ValueError: the index was made without ``approximate`` or is empty.
        """
        if self.approximate is None or self._n == 0:
            raise ValueError("nothing to build: the index has no approximate backend "
                             "(approximate=None) or no templates")
        self._ensure_ann()

    def reserve(self, capacity: int) -> None:
        """Preallocate rows for ``capacity`` templates (e.g. before a gallery reload)."""
        self._reserve(int(capacity))

    # ------------------------------------------------------------------ add / remove

    def add(self, ids: Any, owners: Any, vectors: Tensor | np.ndarray) -> None:
        """Index ``vectors (m, D)`` as templates ``ids (m,)`` of persons ``owners (m,)``.

        Vectors are L2-normalised and stored in :attr:`dtype`. Nothing is changed when an
        argument is refused.

        Raises:
            ValueError: bad shapes, NaN/Inf or all-zero vectors, ids repeated in the call or
                already indexed (remove them first).
        """
        x = as_matrix(vectors, self.dim, "vectors")
        m = x.shape[0]
        tid = as_int64(ids, "ids", m)
        own = as_int64(owners, "owners", m)
        if m == 0:
            return
        id_list = tid.tolist()
        fresh = set(id_list)
        if len(fresh) != m:
            raise ValueError(f"ids repeat within this add ({m - len(fresh)} duplicates); "
                             "each template needs its own id")
        clash = self._row_of.keys() & fresh
        if clash:
            raise ValueError(f"template ids already in the index: {sorted(clash)[:10]} "
                             f"({len(clash)} in all); remove them first or use new ids")
        codes, scale = self._encode(unit_rows(x, "vectors"))
        r0, r1 = self._n, self._n + m
        self._reserve(r1)
        slots = self._owner_slots(own)
        self._data[r0:r1] = codes
        if scale is not None:
            self._scale[r0:r1] = scale
        self._ids[r0:r1] = tid
        self._slot[r0:r1] = slots
        self._counts.index_add_(0, slots, torch.ones(m, dtype=torch.int64))
        if self.track_means:
            self._sums.index_add_(0, slots, self._decode(r0, r1))
            self._dirty[slots] = True
        self._row_of.update(zip(id_list, range(r0, r1), strict=True))
        self._n = r1
        if self._ann is not None:
            self._ann_add(r0, r1)

    def remove(self, ids: Any, *, missing_ok: bool = False) -> int:
        """Remove the templates ``ids``; returns how many were removed.

        Raises:
            ValueError: an id that is not indexed (unless ``missing_ok``); then nothing is
                removed.
        """
        wanted = list(dict.fromkeys(as_int64(ids, "ids").tolist()))  # unique, in order
        rows = torch.tensor(list(map(self._row_of.get, wanted, repeat(-1))), dtype=torch.int64)
        missing = rows < 0
        if bool(missing.any()) and not missing_ok:
            lost = torch.tensor(wanted)[missing]
            raise ValueError(f"template ids not in the index: {lost[:10].tolist()} "
                             f"({lost.numel()} in all); pass missing_ok=True to skip them")
        return self._remove_rows(rows[~missing])

    def remove_owner(self, owner: int) -> int:
        """Remove every template of person ``owner``; returns how many (0: unknown owner)."""
        slot = self._slot_of.get(int(owner))
        if slot is None:
            return 0
        return self._remove_rows((self._slot[: self._n] == slot).nonzero().flatten())

    # ------------------------------------------------------------------ search

    def search(self, queries: Tensor | np.ndarray, k: int) -> Hits:
        """The ``k`` templates of highest cosine to each query ``(Q, D)``: template ids."""
        q = self._queries(queries, k)
        width = min(k, self._n)
        if width == 0:
            return _empty(q.shape[0])
        scores, rows = self._templates(q, width)
        return Hits(scores, torch.where(rows >= 0, self._ids[rows.clamp_min(0)], -1))

    def search_owners(self, queries: Tensor | np.ndarray, k: int, mode: str = "max") -> Hits:
        """The ``k`` persons of highest score to each query ``(Q, D)``: owner ids.

        ``mode="max"``: a person's best template; ``"mean"``: their normalised mean
        template (needs ``track_means``). See the class docstring for the exact and
        approximate algorithms.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "mean" and not self.track_means:
            raise ValueError("mode='mean' needs the per-person sums: build the index with "
                             "track_means=True")
        q = self._queries(queries, k)
        width = min(k, self.num_owners)
        if width == 0:
            return _empty(q.shape[0])
        if mode == "mean":
            self._refresh_means()
            if not self.uses_approximate:
                scores, slots = exact_topk(
                    tensor_rows(q), q.shape[0], tensor_rows(self._means), self._n_slots,
                    width, dim=self.dim, base_copies=False,
                    max_block_bytes=self.max_block_bytes, dead=self._counts == 0)
                return Hits(scores, torch.where(slots >= 0,
                                                self._slot_owner[slots.clamp_min(0)], -1))
        most = int(self._counts[: self._n_slots].max())
        cap = min(self._n, width * most)  # this many templates hold `width` persons
        fetch = min(cap, max(self.fetch_factor * width, 256))
        scores = slots = torch.empty(0)
        todo: Tensor | None = None  # None: every query (no gathers on the first pass)
        while True:
            asked = q if todo is None else q[todo]
            t_scores, t_rows = self._templates(asked, fetch)
            t_slots = torch.where(t_rows >= 0, self._slot[t_rows.clamp_min(0)], -1)
            if mode == "max":
                got_s, got_p, found = first_distinct(t_scores, t_slots, width)
            else:
                got_s, got_p, found = self._score_means(asked, t_slots, width)
            if todo is None:
                scores, slots = got_s, got_p
                todo = torch.arange(q.shape[0])
            else:
                scores[todo], slots[todo] = got_s, got_p
            short = found < width
            if fetch >= cap or not bool(short.any()):
                break
            todo, fetch = todo[short], min(cap, 2 * fetch)
        return Hits(scores, torch.where(slots >= 0, self._slot_owner[slots.clamp_min(0)], -1))

    # ------------------------------------------------------------------ internals: storage

    def _encode(self, unit: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.dtype == "int8":
            scale = unit.abs().amax(dim=1) / 127.0
            codes = torch.round(unit / scale.unsqueeze(1)).clamp_(-127, 127)
            return codes.to(torch.int8), scale
        return unit.to(DTYPES[self.dtype]), None

    def _decode(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` as float32 (a view for float32 storage)."""
        data = self._data[start:stop]
        if self.dtype == "float32":
            return data
        if self.dtype == "float16":
            return data.float()
        return data.float().mul_(self._scale[start:stop].unsqueeze(1))

    def _block_reader(self) -> Rows:
        """Like :meth:`_decode`, but compact rows are decoded into one scratch block reused
        from call to call (each result is only valid until the next call)."""
        if self.dtype == "float32":
            return self._decode
        scratch: list[Tensor] = []

        def read(start: int, stop: int) -> Tensor:
            if not scratch or scratch[0].shape[0] < stop - start:
                scratch[:] = [torch.empty(stop - start, self.dim)]
            out = scratch[0][: stop - start]
            out.copy_(self._data[start:stop])
            if self.dtype == "int8":
                out.mul_(self._scale[start:stop].unsqueeze(1))
            return out

        return read

    def _decode_rows(self, rows: Tensor) -> Tensor:
        data = self._data.index_select(0, rows)
        if self.dtype == "int8":
            return data.float().mul_(self._scale.index_select(0, rows).unsqueeze(1))
        return data.float()

    def _reserve(self, rows: int) -> None:
        cap = self._data.shape[0]
        if rows <= cap:
            return
        new = max(rows, math.ceil(cap * _GROWTH), _MIN_CAPACITY)
        n = self._n
        self._data = _grown(self._data, new, n)
        self._ids = _grown(self._ids, new, n)
        self._slot = _grown(self._slot, new, n)
        self._row_label = _grown(self._row_label, new, n)
        if self.dtype == "int8":
            self._scale = _grown(self._scale, new, n)

    def _owner_slots(self, owners: Tensor) -> Tensor:
        """Slot of each owner, new persons taking free slots first."""
        distinct, inverse = torch.unique(owners, return_inverse=True)
        found = torch.tensor(list(map(self._slot_of.get, distinct.tolist(), repeat(-1))),
                             dtype=torch.int64)
        new = (found < 0).nonzero().flatten()
        if new.numel():
            reuse = [self._free_slots.pop() for _ in range(min(new.numel(),
                                                                len(self._free_slots)))]
            start = self._n_slots
            fresh = torch.cat([torch.tensor(reuse, dtype=torch.int64),
                               torch.arange(start, start + new.numel() - len(reuse))])
            self._n_slots = start + new.numel() - len(reuse)
            self._reserve_slots(self._n_slots)
            found[new] = fresh
            self._slot_owner[fresh] = distinct[new]
            self._slot_of.update(zip(distinct[new].tolist(), fresh.tolist(), strict=True))
        return found[inverse]

    def _reserve_slots(self, slots: int) -> None:
        cap = self._counts.shape[0]
        if slots <= cap:
            return
        new = max(slots, math.ceil(cap * _GROWTH), _MIN_CAPACITY)
        used = self._n_slots
        self._slot_owner = _grown(self._slot_owner, new, used)
        self._counts = _grown(self._counts, new, used, zero=True)
        self._dirty = _grown(self._dirty, new, used, zero=True)
        if self.track_means:
            self._sums = _grown(self._sums, new, used, zero=True)
            self._means = _grown(self._means, new, used, zero=True)

    def _remove_rows(self, rows: Tensor) -> int:
        """Remove the live ``rows`` (distinct): per-person bookkeeping, then swap-with-last."""
        r = rows.numel()
        if r == 0:
            return 0
        slots = self._slot[rows]
        self._counts.index_add_(0, slots, torch.full((r,), -1, dtype=torch.int64))
        if self.track_means:
            self._sums.index_add_(0, slots, self._decode_rows(rows), alpha=-1)
            self._dirty[slots] = True
        emptied = torch.unique(slots[self._counts[slots] == 0])
        if emptied.numel():
            if self.track_means:
                self._sums[emptied] = 0.0  # exact zero: no drift carried to the next owner
            deque(map(self._slot_of.pop, self._slot_owner[emptied].tolist()), maxlen=0)
            self._free_slots.extend(emptied.tolist())
        if self._ann is not None:
            labels = self._row_label[rows]
            self._label_row[labels] = -1
            if self.approximate == "ivf":
                self._ann.remove_ids(labels.numpy())
        deque(map(self._row_of.pop, self._ids[rows].tolist()), maxlen=0)
        # swap-with-last: the surviving rows of the tail fill the holes below the new end
        n, end = self._n, self._n - r
        tail = torch.arange(end, n)
        movers = tail[~torch.isin(tail, rows)]
        holes = torch.sort(rows[rows < end]).values
        if holes.numel():
            self._data[holes] = self._data[movers]
            self._ids[holes] = self._ids[movers]
            self._slot[holes] = self._slot[movers]
            self._row_label[holes] = self._row_label[movers]
            if self.dtype == "int8":
                self._scale[holes] = self._scale[movers]
            self._row_of.update(zip(self._ids[holes].tolist(), holes.tolist(), strict=True))
            if self._ann is not None:
                self._label_row[self._row_label[holes]] = holes
        self._n = end
        return r

    def _refresh_means(self) -> None:
        dirty = self._dirty[: self._n_slots].nonzero().flatten()
        if dirty.numel():
            self._means[dirty] = F.normalize(self._sums[dirty], dim=1)
            self._dirty[dirty] = False

    # ------------------------------------------------------------------ internals: search

    def _queries(self, queries: Tensor | np.ndarray, k: int) -> Tensor:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return unit_rows(as_matrix(queries, self.dim, "queries"), "queries")

    def _templates(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, rows)`` of the queries, exact or approximate (rescored)."""
        if not self.uses_approximate:
            return exact_topk(tensor_rows(q), q.shape[0], self._block_reader(), self._n, k,
                              dim=self.dim, base_copies=self.dtype != "float32",
                              max_block_bytes=self.max_block_bytes)
        self._ensure_ann()
        rows = self._ann_rows(q, k)
        return self._rescore(q, rows)

    def _rescore(self, q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Exact cosines of the candidate ``rows (Q, T)`` (``-1`` = none), sorted."""
        n_q, t = rows.shape
        scores = torch.full((n_q, t), -math.inf)
        step = max(1, self.max_block_bytes // (4 * max(1, t) * (self.dim + 1)))
        for q0 in range(0, n_q, step):
            r = rows[q0 : q0 + step]
            cand = self._decode_rows(r.clamp_min(0).reshape(-1)).view(r.shape[0], t, self.dim)
            s = torch.bmm(cand, q[q0 : q0 + step].unsqueeze(2)).squeeze(2)
            scores[q0 : q0 + step] = s.masked_fill_(r < 0, -math.inf)
        scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
        return scores, torch.gather(rows, 1, order)

    def _score_means(self, q: Tensor, slots: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``k`` of the distinct candidate persons ``slots (Q, T)`` by mean template."""
        zeros = torch.zeros(slots.shape)
        _, cand, found = first_distinct(zeros, slots, slots.shape[1])
        n_q, t = cand.shape
        scores = torch.full((n_q, t), -math.inf)
        step = max(1, self.max_block_bytes // (4 * max(1, t) * (self.dim + 1)))
        for q0 in range(0, n_q, step):
            c = cand[q0 : q0 + step]
            means = self._means.index_select(0, c.clamp_min(0).reshape(-1))
            s = torch.bmm(means.view(c.shape[0], t, self.dim), q[q0 : q0 + step].unsqueeze(2))
            scores[q0 : q0 + step] = s.squeeze(2).masked_fill_(c < 0, -math.inf)
        width = min(k, t)
        top, pick = torch.topk(scores, width, dim=1)
        best = torch.gather(cand, 1, pick)
        best[top == -math.inf] = -1
        out_s = torch.full((n_q, k), -math.inf)
        out_p = torch.full((n_q, k), -1, dtype=torch.int64)
        out_s[:, :width], out_p[:, :width] = top, best
        return out_s, out_p, found.clamp_max(k)

    # ------------------------------------------------------------------ internals: faiss

    def _drop_ann(self) -> None:
        self._ann: Any = None
        self._row_label = torch.empty(self._data.shape[0], dtype=torch.int64)
        self._label_row = torch.empty(0, dtype=torch.int64)
        self._next_label = 0
        self._ann_trained_on = 0

    def _ensure_ann(self) -> None:
        """Build the faiss index, or rebuild it when tombstones/labels/size call for it."""
        if self._ann is not None:
            dead = self._next_label - self._n
            if self.approximate == "hnsw":
                stale = dead > self.rebuild_fraction * self._next_label
            else:
                stale = (self._next_label > _IVF_LABEL_SLACK * max(self._n, _MIN_CAPACITY)
                         or self._n > _IVF_RETRAIN_GROWTH * self._ann_trained_on)
            if not stale:
                return
        self._build_ann()

    def _build_ann(self) -> None:
        faiss = self._faiss
        n, dim = self._n, self.dim
        gen = torch.Generator().manual_seed(self.seed)
        metric = faiss.METRIC_INNER_PRODUCT
        qtype = {"float16": faiss.ScalarQuantizer.QT_fp16,
                 "int8": faiss.ScalarQuantizer.QT_8bit}.get(self.dtype)
        if self.approximate == "hnsw":
            index = (faiss.IndexHNSWFlat(dim, self.hnsw_m, metric) if qtype is None
                     else faiss.IndexHNSWSQ(dim, qtype, self.hnsw_m, metric))
            index.hnsw.efConstruction = self.ef_construction
            if qtype is not None:
                pick = torch.randperm(n, generator=gen)[: 64 * 1024]
                index.train(self._decode_rows(pick).numpy())
        else:
            cells = max(1, min(self.nlist or round(2 * math.sqrt(n)), n // _TRAIN_PER_CELL))
            pick = torch.sort(torch.randperm(n, generator=gen)[: _TRAIN_PER_CELL * cells]).values
            sample = self._decode_rows(pick)
            centroids = spherical_kmeans(sample, cells, seed=self.seed,
                                         max_block_bytes=self.max_block_bytes)
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(centroids.numpy())
            index = (faiss.IndexIVFFlat(quantizer, dim, cells, metric) if qtype is None
                     else faiss.IndexIVFScalarQuantizer(quantizer, dim, cells, qtype, metric))
            index.train(sample.numpy())  # the quantizer is trained: only the codec learns
            index.nprobe = min(cells, self.nprobe or self._tune_nprobe(centroids, gen))
            self._quantizer = quantizer  # faiss does not own it: keep it alive
            self._ann_trained_on = n
        self._ann = index
        self._label_row = torch.empty(0, dtype=torch.int64)
        self._next_label = 0
        step = max(1, self.max_block_bytes // (4 * dim))
        for r0 in range(0, n, step):
            self._ann_add(r0, min(n, r0 + step))

    def _tune_nprobe(self, centroids: Tensor, gen: torch.Generator) -> int:
        """Smallest nprobe whose recall@``tune_k`` on stored templates (as queries, themselves
        excluded) reaches ``target_recall`` (see :func:`facemetric.index.knn_table`)."""
        n = self._n
        k = min(self.tune_k, n - 1)
        if k < 1:
            return 1
        picked = torch.randperm(n, generator=gen)[:_TUNE_QUERIES]
        queries = self._decode_rows(picked)
        _, truth = exact_topk(tensor_rows(queries), picked.numel(), self._decode, n, k,
                              dim=self.dim, base_copies=self.dtype != "float32",
                              max_block_bytes=self.max_block_bytes, self_rows=picked)
        found = self._decode_rows(truth.clamp_min(0).reshape(-1))
        home = nearest_cells(tensor_rows(found), truth.numel(), centroids, 1,
                             max_block_bytes=self.max_block_bytes).view_as(truth)
        ranks = torch.gather(cell_ranks(queries, centroids), 1, home)
        return smallest_nprobe(torch.where(truth >= 0, ranks, -1), self.target_recall,
                               centroids.shape[0])

    def _ann_add(self, r0: int, r1: int) -> None:
        m = r1 - r0
        labels = torch.arange(self._next_label, self._next_label + m)
        need = self._next_label + m
        if self._label_row.numel() < need:
            self._label_row = _grown(self._label_row, max(need, math.ceil(
                self._label_row.numel() * _GROWTH), _MIN_CAPACITY), self._next_label)
        self._label_row[labels] = torch.arange(r0, r1)
        self._row_label[r0:r1] = labels
        data = np.ascontiguousarray(self._decode(r0, r1).numpy())
        if self.approximate == "hnsw":
            self._ann.add(data)  # HNSW numbers vectors 0, 1, 2 … in order: our labels
        else:
            self._ann.add_with_ids(data, labels.numpy())
        self._next_label = need

    def _ann_rows(self, q: Tensor, want: int) -> Tensor:
        """Rows ``(Q, want)`` of the approximate top-``want`` (``-1`` pads), tombstones out."""
        n_q = q.shape[0]
        total = max(1, self._ann.ntotal)
        out = torch.full((n_q, want), -1, dtype=torch.int64)
        slack = 8 if total > self._n else 0  # tombstones: a few spare candidates
        base = min(total, math.ceil(want * total / max(1, self._n)) + slack)
        step = max(1, self.max_block_bytes // (16 * base))
        nprobe0 = getattr(self._ann, "nprobe", 0)
        for q0 in range(0, n_q, step):
            todo = torch.arange(q0, min(n_q, q0 + step))
            fetch = base
            while todo.numel():
                if self.approximate == "hnsw":
                    self._ann.hnsw.efSearch = max(self.ef_search, fetch)
                _, labels = self._ann.search(q[todo].numpy(), fetch)
                lab = torch.from_numpy(labels)
                rows = torch.where(lab >= 0, self._label_row[lab.clamp_min(0)], -1)
                valid = rows >= 0
                order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
                rows = torch.gather(rows, 1, order)[:, :want]
                out[todo, : rows.shape[1]] = rows
                short = valid.sum(dim=1) < min(want, self._n)
                more_probes = self.approximate == "ivf" and self._ann.nprobe < self._ann.nlist
                if not bool(short.any()) or (fetch >= total and not more_probes):
                    break
                todo, fetch = todo[short], min(total, 2 * fetch)
                if more_probes:
                    self._ann.nprobe = min(self._ann.nlist, 2 * self._ann.nprobe)
            if self.approximate == "ivf":
                self._ann.nprobe = nprobe0
        return out


def first_distinct(scores: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the first ``k`` distinct keys in column order and their scores.

    ``scores, keys (Q, T)`` with rows sorted best first (``keys`` ``-1`` = none). Since a
    key's first column holds its best score, this is the top-``k`` of keys by their max.

    Returns:
        ``(scores (Q, k), keys (Q, k), found (Q,))``, padded with ``-inf`` / ``-1``;
        ``found``: distinct keys in the row (at most ``k``).
    """
    n_q = keys.shape[0]
    big = torch.iinfo(torch.int64).max
    key = torch.where(keys >= 0, keys, big)
    ordered, order = torch.sort(key, dim=1, stable=True)  # equal keys keep column order
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered != big
    is_first = torch.zeros_like(first).scatter_(1, order, first)
    rank = torch.cumsum(is_first, dim=1) - 1
    take = is_first & (rank < k)
    out_s = torch.full((n_q, k), -math.inf)
    out_k = torch.full((n_q, k), -1, dtype=torch.int64)
    r, c = take.nonzero(as_tuple=True)
    out_s[r, rank[r, c]] = scores[r, c]
    out_k[r, rank[r, c]] = keys[r, c]
    return out_s, out_k, is_first.sum(dim=1).clamp_max(k)


def _grown(t: Tensor, rows: int, keep: int, *, zero: bool = False) -> Tensor:
    """``t`` reallocated to ``rows`` rows, its first ``keep`` rows (those it has) copied."""
    shape = (rows, *t.shape[1:])
    out = torch.zeros(shape, dtype=t.dtype) if zero else torch.empty(shape, dtype=t.dtype)
    keep = min(keep, t.shape[0])
    out[:keep] = t[:keep]
    return out


def _empty(n_q: int) -> Hits:
    return Hits(torch.empty(n_q, 0), torch.empty(n_q, 0, dtype=torch.int64))


__all__ = ["APPROXIMATE", "DTYPES", "MODES", "Hits", "TemplateIndex", "first_distinct"]
