"""Clustering faces by person: quality against ground truth, cannot-link, and scale.

    .venv/bin/python benchmarks/clustering_embed.py --model runs/demo/train --name demo
    .venv/bin/python benchmarks/clustering_embed.py --model dlib --name dlib
    .venv/bin/python benchmarks/clustering.py [--quick] [--parts quality,cannot,incremental,scale]

**quality**: every cached set (``cache/clustering/<model>_<set>.npz``: LFW DevTest
identities, CFP frontal + profile) clustered by agglomerative (each linkage) and HDBSCAN;
pairwise precision/recall/F, BCubed F, NMI and the number of clusters (singletons count as
clusters; ``min_size = 1``). The threshold is calibrated at each FAR on all impostor pairs of
the first 2,000 LFW DevTrain faces (``<model>_devtrain.npz``; identities disjoint from
DevTest; the demo model was *trained* on them, so its DevTrain impostors are further apart
than unseen ones and its thresholds err low).
**cannot**: 30% of the faces paired at random into two-face "photos" of two different
people; same-photo pairs a plain clustering puts together, and quality with and without the
constraint. **incremental**: 80% of the faces clustered, then the other 20% assigned/clustered
by the incremental rule, against clustering all at once. **scale**: 100k synthetic faces
(D = 256, 10k identities × 10) whose genuine/impostor cosines match the demo model's on LFW
DevTest; time and peak RSS of k-NN graph + constrained average linkage.
``--quick``: 1,000 faces per set and 10k synthetic faces (about a minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemetric.clustering import (
    ClusterOptions,
    assign_to_clusters,
    cannot_link_violations,
    cluster_embeddings,
    constrained_agglomerative,
    hdbscan_labels,
    knn_edges,
    split_cannot_link,
    unit_float32,
)
from facemetric.evaluation import clustering_report
from facemetric.inference.calibration import threshold_at_far

FARS = (1e-3, 1e-4, 1e-5)
SETS = ("lfw", "cfp")
MODELS: tuple[str, ...] | None = None  # None: every model with cached embeddings


def load(cache: Path, model: str, name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A cached set; with ``limit``, whole identities drawn at random until ``limit`` faces."""
    d = np.load(cache / f"{model}_{name}.npz")
    x, y = d["embeddings"], d["labels"]
    if limit is not None and limit < len(y):
        ids = np.random.default_rng(0).permutation(np.unique(y))
        counts = np.array([np.sum(y == i) for i in ids])
        chosen = ids[: int(np.searchsorted(np.cumsum(counts), limit)) + 1]
        keep = np.isin(y, chosen)
        x, y = x[keep], y[keep]
    return unit_float32(x), y


def calibration(cache: Path, model: str) -> np.ndarray | None:
    path = cache / f"{model}_devtrain.npz"
    if not path.exists() or (MODELS is not None and model not in MODELS):
        return None
    x, y = load(cache, model, "devtrain", None)
    return impostor_scores(x, y)


def impostor_scores(x: np.ndarray, y: np.ndarray, block: int = 2048) -> np.ndarray:
    """Cosines of every pair of different identities (upper triangle), in blocks."""
    out = []
    for s in range(0, len(y), block):
        sims = x[s : s + block] @ x[s:].T
        upper = np.arange(len(y) - s)[None, :] > np.arange(sims.shape[0])[:, None]
        diff = y[s : s + block, None] != y[None, s:]
        out.append(sims[upper & diff])
    return np.concatenate(out).astype(np.float64)


def scores(y: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    rep = clustering_report(y, labels)
    return {"clusters": rep.num_clusters, "identities": rep.num_classes,
            "pair_p": rep.pairwise.precision, "pair_r": rep.pairwise.recall,
            "pair_f": rep.pairwise.f1, "bcubed_f": rep.bcubed.f1, "nmi": rep.nmi}


def singletons(labels: np.ndarray) -> np.ndarray:
    """Noise (-1) as clusters of one, for the metrics."""
    out = labels.copy()
    noise = np.flatnonzero(out < 0)
    out[noise] = out.max() + 1 + np.arange(noise.size)
    return out


def quality(cache: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(cache.glob("*_*.npz")):
        model, name = path.stem.split("_", 1)
        imp = calibration(cache, model)
        if name not in SETS or imp is None:
            continue
        x, y = load(cache, model, name, limit)
        for far in FARS:
            if far * imp.size < 1:
                continue
            t, _ = threshold_at_far(imp, far, 1)
            base = {"model": model, "set": name, "faces": len(y), "far": far,
                    "threshold": round(float(t), 4), "calibrated_on": "LFW DevTrain 2000"}
            for linkage in ("average", "single", "complete"):
                started = time.perf_counter()
                res = cluster_embeddings(x, t, None, ClusterOptions(linkage=linkage, min_size=1))
                rows.append({**base, "method": f"agglomerative/{linkage}",
                             "seconds": time.perf_counter() - started,
                             **scores(y, res.groups)})
            started = time.perf_counter()
            lab = hdbscan_labels(x, 2)
            rows.append({**base, "method": "hdbscan (no threshold)",
                         "seconds": time.perf_counter() - started,
                         **scores(y, singletons(lab))})
            _print_rows(rows[-4:])
    return rows


def cannot_link(cache: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(cache.glob("*_lfw.npz")):
        model = path.stem.split("_", 1)[0]
        imp = calibration(cache, model)
        if imp is None:
            continue
        x, y = load(cache, model, "lfw", limit)
        rng = np.random.default_rng(1)
        photos = np.arange(len(y))
        picked = rng.permutation(len(y))[: int(0.3 * len(y)) // 2 * 2]
        for a, b in picked.reshape(-1, 2):
            if y[a] != y[b]:
                photos[b] = photos[a]  # two different people in one photo
        for far in (1e-3, 1e-4):
            t, _ = threshold_at_far(imp, far, 1)
            for linkage in ("average", "single", "complete"):
                plain = cluster_embeddings(x, t, None, ClusterOptions(linkage=linkage,
                                                                      min_size=1))
                cons = cluster_embeddings(x, t, photos, ClusterOptions(linkage=linkage,
                                                                       min_size=1))
                rows.append({"model": model, "far": far, "method": f"agglomerative/{linkage}",
                             "two_face_photos": int(len(y) - np.unique(photos).size),
                             "violations_plain": cannot_link_violations(plain.groups, photos),
                             "violations_constrained":
                                 cannot_link_violations(cons.groups, photos),
                             "refused": cons.refused,
                             "plain": scores(y, plain.groups),
                             "constrained": scores(y, cons.groups)})
            raw = hdbscan_labels(x, 2)
            fixed, split, held = split_cannot_link(x, raw, photos)
            rows.append({"model": model, "far": far, "method": "hdbscan",
                         "two_face_photos": int(len(y) - np.unique(photos).size),
                         "violations_plain": held, "violations_constrained":
                             cannot_link_violations(fixed, photos), "refused": split,
                         "plain": scores(y, singletons(raw)),
                         "constrained": scores(y, singletons(fixed))})
            for r in rows[-4:]:
                print(f"{r['model']:5} FAR {far:g} {r['method']:24} violations plain "
                      f"{r['violations_plain']:4d} → {r['violations_constrained']}; pairwise F "
                      f"{r['plain']['pair_f']:.3f} → {r['constrained']['pair_f']:.3f}, "
                      f"BCubed F {r['plain']['bcubed_f']:.3f} → "
                      f"{r['constrained']['bcubed_f']:.3f}")
    return rows


def incremental(cache: Path, limit: int | None) -> list[dict[str, Any]]:
    """80% clustered, then 20% added by the incremental rule, vs all at once."""
    rows = []
    for path in sorted(cache.glob("*_lfw.npz")):
        model = path.stem.split("_", 1)[0]
        imp = calibration(cache, model)
        if imp is None:
            continue
        x, y = load(cache, model, "lfw", limit)
        t, _ = threshold_at_far(imp, 1e-4, 1)
        order = np.random.default_rng(2).permutation(len(y))
        first, later = order[: int(0.8 * len(y))], order[int(0.8 * len(y)) :]
        photos = np.arange(len(y))
        for linkage in ("average", "single", "complete"):
            opts = ClusterOptions(linkage=linkage, min_size=1)
            whole = cluster_embeddings(x, t, None, opts).groups
            start = cluster_embeddings(x[first], t, None, opts).groups
            got = assign_to_clusters(x[later], photos[later], x[first], start, photos[first], t,
                                     linkage)
            rest = np.flatnonzero(got.cluster < 0)
            new = cluster_embeddings(x[later][rest], t, None, opts).groups + start.max() + 1
            labels = np.empty(len(y), dtype=np.int64)
            labels[first] = start
            labels[later] = got.cluster
            labels[later[rest]] = new
            rows.append({"model": model, "linkage": linkage, "far": 1e-4,
                         "assigned": int((got.cluster >= 0).sum()), "added": len(later),
                         "all_at_once": scores(y, whole), "incremental": scores(y, labels)})
            r = rows[-1]
            print(f"{model:5} {linkage:8} incremental: {r['assigned']}/{r['added']} joined; "
                  f"pairwise F {r['all_at_once']['pair_f']:.3f} (all at once) vs "
                  f"{r['incremental']['pair_f']:.3f}; BCubed F "
                  f"{r['all_at_once']['bcubed_f']:.3f} vs {r['incremental']['bcubed_f']:.3f}")
    return rows


def synthetic(n_ids: int, per_id: int, dim: int, genuine_mean: float, genuine_std: float,
              impostor_std: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Faces ``normalise(c + σᵢ z)``: identity centres ``c`` are unit vectors in a random
    ``d``-dimensional subspace, ``z`` noise in all ``dim`` dimensions. A face's quality
    ``qᵢ = cos(face, centre)`` is drawn from ``N(m, s)`` (clipped to [0.05, 0.99]) with
    ``σᵢ² dim = 1/qᵢ² − 1``; two faces of one identity then have cosine ``≈ q₁q₂``, so
    ``m² = genuine_mean`` and ``E[q²]² − m⁴ = genuine_std²`` fix ``m, s``; two centres have
    cosines spread ``1/√d``, scaled by ``q₁q₂``, so ``d = (E[q²] / impostor_std)²`` (at least
    8). Generated in blocks, float32."""
    rng = np.random.default_rng(seed)
    m = np.sqrt(genuine_mean)
    q2 = np.sqrt(genuine_std**2 + genuine_mean**2)  # E[q²]
    s = np.sqrt(max(q2 - m**2, 1e-6))
    d = int(np.clip(round((q2 / impostor_std) ** 2), 8, dim))
    basis = np.linalg.qr(rng.standard_normal((dim, d)))[0].astype(np.float32)  # (dim, d)
    centres = rng.standard_normal((n_ids, d), dtype=np.float32) @ basis.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.permutation(np.repeat(np.arange(n_ids), per_id))
    x = np.empty((n_ids * per_id, dim), dtype=np.float32)
    for b in range(0, len(y), 20000):
        rows = min(20000, len(y) - b)
        q = np.clip(rng.normal(m, s, rows), 0.05, 0.99)
        sigma = np.sqrt((1.0 / q**2 - 1.0) / dim).astype(np.float32)
        block = centres[y[b : b + rows]] + sigma[:, None] * rng.standard_normal(
            (rows, dim), dtype=np.float32)
        x[b : b + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, y, d


def _rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sampled_pairs(x: np.ndarray, y: np.ndarray, count: int, same: bool, seed: int
                  ) -> np.ndarray:
    """Cosines of ``count`` random pairs of different (or, ``same``, one) identity, in
    blocks of 100k pairs."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    got = 0
    order = np.argsort(y, kind="stable")
    starts = np.searchsorted(y[order], np.arange(int(y.max()) + 1))
    sizes = np.bincount(y)
    while got < count:
        a = rng.integers(0, len(y), 100_000)
        if same:
            b = order[starts[y[a]] + rng.integers(0, sizes[y[a]])]
            keep = a != b
        else:
            b = rng.integers(0, len(y), 100_000)
            keep = y[a] != y[b]
        a, b = a[keep], b[keep]
        out.append(np.einsum("ij,ij->i", x[a], x[b]).astype(np.float64))
        got += a.size
    return np.concatenate(out)[:count]


def scale(cache: Path, n_faces: int) -> dict[str, Any]:
    """Synthetic faces shaped like the demo model's LFW DevTest cosines; threshold at FAR
    1e-5 of 2M synthetic impostor pairs; time and peak RSS of graph + average linkage."""
    x, y = load(cache, "demo", "lfw", None)
    g, i = sampled_pairs(x, y, 200_000, True, 0), sampled_pairs(x, y, 200_000, False, 0)
    measured = {"genuine_mean": float(g.mean()), "genuine_std": float(g.std()),
                "impostor_mean": float(i.mean()), "impostor_std": float(i.std())}
    del g, i
    per_id = 10
    x, y, d = synthetic(n_faces // per_id, per_id, 256, measured["genuine_mean"],
                        measured["genuine_std"], measured["impostor_std"])
    imp = sampled_pairs(x, y, 2_000_000, False, 3)
    gen = sampled_pairs(x, y, 200_000, True, 4)
    runs = []
    for far in (1e-5, 1e-3):
        t, _ = threshold_at_far(imp, far, 1)
        reset = _reset_peak()
        rss_before = _rss_mib("VmRSS")
        started = time.perf_counter()
        edges = knn_edges(x, t, 30)
        graph_s = time.perf_counter() - started
        res = constrained_agglomerative(x, t, linkage="average", edges=edges)
        total_s = time.perf_counter() - started
        peak = _rss_mib("VmHWM") if reset else resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024
        runs.append({"far": far, "threshold": float(t),
                     "tar_at_threshold": float((gen >= t).mean()), "neighbours": 30,
                     "edges": len(edges), "merges": res.merges, "knn_graph_s": graph_s,
                     "total_s": total_s, "rss_mib_before_clustering": rss_before,
                     "peak_rss_mib_during_clustering": peak, "peak_reset": reset,
                     **scores(y, res.labels)})
        print(json.dumps(runs[-1]))
    out = {"faces": len(y), "identities": int(y.max() + 1), "dim": 256, "subspace": d,
           "demo_model_lfw": measured,
           "synthetic": {"genuine_mean": float(gen.mean()), "genuine_std": float(gen.std()),
                         "impostor_mean": float(imp.mean()), "impostor_std": float(imp.std())},
           "dense_float32_matrix_mib_avoided": len(y) ** 2 * 4 / 2**20, "runs": runs,
           "load_average": Path("/proc/loadavg").read_text().split()[:3]}
    print(json.dumps(out, indent=1))
    return out


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"{r['model']:5} {r['set']:4} FAR {r['far']:g} t={r['threshold']:.4f} "
              f"{r['method']:24} clusters {r['clusters']:5d} pairwise P/R/F "
              f"{r['pair_p']:.3f}/{r['pair_r']:.3f}/{r['pair_f']:.3f} BCubed F "
              f"{r['bcubed_f']:.3f} NMI {r['nmi']:.3f} ({r['seconds']:.1f} s)")


def markdown(files: list[Path]) -> str:
    """The tables of docs/benchmarks.md from result files."""
    out = ["| model | set | FAR | threshold | method | clusters | pairwise P / R / F | BCubed F "
           "| NMI | s |", "|---|---|---:|---:|---|---:|---|---:|---:|---:|"]
    cannot = ["| model | FAR | method | same-photo pairs merged, plain → constrained | "
              "pairwise F plain → constrained | BCubed F plain → constrained |",
              "|---|---:|---|---|---|---|"]
    inc = ["| model | linkage | new faces joined | pairwise F all at once / incremental | "
           "BCubed F all at once / incremental |", "|---|---|---:|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        for r in d.get("quality", []):
            out.append(f"| {r['model']} | {r['set']} | {r['far']:g} | {r['threshold']:.4f} | "
                       f"{r['method']} | {r['clusters']} | {r['pair_p']:.3f} / "
                       f"{r['pair_r']:.3f} / {r['pair_f']:.3f} | {r['bcubed_f']:.3f} | "
                       f"{r['nmi']:.3f} | {r['seconds']:.1f} |")
        for r in d.get("cannot_link", []):
            cannot.append(f"| {r['model']} | {r['far']:g} | {r['method']} | "
                          f"{r['violations_plain']} → {r['violations_constrained']} | "
                          f"{r['plain']['pair_f']:.3f} → {r['constrained']['pair_f']:.3f} | "
                          f"{r['plain']['bcubed_f']:.3f} → {r['constrained']['bcubed_f']:.3f} |")
        for r in d.get("incremental", []):
            inc.append(f"| {r['model']} | {r['linkage']} | {r['assigned']} / {r['added']} | "
                       f"{r['all_at_once']['pair_f']:.3f} / {r['incremental']['pair_f']:.3f} | "
                       f"{r['all_at_once']['bcubed_f']:.3f} / "
                       f"{r['incremental']['bcubed_f']:.3f} |")
    return "\n".join([*out, "", *cannot, "", *inc])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("cache/clustering"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_clustering"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="quality,cannot,incremental,scale")
    ap.add_argument("--scale-faces", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=None, help="comma-separated (default: every cached)")
    ap.add_argument("--sets", default="lfw,cfp", help="which sets the quality part covers")
    ap.add_argument("--table", type=Path, nargs="+", help="print markdown tables of these "
                    "result files and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown(args.table))
        return
    torch.set_num_threads(args.threads)
    limit = 1000 if args.quick else None
    global MODELS, SETS
    MODELS = None if args.models is None else tuple(args.models.split(","))
    SETS = tuple(args.sets.split(","))
    parts = args.parts.split(",")
    result: dict[str, Any] = {"quick": args.quick}
    if "quality" in parts:
        result["quality"] = quality(args.cache, limit)
    if "cannot" in parts:
        result["cannot_link"] = cannot_link(args.cache, limit)
    if "incremental" in parts:
        result["incremental"] = incremental(args.cache, limit)
    if "scale" in parts:
        result["scale"] = scale(args.cache, 10_000 if args.quick else args.scale_faces)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_".join(parts) + ("" if MODELS is None else "_" + "_".join(MODELS))
    name = "results_quick.json" if args.quick else f"results_{tag}.json"
    (args.out / name).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
