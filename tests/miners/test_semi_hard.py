"""SemiHardMiner against a plain-loop float64 reference and pytorch-metric-learning.

pml's ``TripletMarginMiner(type_of_triplets="semihard")`` returns *every* semi-hard triplet
(``0 < d_an − d_ap <= margin``); ours keeps, per positive pair, only the hardest of them
(FaceNet's choice), so the oracle is pml's set reduced to its closest negative per (a, p).
"""

from __future__ import annotations

import pytest
import torch
from miner_reference import ref_dist
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners

from facemetric.distances import CosineDistance, EuclideanDistance
from facemetric.miners import SemiHardMiner
from facemetric.tuples import Triplets


def _reference(d: list[list[float]], labels: list[int], margin: float) -> list[tuple]:
    out = []
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            best = None
            for k in range(n):
                if labels[k] == labels[a]:
                    continue
                if d[a][p] <= d[a][k] < d[a][p] + margin and (best is None or d[a][k] < d[a][best]):
                    best = k
            if best is not None:
                out.append((a, p, best))
    return out


def _as_list(t: Triplets) -> list[tuple[int, int, int]]:
    return list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), strict=True))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,), generator=g)
    labels[0] = 77  # a singleton identity
    return x, labels


def _distance(kind: str) -> EuclideanDistance | CosineDistance:
    return EuclideanDistance() if kind == "euclidean" else CosineDistance()


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize(("seed", "margin"), [(0, 0.2), (1, 0.5), (2, 0.1)])
def test_matches_loop_reference(kind, seed, margin):
    x, labels = _batch(seed)
    d = ref_dist(x, kind)
    got = _as_list(SemiHardMiner(margin, _distance(kind))(x, labels))
    want = _reference(d, labels.tolist(), margin)
    assert got == want
    n_pos = sum(1 for a in range(24) for p in range(24) if a != p and labels[a] == labels[p])
    assert 0 < len(want) < n_pos  # some pairs have a semi-hard negative, some are dropped


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_matches_hardest_of_pytorch_metric_learning_semihard(kind):
    x, labels = _batch(4)
    margin = 0.3
    pml_distance = (
        pml_distances.LpDistance(normalize_embeddings=False)
        if kind == "euclidean"
        else pml_distances.CosineSimilarity()
    )
    miner = pml_miners.TripletMarginMiner(
        margin, type_of_triplets="semihard", distance=pml_distance
    )
    a, p, n = miner(x, labels)
    d = ref_dist(x, kind)
    hardest: dict[tuple[int, int], int] = {}
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        if (ai, pi) not in hardest or d[ai][ni] < d[ai][hardest[(ai, pi)]]:
            hardest[(ai, pi)] = ni
    want = {(ai, pi, ni) for (ai, pi), ni in hardest.items()}
    got = set(_as_list(SemiHardMiner(margin, _distance(kind))(x, labels)))
    assert got == want and len(want) > 0


def test_hand_made_batch():
    # a line with binary-exact coordinates, so the distances (and the tie) are exact
    x = torch.tensor([[0.0], [1.0], [0.5], [1.25], [1.5], [3.0]])
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    got = _as_list(SemiHardMiner(margin=0.5)(x, labels))
    # (0,1): d_ap = 1, negatives at 0.5 (hard), 1.25, 1.5 (= d_ap + margin: out), 3 -> node 3
    # (1,0): d_ap = 1, negatives at 0.5, 0.25, 0.5, 2: hard or outside -> dropped
    # (3,4): d_ap = 0.25, negatives at 1.25, 0.25 (a tie: kept), 0.75, 1.75 -> node 1
    # (4,3): d_ap = 0.25, negatives at 1.5, 0.5, 1, 1.5 -> node 1
    assert got == [(0, 1, 3), (3, 4, 1), (4, 3, 1)]


def test_margin_must_be_positive():
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="margin"):
            SemiHardMiner(margin=bad)


def test_empty_when_no_semi_hard_negative():
    # the negative is far beyond the margin for every pair
    x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    assert len(SemiHardMiner(margin=0.5)(x, torch.tensor([0, 0, 1, 1]))) == 0
