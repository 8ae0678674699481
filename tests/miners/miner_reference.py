"""Loop-written float64 references shared by the miner tests (independent of the
vectorised code)."""

from __future__ import annotations

import math

import torch


def ref_dist(x: torch.Tensor, kind: str) -> list[list[float]]:
    """Pairwise Euclidean or cosine (1 − cos) distances, element by element."""
    rows = x.tolist()
    out = []
    for a in rows:
        line = []
        for b in rows:
            if kind == "euclidean":
                line.append(math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b, strict=True))))
            else:
                dot = sum(u * v for u, v in zip(a, b, strict=True))
                na = math.sqrt(sum(u * u for u in a))
                nb = math.sqrt(sum(v * v for v in b))
                line.append(1.0 - dot / (na * nb))
        out.append(line)
    return out
