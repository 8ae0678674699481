"""Embedding-index speed, memory and recall (``facemetric.index``).

    .venv/bin/python benchmarks/index.py            # full run: ~20-40 min, peak ~10 GiB
    .venv/bin/python benchmarks/index.py --quick    # smoke run of every part: ~1-2 minutes
    .venv/bin/python benchmarks/index.py --parts d --knn-n 200000   # one part, another size

The full run's time is mostly faiss's HNSW build over 1M vectors in part (c).

Synthetic clustered data, D = 512 (``--dim``), all vectors float32:

- *templates*: ``persons × per_person`` templates ``c_p + σ·n`` around random person centres
  ``c_p`` (entries ``N(0, 1/D)``, noise the same scaled by ``σ = 0.75``: two templates of a
  person have cosine ≈ 0.64, of two persons ≈ 0); *queries*: fresh samples of random persons.
- *identity vectors* (part d): three levels — 1 group centre per 1,000 identities, families
  of 10 look-alike identities around it (offset ``1.0``), identities around their family
  (``0.6``): cosine ≈ 0.8 within a family, ≈ 0.4 within a group, ≈ 0 across.

Parts (``--parts abcd``):

(a) exact ``TemplateIndex.search_owners`` (top-10 persons by max cosine) of 1,000 queries
    over 100,000 templates (20k persons × 5) against the bare product ``Q·Gᵀ`` (one
    ``torch.mm``, nothing else), timed round-robin in the same run, median of repeats: the
    ratio (target ≤ 1.2×) and each one's peak extra resident memory (polled every 2 ms).
(b) float16 / int8 storage: bytes a template, time, recall@1 (templates and persons) against
    float32 exact.
(c) faiss HNSW and IVF over 1,000,000 templates: build seconds, queries/s (top-10 persons),
    resident memory added, recall@1 against exact.
(d) ``knn_table`` k = 10 over 1,000,000 identity vectors: total seconds (target ≤ 120 s) by
    phase, the nprobe it chose, recall@10 against brute force on an independent sample of
    rows; and faiss ``IndexIVFFlat.search`` at the same nlist/nprobe on a subset of the
    queries, extrapolated, for comparison with the cell-by-cell join.

It first prints the load average: numbers taken on a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facemetric.index import TemplateIndex, knn_table

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


class PeakRss:
    """Peak resident memory above the level at entry, polled every 2 ms (MiB)."""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())

    @property
    def extra(self) -> float:
        return self.peak - self.before


def gaussian(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    return rng.standard_normal((rows, dim), dtype=np.float32) / np.float32(np.sqrt(dim))


def templates(persons: int, per: int, dim: int, spread: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Templates ``(persons·per, dim)``, their owners, and the person centres."""
    rng = np.random.default_rng(seed)
    centres = gaussian(rng, persons, dim)
    owners = np.repeat(np.arange(persons, dtype=np.int64), per)
    x = np.empty((persons * per, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, len(x), step):
        x[s : s + step] = centres[owners[s : s + step]] + spread * gaussian(
            rng, min(step, len(x) - s), dim)
    return x, owners, centres


def queries(centres: np.ndarray, n: int, spread: float, seed: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    rng = np.random.default_rng(seed)
    who = rng.integers(0, len(centres), n)
    return centres[who] + spread * gaussian(rng, n, centres.shape[1]), who


def identity_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    family, per_group = 10, 1000
    groups = gaussian(rng, max(1, n // per_group), dim)
    fam = np.repeat(groups, per_group // family, axis=0)[: n // family]
    fam = fam + 1.0 * gaussian(rng, len(fam), dim)
    x = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        rows = np.arange(s, min(n, s + step))
        x[rows] = fam[np.minimum(rows // family, len(fam) - 1)] + 0.6 * gaussian(
            rng, len(rows), dim)
    return x


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def same_first(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a[:, 0] == b[:, 0]).float().mean())


def recall_rows(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t)
                          for f, t in zip(found.tolist(), truth.tolist(), strict=True)]))


# --------------------------------------------------------------------------- parts


def part_a_b(args: argparse.Namespace) -> None:
    x, owners, centres = templates(args.persons, args.per_person, args.dim, 0.75, seed=0)
    q, _ = queries(centres, args.queries, 0.75, seed=1)
    n = len(x)
    print(f"\n(a) exact top-10 persons: {args.queries:,} queries × {n:,} templates "
          f"({args.persons:,} persons × {args.per_person}), D = {args.dim}")
    index = TemplateIndex(args.dim)
    seconds, _ = timed(lambda i=index: i.add(np.arange(n), owners, x))
    print(f"    add: {seconds:.2f} s ({n / seconds:,.0f} templates/s)")
    g = F.normalize(torch.from_numpy(x), dim=1)
    qt = F.normalize(torch.from_numpy(q), dim=1)
    bare, ours = [], []
    index.search_owners(q, 10)  # warm-up
    torch.mm(qt, g.T)
    for _ in range(args.repeats):  # round-robin: drift hits both alike
        seconds, product = timed(lambda g=g: torch.mm(qt, g.T))
        bare.append(seconds)
        del product
        seconds, _ = timed(lambda i=index: i.search_owners(q, 10))
        ours.append(seconds)
    with PeakRss() as mem_bare:
        product = torch.mm(qt, g.T)
    del product
    with PeakRss() as mem_ours:
        ref = index.search_owners(q, 10)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"    bare Q·Gᵀ:             {b * 1e3:8.1f} ms   peak extra {mem_bare.extra:7.1f} MiB")
    print(f"    search_owners (max):   {o * 1e3:8.1f} ms   peak extra {mem_ours.extra:7.1f} MiB"
          f"   ratio {o / b:.2f}× (target ≤ 1.2×)")
    for label, fn in (("search (templates)", lambda i=index: i.search(q, 10)),
                      ("search_owners (mean)", lambda i=index: i.search_owners(q, 10, "mean"))):
        times = [timed(fn)[0] for _ in range(args.repeats)]
        print(f"    {label + ':':22} {statistics.median(times) * 1e3:8.1f} ms   ratio "
              f"{statistics.median(times) / b:.2f}×")
    ref_t = index.search(q, 1).ids
    del g

    print(f"\n(b) compact storage (same data; recall@1 against float32 exact, median of "
          f"{args.repeats})")
    print("    dtype     bytes/template   search_owners ms   recall@1 templates   persons")
    print(f"    float32   {index.bytes_per_template:14d}   {o * 1e3:16.1f}   {1.0:18.4f}   "
          f"{1.0:7.4f}")
    del index
    for dtype in ("float16", "int8"):
        compact = TemplateIndex(args.dim, dtype=dtype)
        compact.add(np.arange(n), owners, x)
        compact.search_owners(q, 10)
        times, hits = [], None
        for _ in range(args.repeats):
            seconds, hits = timed(lambda c=compact: c.search_owners(q, 10))
            times.append(seconds)
        assert hits is not None
        print(f"    {dtype:8}  {compact.bytes_per_template:14d}   "
              f"{statistics.median(times) * 1e3:16.1f}   "
              f"{same_first(compact.search(q, 1).ids, ref_t):18.4f}   "
              f"{same_first(hits.ids, ref.ids):7.4f}")
        del compact


def part_c(args: argparse.Namespace) -> None:
    persons = args.ann_n // args.per_person
    x, owners, centres = templates(persons, args.per_person, args.dim, 0.75, seed=2)
    q, _ = queries(centres, args.queries, 0.75, seed=3)
    n = len(x)
    print(f"\n(c) approximate (faiss) over {n:,} templates ({persons:,} persons × "
          f"{args.per_person}), {args.queries:,} queries, top-10 persons")
    exact = TemplateIndex(args.dim)
    exact.add(np.arange(n), owners, x)
    seconds, truth = timed(lambda e=exact: e.search_owners(q, 10))
    truth_t = exact.search(q, 1).ids
    print(f"    exact: {args.queries / seconds:,.0f} queries/s (reference for recall)")
    del exact
    print("    kind   build s   (add s)   queries/s   memory MiB   recall@1 templates   persons")
    for kind in ("hnsw", "ivf"):
        before = rss_mib()
        index = TemplateIndex(args.dim, approximate=kind)
        add_s, _ = timed(lambda i=index: i.add(np.arange(n), owners, x))
        build_s, _ = timed(index.build_approximate)
        memory = rss_mib() - before
        index.search_owners(q[:10], 10)
        seconds, hits = timed(lambda i=index: i.search_owners(q, 10))
        extra = f" (nprobe {index._ann.nprobe} of {index._ann.nlist})" if kind == "ivf" else ""
        print(f"    {kind:5}  {build_s:7.1f}   {add_s:7.1f}   {args.queries / seconds:9,.0f}   "
              f"{memory:10,.0f}   {same_first(index.search(q, 1).ids, truth_t):18.4f}   "
              f"{same_first(hits.ids, truth.ids):7.4f}{extra}")
        del index
    print(f"    (memory: index storage {n * args.dim * 4 / 2**20:,.0f} MiB + faiss copy + "
          "graph/lists; float32)")


def part_d(args: argparse.Namespace) -> None:
    n = args.knn_n
    x = identity_vectors(n, args.dim, seed=4)
    print(f"\n(d) knn_table k = 10 over {n:,} identity vectors, D = {args.dim}")
    before = rss_mib()
    with PeakRss() as mem:
        seconds, table = timed(lambda: knn_table(x, 10))
    phases = ", ".join(f"{k} {v:.1f}" for k, v in table.seconds.items())
    print(f"    total {seconds:.1f} s (target ≤ 120 s): {phases}")
    print(f"    exact={table.exact} nlist={table.nlist} nprobe={table.nprobe} "
          f"tuning-sample recall@10 {table.sample_recall:.4f}; peak extra "
          f"{mem.peak - before:,.0f} MiB (the table is {n * 10 * 12 / 2**20:,.0f} MiB)")
    rows = np.random.default_rng(5).choice(n, min(n, args.knn_sample), replace=False)
    exact_s, truth = timed(lambda: knn_table(x, 10, rows=rows, method="exact"))
    print(f"    recall@10 on {len(rows):,} other rows against brute force: "
          f"{recall_rows(table.ids[rows].numpy(), truth.ids.numpy()):.4f} "
          f"(brute force of those rows {exact_s:.1f} s → whole table ≈ "
          f"{exact_s * n / len(rows) / 60:,.0f} min)")
    if table.exact or args.faiss_queries == 0:
        return
    try:
        import faiss
    except ImportError:
        print("    (faiss not installed: no comparison)")
        return
    unit = F.normalize(torch.from_numpy(x), dim=1).numpy()
    quantizer = faiss.IndexFlatIP(args.dim)
    ivf = faiss.IndexIVFFlat(quantizer, args.dim, table.nlist, faiss.METRIC_INNER_PRODUCT)
    train = unit[np.random.default_rng(6).choice(n, min(n, 32 * table.nlist), replace=False)]
    train_s, _ = timed(lambda: ivf.train(train))
    add_s, _ = timed(lambda: ivf.add(unit))
    ivf.nprobe = table.nprobe
    sub = unit[rows[: args.faiss_queries]] if len(rows) >= args.faiss_queries else unit[
        : args.faiss_queries]
    search_s, _ = timed(lambda: ivf.search(sub, 11))
    print(f"    faiss IndexIVFFlat, same nlist/nprobe: train {train_s:.1f} s, add {add_s:.1f} s, "
          f"search {len(sub):,} queries {search_s:.1f} s → all {n:,} ≈ "
          f"{search_s * n / len(sub):,.0f} s (our join: {table.seconds.get('join', 0):.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ad'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--persons", type=int, default=20_000)
    ap.add_argument("--per-person", type=int, default=5)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ann-n", type=int, default=1_000_000)
    ap.add_argument("--knn-n", type=int, default=1_000_000)
    ap.add_argument("--knn-sample", type=int, default=1000)
    ap.add_argument("--faiss-queries", type=int, default=20_000)
    args = ap.parse_args()
    if args.quick:
        args.persons, args.queries, args.repeats = 2_000, 200, 2
        args.ann_n, args.knn_n, args.knn_sample, args.faiss_queries = 50_000, 50_000, 300, 2000
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
          f"torch {torch.__version__}, {args.threads} threads"
          + ("" if load[0] < 0.5 else "  — NOT IDLE: timings are not comparable"))
    started = time.perf_counter()
    if "a" in args.parts or "b" in args.parts:
        part_a_b(args)
    if "c" in args.parts:
        part_c(args)
    if "d" in args.parts:
        part_d(args)
    load = os.getloadavg()
    print(f"\ndone in {time.perf_counter() - started:.0f} s; load average now {load[0]:.2f}")


if __name__ == "__main__":
    main()
