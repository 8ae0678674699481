"""MultiSimilarityLoss and MultiSimilarityMiner against loops and pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from facemetric.distances import CosineDistance
from facemetric.losses.pair.multi_similarity import MultiSimilarityLoss
from facemetric.miners.multi_similarity import MultiSimilarityMiner
from facemetric.tuples import Pairs


def _cos(x: torch.Tensor, i: int, j: int) -> float:
    a, b = x[i].tolist(), x[j].tolist()
    dot = sum(u * v for u, v in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))


def _reference(x, labels, alpha, beta, base, pos_pairs=None, neg_pairs=None) -> float:
    n = len(labels)
    total = 0.0
    for i in range(n):
        ps, ns = 0.0, 0.0
        for k in range(n):
            if k == i:
                continue
            s = _cos(x, i, k)
            same = labels[i] == labels[k]
            if same and (pos_pairs is None or (i, k) in pos_pairs):
                ps += math.exp(-alpha * (s - base))
            if not same and (neg_pairs is None or (i, k) in neg_pairs):
                ns += math.exp(beta * (s - base))
        total += math.log1p(ps) / alpha + math.log1p(ns) / beta
    return total / n


def _batch(n_cls: int = 4, k: int = 3, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n_cls * k, dim, dtype=torch.float64)
    labels = torch.arange(n_cls).repeat_interleave(k)
    return x, labels


@pytest.mark.parametrize(("alpha", "beta", "base"), [(2.0, 50.0, 0.5), (1.0, 5.0, 0.2)])
def test_all_pairs_matches_loop(alpha, beta, base):
    x, labels = _batch()
    got = MultiSimilarityLoss(alpha, beta, base)(x, labels)
    want = _reference(x, labels.tolist(), alpha, beta, base)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_explicit_pairs_matches_loop():
    x, labels = _batch()
    pos = [(0, 1), (4, 5), (9, 11)]
    neg = [(0, 3), (0, 7), (5, 2), (11, 0)]
    pairs = Pairs(*(torch.tensor(v) for v in zip(*pos, strict=True)),
                  *(torch.tensor(v) for v in zip(*neg, strict=True)))
    got = MultiSimilarityLoss(2.0, 10.0, 0.5)(x, labels, pairs)
    want = _reference(x, labels.tolist(), 2.0, 10.0, 0.5, set(pos), set(neg))
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_miner_matches_loop_rule():
    x, labels = _batch(5, 4, 8)
    eps = 0.1
    pairs = MultiSimilarityMiner(eps)(x, labels)
    lab = labels.tolist()
    n = len(lab)
    want_pos, want_neg = set(), set()
    for i in range(n):
        ps = [_cos(x, i, j) for j in range(n) if j != i and lab[j] == lab[i]]
        ns = [_cos(x, i, k) for k in range(n) if lab[k] != lab[i]]
        for j in range(n):
            if j == i:
                continue
            s = _cos(x, i, j)
            if lab[j] == lab[i] and s - eps < max(ns):
                want_pos.add((i, j))
            if lab[j] != lab[i] and s + eps > min(ps):
                want_neg.add((i, j))
    got_pos = set(zip(pairs.pos_a.tolist(), pairs.pos_b.tolist(), strict=True))
    got_neg = set(zip(pairs.neg_a.tolist(), pairs.neg_b.tolist(), strict=True))
    assert got_pos == want_pos
    assert got_neg == want_neg
    assert want_pos and want_neg  # the case is not vacuous


def test_matches_pytorch_metric_learning_with_miner():
    x, labels = _batch(8, 4, 16)
    x = x.float()
    ours = MultiSimilarityLoss(miner=MultiSimilarityMiner(0.1))(x, labels)
    peer_pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
    peer = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(x, labels, peer_pairs)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-5)


def test_gradcheck():
    x, labels = _batch(3, 3, 4)
    x.requires_grad_(True)
    loss = MultiSimilarityLoss(2.0, 8.0, 0.3, distance=CosineDistance())
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (x,))


def test_bad_input():
    loss = MultiSimilarityLoss()
    with pytest.raises(ValueError, match="no two"):
        loss(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="NaN"):
        loss(torch.full((4, 3), float("nan")), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        loss(torch.randn(4, 3), torch.tensor([0, 0, 1]))
