"""Plain float64 loop implementations of the retrieval post-processing formulas, written
from the papers, one query (or one vector) at a time — references for the vectorised code."""

from __future__ import annotations

import math

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine_shortlist(q: np.ndarray, x: np.ndarray, k: int) -> list[list[int]]:
    """Top-``k`` rows of ``x`` by cosine for each query, by full sort."""
    qn, xn = unit(q), unit(x)
    out = []
    for i in range(len(qn)):
        s = [float(np.dot(qn[i], xn[j])) for j in range(len(xn))]
        out.append(sorted(range(len(xn)), key=lambda j: -s[j])[:k])
    return out


def alpha_qe(q: np.ndarray, x: np.ndarray, rows: list[int], k: int, alpha: float
             ) -> tuple[list[int], list[float]]:
    """αQE (Radenović et al. 2018) of one query over its shortlist ``rows``: rows in the new
    order and their new scores."""
    qn = unit(q)
    expanded = qn.copy()
    for r in rows[:k]:
        s = float(np.dot(qn, unit(x[r])))
        w = 1.0 if alpha == 0 else max(0.0, s) ** alpha
        expanded = expanded + w * unit(x[r])
    expanded = expanded / np.linalg.norm(expanded)
    scores = {r: float(np.dot(expanded, unit(x[r]))) for r in rows}
    order = sorted(rows, key=lambda r: -scores[r])
    return order, [scores[r] for r in order]


def dba(x: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Each vector replaced by the α-weighted sum of its ``k`` nearest (itself included)."""
    xn = unit(x)
    out = np.zeros_like(xn)
    for i in range(len(xn)):
        sims = [float(np.dot(xn[i], xn[j])) for j in range(len(xn))]
        nearest = sorted(range(len(xn)), key=lambda j: -sims[j])[:k]
        acc = np.zeros(xn.shape[1])
        for j in nearest:
            w = 1.0 if alpha == 0 else max(0.0, sims[j]) ** alpha
            acc += w * xn[j]
        out[i] = acc / np.linalg.norm(acc)
    return out


def k_reciprocal(q: np.ndarray, x: np.ndarray, rows: list[int], k1: int, k2: int,
                 lam: float) -> dict[int, float]:
    """d*(q, x_r) for each shortlisted row ``r``, following Zhong et al. (CVPR 2017) on the
    universe ``{q} ∪ shortlist`` with ``d = ‖â − b̂‖²``: dense lists and sets, no matrices."""
    items = [unit(q)] + [unit(x[r]) for r in rows]
    n = len(items)
    dist = [[float(np.sum((items[a] - items[b]) ** 2)) for b in range(n)] for a in range(n)]
    ranking = [sorted(range(n), key=lambda b, a=a: (dist[a][b], b)) for a in range(n)]

    def near(a: int, k: int) -> list[int]:
        return ranking[a][: k + 1]

    def reciprocal(a: int, k: int) -> set[int]:
        return {b for b in near(a, k) if a in near(b, k)}

    half = round(k1 / 2)
    vectors = []
    for a in range(n):
        base = reciprocal(a, k1)
        grown = set(base)
        for c in base:
            cand = reciprocal(c, half)
            if len(cand & base) > 2.0 / 3.0 * len(cand):
                grown |= cand
        total = sum(math.exp(-dist[a][b]) for b in grown)
        v = [0.0] * n
        for b in grown:
            v[b] = math.exp(-dist[a][b]) / total
        vectors.append(v)
    if k2 > 1:
        vectors = [[sum(vectors[h][b] for h in ranking[a][:k2]) / k2 for b in range(n)]
                   for a in range(n)]
    out = {}
    for i, r in enumerate(rows, start=1):
        mins = sum(min(vectors[0][b], vectors[i][b]) for b in range(n))
        maxs = sum(max(vectors[0][b], vectors[i][b]) for b in range(n))
        out[r] = (1 - lam) * (1 - mins / maxs) + lam * dist[0][i]
    return out
