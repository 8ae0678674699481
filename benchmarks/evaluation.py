"""Evaluation speed: k-fold verification on LFW-sized pair sets, retrieval metrics at scale.

    .venv/bin/python benchmarks/evaluation.py [--retrieval-n 100000] [--dim 512]

- ``verification_report`` on 6,000 pairs (LFW View 2's size), 10 folds: median of 20 runs.
- ``retrieval_metrics`` (precision@1, R-precision, MAP@R, recall@k) on N × D embeddings,
  computed in query chunks whose similarity block is bounded by ``max_block_bytes`` (no N × N
  matrix): wall time and the process's peak resident memory before and after, so the bound
  can be checked against the N × N float32 matrix it avoids.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch

from facemetric.evaluation import retrieval_metrics, verification_report


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrieval-n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--identities", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    is_same = np.repeat([True, False], 3000)
    scores = np.where(is_same, rng.normal(0.6, 0.15, 6000), rng.normal(0.1, 0.15, 6000))
    folds = np.arange(6000) % 10
    times = []
    for _ in range(20):
        t = time.perf_counter()
        report = verification_report(scores, is_same, folds=folds)
        times.append(time.perf_counter() - t)
    print(f"verification_report: 6,000 pairs, 10 folds: median {1e3 * statistics.median(times):.1f}"
          f" ms (accuracy {report.accuracy:.4f})")

    n, d = args.retrieval_n, args.dim
    labels = rng.integers(0, args.identities, n)
    centres = rng.normal(size=(args.identities, d)).astype(np.float32)
    emb = centres[labels] + 2.0 * rng.normal(size=(n, d)).astype(np.float32)
    before = peak_rss_mib()
    t = time.perf_counter()
    ret = retrieval_metrics(emb, labels)
    seconds = time.perf_counter() - t
    after = peak_rss_mib()
    print(f"retrieval_metrics: {n:,} × {d}: {seconds:.1f} s; MAP@R {ret.map_at_r:.4f}, "
          f"P@1 {ret.precision_at_1:.4f}; peak RSS {before:.0f} → {after:.0f} MiB "
          f"(an N×N float32 matrix would be {4 * n * n / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
