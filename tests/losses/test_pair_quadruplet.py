"""QuadrupletLoss with the paper's rule (Chen et al. 2017): second negative pair independent of
the first negative, adaptive margin — against float64 loops written from the paper's sums."""

from __future__ import annotations

import itertools

import pytest
import torch

from facemetric.distances import CosineDistance, EuclideanDistance, SquaredEuclideanDistance
from facemetric.losses.pair.quadruplet import QuadrupletLoss
from facemetric.miners.batch_hard import BatchHardMiner
from facemetric.tuples import Triplets

# unequal class sizes: |Q_a| and the negatives per anchor differ between anchors
LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4]


def _d(x: torch.Tensor, i: int, j: int, kind: str) -> torch.Tensor:
    """One distance, written out per pair."""
    a, b = x[i], x[j]
    if kind == "cosine":
        return 1 - (a * b).sum() / (a.norm() * b.norm())
    sq = sum((a[t] - b[t]) ** 2 for t in range(len(a)))
    return sq if kind == "squared" else torch.sqrt(sq)


def _distance(kind: str):
    return {"euclidean": EuclideanDistance(), "squared": SquaredEuclideanDistance(),
            "cosine": CosineDistance()}[kind]


def _triplets(labels: list[int]) -> list[tuple[int, int, int]]:
    n = len(labels)
    return [(a, p, k) for a in range(n) for p in range(n) for k in range(n)
            if a != p and labels[a] == labels[p] and labels[k] != labels[a]]


def _adaptive(x, labels, kind, w1, w2) -> tuple[float, float]:
    """``w·[μ_n − μ_p]₊`` over the ordered pairs of the batch, as plain floats (detached)."""
    pos, neg = [], []
    for i, j in itertools.permutations(range(len(labels)), 2):
        (pos if labels[i] == labels[j] else neg).append(_d(x, i, j, kind).item())
    gap = max(sum(neg) / len(neg) - sum(pos) / len(pos), 0.0)
    return w1 * gap, w2 * gap


def ref_paper(x, labels, kind, m1=None, m2=None, triplets=None, weights=(1.0, 0.5)):
    """``1/|T| Σ_T ([d_ap − d_an + α1]₊ + mean_{(l,k)∈Q_a} [d_ap − d_lk + α2]₊)``."""
    if m1 is None:
        m1, m2 = _adaptive(x, labels, kind, *weights)
    triplets = _triplets(labels) if triplets is None else triplets
    n = len(labels)
    d = {(i, j): _d(x, i, j, kind) for i in range(n) for j in range(n) if i != j}
    if not x.requires_grad:  # plain floats: fast enough for bigger batches
        d = {key: v.item() for key, v in d.items()}

    def relu(v):
        return torch.clamp(v, min=0) if isinstance(v, torch.Tensor) else max(v, 0.0)

    total = 0
    for a, p, k1 in triplets:
        d_ap = d[a, p]
        h1 = relu(d_ap - d[a, k1] + m1)
        second = [relu(d_ap - d[i, k] + m2)
                  for i in range(n) for k in range(i + 1, n)
                  if labels[i] != labels[k] and labels[a] not in (labels[i], labels[k])]
        total = total + h1 + sum(second) / len(second)
    return total / len(triplets)


def _batch(seed: int = 0, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, dim, generator=g, dtype=torch.float64)
    y = torch.tensor(LABELS)
    return centres[y] + 0.6 * torch.randn(len(LABELS), dim, generator=g, dtype=torch.float64), y


def _value_and_grad(fn, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = fn(x, y)
    (grad,) = torch.autograd.grad(out, x)
    return out.item(), grad


@pytest.mark.parametrize("kind", ["euclidean", "squared", "cosine"])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_paper_rule_matches_loop(kind, explicit, adaptive):
    x, y = _batch(1)
    t = _triplets(LABELS)[::7] if explicit else None
    m1, m2 = (None, None) if adaptive else (0.8, 0.3)
    loss = QuadrupletLoss(m1, m2, distance=_distance(kind))
    got, g_got = _value_and_grad(
        lambda e, lab: loss(e, lab, None if t is None else Triplets(
            *(torch.tensor(c) for c in zip(*t, strict=True)))), x, y)
    want, g_want = _value_and_grad(lambda e, lab: ref_paper(e, LABELS, kind, m1, m2, t), x, y)
    assert got == pytest.approx(want, rel=1e-10)
    torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)
    # the hinges are neither all active nor all idle
    assert 0 < got < 5


def test_adaptive_margin_is_the_batch_gap_weighted_one_and_a_half():
    x, y = _batch(2)
    loss = QuadrupletLoss(distance=SquaredEuclideanDistance())
    a1, a2 = loss.margins(loss.distance.matrix(x), y)
    w1, w2 = _adaptive(x, LABELS, "squared", 1.0, 0.5)
    assert float(a1) == pytest.approx(w1, rel=1e-12)
    assert float(a2) == pytest.approx(w2, rel=1e-12) and w2 > 0
    custom = QuadrupletLoss(margin_weights=(2.0, 0.25), distance=SquaredEuclideanDistance())
    b1, b2 = custom.margins(custom.distance.matrix(x), y)
    assert float(b1) == pytest.approx(2 * w1) and float(b2) == pytest.approx(w1 / 4)
    # no gradient through the margin: the value equals the loop with the margins as constants
    assert loss(x, y).item() == pytest.approx(ref_paper(x, LABELS, "squared"), rel=1e-10)


def test_adaptive_margin_is_clamped_at_zero_when_negatives_are_closer():
    # positives far apart, other identities on top of each other: μ_n < μ_p
    x = torch.tensor([[0.0], [4.0], [2.0], [2.1], [1.9], [2.05]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = QuadrupletLoss(distance=EuclideanDistance())
    assert [float(m) for m in loss.margins(loss.distance.matrix(x), y)] == [0.0, 0.0]


def test_second_pair_does_not_come_from_the_first_negative():
    # 1-D: anchor/positive at 0 and 0.5; n1 (identity 1) at 3; identities 2 and 3 close to
    # each other at 8 and 8.2, far from n1. Margins α1 = α2 = 1.
    x = torch.tensor([[0.0], [0.5], [3.0], [8.0], [8.2]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 3])
    t = Triplets(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    paper = QuadrupletLoss(1.0, 1.0, distance=EuclideanDistance())
    # first term [0.5 − 3 + 1]₊ = 0; second pairs of Q_0: (1,2) at 5, (1,3) at 5.2, (2,3) at
    # 0.2 → [1.5 − 5]₊ + [1.5 − 5.2]₊ + [1.5 − 0.2]₊ = 1.3 over 3 pairs
    assert paper(x, y, t).item() == pytest.approx(1.3 / 3, rel=1e-12)
    # the n1-anchored variant only sees (n1, nearest third identity) = (3, 8): [1.5 − 5]₊ = 0
    n1_rule = QuadrupletLoss(1.0, 1.0, second_pair="hardest_of_n1", distance=EuclideanDistance())
    assert n1_rule(x, y, t).item() == 0.0


def test_default_equals_every_triplet_given_explicitly():
    x, y = _batch(3)
    t = _triplets(LABELS)
    full = Triplets(*(torch.tensor(c) for c in zip(*t, strict=True)))
    for loss in (QuadrupletLoss(), QuadrupletLoss(0.5, 0.2), QuadrupletLoss(
            second_pair="hardest_of_n1")):
        assert loss(x, y).item() == pytest.approx(loss(x, y, full).item(), rel=1e-12)


def test_float32_batch_of_pk_size_matches_the_float64_loop():
    # a P×K batch with many negative pairs: the prefix sums must not lose precision
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(8).repeat_interleave(4)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    loss = QuadrupletLoss(distance=EuclideanDistance())
    want = ref_paper(x, labels.tolist(), "euclidean")
    assert loss(x.float(), labels).item() == pytest.approx(want, rel=2e-6)


def test_gradcheck_and_with_a_miner():
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    loss = QuadrupletLoss(0.5, 0.2)
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,))
    mined = QuadrupletLoss(miner=BatchHardMiner())
    hard = BatchHardMiner()(x.detach(), y)
    trip = list(zip(hard.anchor.tolist(), hard.positive.tolist(), hard.negative.tolist(),
                    strict=True))
    assert mined(x, y).item() == pytest.approx(
        ref_paper(x.detach(), y.tolist(), "euclidean", triplets=trip), rel=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"margin1": 0.2}, "both margin1 and margin2"),
        ({"margin1": 0.2, "margin2": -0.1}, ">= 0"),
        ({"second_pair": "nearest"}, "second_pair"),
        ({"margin_weights": (1.0,)}, "two numbers"),
        ({"margin_weights": (1.0, -0.5)}, "two numbers"),
        ({"margin1": 0.2, "margin2": 0.1, "margin_weights": (2.0, 1.0)}, "adaptive"),
    ],
)
def test_bad_parameters_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuadrupletLoss(**kwargs)
