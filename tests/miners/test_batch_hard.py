"""BatchHardMiner against a plain-loop float64 reference and pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
from miner_reference import ref_dist
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners

from facemetric.distances import CosineDistance, EuclideanDistance
from facemetric.miners import BatchHardMiner
from facemetric.tuples import Triplets


def _reference(d: list[list[float]], labels: list[int]) -> set[tuple[int, int, int]]:
    out = set()
    for a in range(len(labels)):
        best_p, best_n = None, None
        for j in range(len(labels)):
            if j != a and labels[j] == labels[a] and (best_p is None or d[a][j] > d[a][best_p]):
                best_p = j
            if labels[j] != labels[a] and (best_n is None or d[a][j] < d[a][best_n]):
                best_n = j
        if best_p is not None and best_n is not None:
            out.add((a, best_p, best_n))
    return out


def _as_set(t: Triplets) -> set[tuple[int, int, int]]:
    return set(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), strict=True))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (20,), generator=g)
    labels[7] = 99  # an identity with a single image: an anchor without positive
    return x, labels


def _distance(kind: str) -> EuclideanDistance | CosineDistance:
    return EuclideanDistance() if kind == "euclidean" else CosineDistance()


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(kind, seed):
    x, labels = _batch(seed)
    got = BatchHardMiner(_distance(kind))(x, labels)
    want = _reference(ref_dist(x, kind), labels.tolist())
    assert _as_set(got) == want
    assert len(got) == len(want)  # one triplet per anchor, none repeated
    assert 7 not in got.anchor.tolist()
    assert got.anchor.dtype == got.positive.dtype == got.negative.dtype == torch.int64


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
def test_matches_pytorch_metric_learning(kind):
    x, labels = _batch(3)
    pml_distance = (
        pml_distances.LpDistance(normalize_embeddings=False)
        if kind == "euclidean"
        else pml_distances.CosineSimilarity()
    )
    a, p, n = pml_miners.BatchHardMiner(distance=pml_distance)(x, labels)
    want = set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    assert _as_set(BatchHardMiner(_distance(kind))(x, labels)) == want


def test_hand_made_batch():
    # points on a line: distances are plain differences
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0], [4.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    got = BatchHardMiner()(x, labels)
    want = {(0, 2, 5), (1, 2, 5), (2, 0, 5), (3, 4, 5), (4, 3, 5)}
    assert _as_set(got) == want
    assert got.anchor.tolist() == [0, 1, 2, 3, 4]  # ordered by anchor; 5 has no positive


def test_uses_the_given_distance_matrix():
    x = torch.zeros(4, 2)
    labels = torch.tensor([0, 0, 1, 1])
    dist = torch.tensor(
        [
            [0.0, 1.0, 5.0, 2.0],
            [1.0, 0.0, 3.0, 4.0],
            [5.0, 3.0, 0.0, 1.0],
            [2.0, 4.0, 1.0, 0.0],
        ]
    )
    got = BatchHardMiner()(x, labels, distance_matrix=dist)
    assert _as_set(got) == {(0, 1, 3), (1, 0, 2), (2, 3, 1), (3, 2, 0)}


@pytest.mark.parametrize("labels", [[3, 3, 3, 3], [0, 1, 2, 3]])
def test_no_triplet_without_positives_or_negatives(labels):
    got = BatchHardMiner()(torch.randn(4, 3), torch.tensor(labels))
    assert len(got) == 0


def test_duplicate_embeddings_never_pick_the_anchor_itself():
    # identical images of one identity: all positive distances are 0, as is the diagonal
    x = torch.tensor([[1.0, 2.0]] * 3 + [[0.0, 0.0]])
    got = BatchHardMiner()(x, torch.tensor([0, 0, 0, 1]))
    assert got.anchor.tolist() == [0, 1, 2]  # 3 has no positive
    assert all(a != p for a, p in zip(got.anchor.tolist(), got.positive.tolist(), strict=True))
