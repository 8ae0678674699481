"""BatchAllMiner against a plain-loop float64 reference and pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
from miner_reference import ref_dist
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners

from facemetric.distances import CosineDistance, EuclideanDistance
from facemetric.miners import BatchAllMiner
from facemetric.tuples import Triplets


def _reference(d: list[list[float]], labels: list[int], margin: float) -> list[tuple]:
    out = []
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for k in range(n):
                if labels[k] != labels[a] and d[a][p] - d[a][k] + margin > 0:
                    out.append((a, p, k))
    return out


def _as_list(t: Triplets) -> list[tuple[int, int, int]]:
    return list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), strict=True))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (16,), generator=g)
    labels[3] = 42  # a singleton identity
    return x, labels


def _distance(kind: str) -> EuclideanDistance | CosineDistance:
    return EuclideanDistance() if kind == "euclidean" else CosineDistance()


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize(("seed", "margin"), [(0, 0.2), (1, 0.5), (2, 0.0)])
def test_matches_loop_reference(kind, seed, margin):
    x, labels = _batch(seed)
    got = _as_list(BatchAllMiner(margin, _distance(kind))(x, labels))
    want = _reference(ref_dist(x, kind), labels.tolist(), margin)
    assert got == want  # same triplets, in (a, p, n) order
    assert 0 < len(want) < len(labels) ** 3  # the margin really selects


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("margin", [0.1, 0.3])
def test_matches_pytorch_metric_learning(kind, margin):
    x, labels = _batch(5)
    pml_distance = (
        pml_distances.LpDistance(normalize_embeddings=False)
        if kind == "euclidean"
        else pml_distances.CosineSimilarity()
    )
    miner = pml_miners.TripletMarginMiner(margin, type_of_triplets="all", distance=pml_distance)
    a, p, n = miner(x, labels)
    want = set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    assert set(_as_list(BatchAllMiner(margin, _distance(kind))(x, labels))) == want


def test_hand_made_batch():
    x = torch.tensor([[0.0], [1.0], [1.5], [4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # d: 0-1 = 1, 0-2 = 1.5, 0-3 = 4, 1-2 = 0.5, 1-3 = 3, 2-3 = 2.5
    got = _as_list(BatchAllMiner(margin=1.0)(x, labels))
    # (a,p,n) kept iff d_ap + 1 > d_an
    assert got == [(0, 1, 2), (1, 0, 2), (2, 3, 0), (2, 3, 1), (3, 2, 1)]


def test_margin_must_be_non_negative():
    with pytest.raises(ValueError, match="margin"):
        BatchAllMiner(margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        BatchAllMiner(margin=float("nan"))


def test_empty_when_every_triplet_is_satisfied():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    got = BatchAllMiner(margin=1.0)(x, torch.tensor([0, 0, 1, 1]))
    assert len(got) == 0 and got.anchor.dtype == torch.int64
