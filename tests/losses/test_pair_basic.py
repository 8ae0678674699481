"""Contrastive, triplet, quadruplet, lifted-structure and N-pair losses.

Every loss is checked against a float64 reference that follows the formula literally, with
Python loops over pairs/tuples and scalar torch ops (so its gradient is a reference too),
with and without explicit tuples, in Euclidean and cosine distance; against
``torch.autograd.gradcheck``; and against pytorch-metric-learning where its conventions
match ours (checked in its source: reducers set to a plain mean, no embedding
normalisation in its ``LpDistance``).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from facemetric.distances import CosineDistance, Distance, EuclideanDistance
from facemetric.losses.pair.contrastive import ContrastiveLoss
from facemetric.losses.pair.lifted_structure import (
    LiftedStructureLoss,
    flush_subnormal_grad,
    masked_logsumexp,
)
from facemetric.losses.pair.npair import NPairLoss, _Gram
from facemetric.losses.pair.quadruplet import QuadrupletLoss
from facemetric.losses.pair.triplet import TripletLoss
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets

LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4]  # uneven identities, and a singleton (4)


# ----------------------------------------------------------------------------- references
def _batch(dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(len(LABELS), dim, dtype=torch.float64), torch.tensor(LABELS)


def _d(x: torch.Tensor, i: int, j: int, kind: str) -> torch.Tensor:
    """One distance, from its definition."""
    if kind == "euclidean":
        return torch.sqrt(sum((x[i, k] - x[j, k]) ** 2 for k in range(x.shape[1])))
    dot = sum(x[i, k] * x[j, k] for k in range(x.shape[1]))
    ni = torch.sqrt(sum(x[i, k] ** 2 for k in range(x.shape[1])))
    nj = torch.sqrt(sum(x[j, k] ** 2 for k in range(x.shape[1])))
    return 1 - dot / (ni * nj)


def _distance(kind: str) -> Distance:
    return EuclideanDistance() if kind == "euclidean" else CosineDistance()


def _all_pos(labels: list[int]) -> list[tuple[int, int]]:
    n = len(labels)
    return [(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]


def _all_neg(labels: list[int]) -> list[tuple[int, int]]:
    n = len(labels)
    return [(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]]


def _all_triplets(labels: list[int]) -> list[tuple[int, int, int]]:
    n = len(labels)
    return [(a, p, q) for a, p in _all_pos(labels) for q in range(n) if labels[q] != labels[a]]


def _some_pairs(labels: list[int], seed: int = 1) -> tuple[list, list]:
    """A random subset of positive and negative pairs (ordered, asymmetric, one repeated)."""
    rng = random.Random(seed)
    pos = rng.sample(_all_pos(labels), 9)
    neg = rng.sample(_all_neg(labels), 25)
    return pos + pos[:1], neg


def _some_triplets(labels: list[int], seed: int = 2) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    t = rng.sample(_all_triplets(labels), 30)
    return t + t[:2]


def _pairs(pos: list, neg: list) -> Pairs:
    def col(v: list, k: int) -> torch.Tensor:
        return torch.tensor([e[k] for e in v], dtype=torch.long)

    return Pairs(col(pos, 0), col(pos, 1), col(neg, 0), col(neg, 1))


def _triplets(t: list) -> Triplets:
    return Triplets(*(torch.tensor([e[k] for e in t], dtype=torch.long) for k in range(3)))


def _check_value_and_grad(loss_fn, ref_fn) -> None:
    """Same value and same gradient w.r.t. the embeddings as the loop reference."""
    x, labels = _batch()
    x1 = x.clone().requires_grad_(True)
    got = loss_fn(x1, labels)
    got.backward()
    x2 = x.clone().requires_grad_(True)
    want = ref_fn(x2, LABELS)
    want.backward()
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- contrastive
def _contrastive_ref(x, labels, kind, mp, mn, squared, pos=None, neg=None):
    pos = _all_pos(labels) if pos is None else pos
    neg = _all_neg(labels) if neg is None else neg
    s = 2 if squared else 1
    total = 0
    active = 0
    for i, j in pos:
        h = torch.clamp(_d(x, i, j, kind) - mp, min=0)
        total = total + h**s
        active += bool(h > 0)
    for i, j in neg:
        h = torch.clamp(mn - _d(x, i, j, kind), min=0)
        total = total + h**s
        active += bool(h > 0)
    assert 0 < active < len(pos) + len(neg)  # the margins leave both kinds of term
    return total / (len(pos) + len(neg))


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
def test_contrastive_matches_loop(kind, squared, explicit):
    mp, mn = (0.8, 2.5) if kind == "euclidean" else (0.3, 1.0)
    pos, neg = _some_pairs(LABELS) if explicit else (None, None)
    loss = ContrastiveLoss(distance=_distance(kind), pos_margin=mp, neg_margin=mn, squared=squared)
    tuples = _pairs(pos, neg) if explicit else None
    _check_value_and_grad(
        lambda x, y: loss(x, y, tuples),
        lambda x, y: _contrastive_ref(x, y, kind, mp, mn, squared, pos, neg),
    )


def test_contrastive_from_triplets_uses_their_distinct_pairs():
    t = _some_triplets(LABELS)
    pos = sorted({(a, p) for a, p, _ in t})
    neg = sorted({(a, n) for a, _, n in t})
    loss = ContrastiveLoss(pos_margin=0.8, neg_margin=2.5)
    _check_value_and_grad(
        lambda x, y: loss(x, y, _triplets(t)),
        lambda x, y: _contrastive_ref(x, y, "euclidean", 0.8, 2.5, False, pos, neg),
    )


@pytest.mark.parametrize("explicit", [False, True])
def test_contrastive_matches_pml_per_pair_terms(explicit):
    x, labels = _batch(dim=8)
    pos, neg = _some_pairs(LABELS) if explicit else (_all_pos(LABELS), _all_neg(LABELS))
    tuples = _pairs(pos, neg)
    ours = ContrastiveLoss(pos_margin=1.0, neg_margin=3.5)(x, labels, tuples if explicit else None)
    # pml reduces positives and negatives separately; its per-pair terms are the same hinges
    pml = pml_losses.ContrastiveLoss(
        pos_margin=1.0,
        neg_margin=3.5,
        distance=pml_distances.LpDistance(normalize_embeddings=False),
        reducer=pml_reducers.DoNothingReducer(),
    )
    terms = pml(x, labels, (tuples.pos_a, tuples.pos_b, tuples.neg_a, tuples.neg_b))
    p, n = terms["pos_loss"]["losses"], terms["neg_loss"]["losses"]
    assert len(p) == len(pos) and len(n) == len(neg)
    assert ours.item() == pytest.approx(((p.sum() + n.sum()) / (len(p) + len(n))).item(), rel=1e-9)


# ----------------------------------------------------------------------------- triplet
def _triplet_ref(x, labels, kind, margin, squared, triplets=None):
    triplets = _all_triplets(labels) if triplets is None else triplets
    s = 2 if squared else 1
    total = 0
    active = 0
    for a, p, n in triplets:
        h = torch.clamp(_d(x, a, p, kind) ** s - _d(x, a, n, kind) ** s + margin, min=0)
        total = total + h
        active += bool(h > 0)
    assert 0 < active < len(triplets)
    return total / len(triplets)


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
def test_triplet_matches_loop(kind, squared, explicit):
    margin = 1.0 if kind == "euclidean" else 0.3
    t = _some_triplets(LABELS) if explicit else None
    loss = TripletLoss(distance=_distance(kind), margin=margin, squared=squared)
    _check_value_and_grad(
        lambda x, y: loss(x, y, None if t is None else _triplets(t)),
        lambda x, y: _triplet_ref(x, y, kind, margin, squared, t),
    )


def test_triplet_all_triplets_default_on_a_larger_batch_in_float32():
    # the sorted prefix-sum path against the explicit list of every triplet, in float32
    labels = torch.arange(16).repeat_interleave(4)
    x = torch.randn(64, 32)
    loss = TripletLoss(margin=2.0)
    a, p, n = zip(*_all_triplets(labels.tolist()), strict=True)
    explicit = Triplets(torch.tensor(a), torch.tensor(p), torch.tensor(n))
    torch.testing.assert_close(loss(x, labels), loss(x, labels, explicit), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("explicit", [False, True])
def test_triplet_matches_pml_mean_over_all_triplets(explicit):
    x, labels = _batch(dim=8)
    t = _some_triplets(LABELS) if explicit else None
    pml = pml_losses.TripletMarginLoss(
        margin=0.7,
        distance=pml_distances.LpDistance(normalize_embeddings=False),
        reducer=pml_reducers.MeanReducer(),
        triplets_per_anchor="all",
    )
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    tup = None if t is None else _triplets(t)
    ours = TripletLoss(margin=0.7)(x1, labels, tup)
    theirs = pml(x2, labels, None if tup is None else (tup.anchor, tup.positive, tup.negative))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- quadruplet
def _quadruplet_ref(x, labels, kind, m1, m2, triplets=None):
    triplets = _all_triplets(labels) if triplets is None else triplets
    total = 0
    active1 = active2 = 0
    for a, p, n1 in triplets:
        d_ap = _d(x, a, p, kind)
        candidates = [k for k in range(len(labels)) if labels[k] not in (labels[a], labels[n1])]
        d_n1n2 = min((_d(x, n1, k, kind) for k in candidates), key=lambda v: v.item())
        h1 = torch.clamp(d_ap - _d(x, a, n1, kind) + m1, min=0)
        h2 = torch.clamp(d_ap - d_n1n2 + m2, min=0)
        total = total + h1 + h2
        active1 += bool(h1 > 0)
        active2 += bool(h2 > 0)
    assert 0 < active1 < len(triplets) and 0 < active2 < len(triplets)
    return total / len(triplets)


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("explicit", [False, True])
def test_quadruplet_hardest_of_n1_matches_loop(kind, explicit):
    # the n1-anchored second pair (the paper's rule: tests/losses/test_pair_quadruplet.py)
    m1, m2 = (1.0, 0.5) if kind == "euclidean" else (0.3, 0.1)
    t = _some_triplets(LABELS) if explicit else None
    loss = QuadrupletLoss(distance=_distance(kind), margin1=m1, margin2=m2,
                          second_pair="hardest_of_n1")
    _check_value_and_grad(
        lambda x, y: loss(x, y, None if t is None else _triplets(t)),
        lambda x, y: _quadruplet_ref(x, y, kind, m1, m2, t),
    )


def test_quadruplet_adds_a_positive_second_term_to_the_triplet_loss():
    x, labels = _batch()
    quad = QuadrupletLoss(margin1=1.0, margin2=0.5)(x, labels)
    trip = TripletLoss(margin=1.0)(x, labels)
    assert quad.item() > trip.item()


def test_quadruplet_needs_three_identities():
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="3 identities"):
        QuadrupletLoss()(x, torch.tensor([0, 0, 0, 1, 1, 1]))


# ----------------------------------------------------------------------------- lifted
def _lifted_ref(x, labels, kind, alpha, pos=None, neg=None):
    pos = _all_pos(labels) if pos is None else pos
    neg = _all_neg(labels) if neg is None else neg
    neg_set = {frozenset(e) for e in neg}  # negative pairs are unordered
    n = len(labels)
    total = 0
    for i, j in pos:
        s = 0
        for end in (i, j):
            for k in range(n):
                if frozenset((end, k)) in neg_set:
                    s = s + torch.exp(alpha - _d(x, end, k, kind))
        J = torch.log(s) + _d(x, i, j, kind)
        total = total + torch.clamp(J, min=0) ** 2
    return total / (2 * len(pos))


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("explicit", [False, True])
def test_lifted_structure_matches_loop(kind, explicit):
    # with few negatives the cosine J goes negative for some pairs: the hinge is exercised
    alpha = 1.0 if kind == "euclidean" else 0.05
    pos, neg = _some_pairs(LABELS) if explicit else (None, None)
    loss = LiftedStructureLoss(distance=_distance(kind), margin=alpha)
    tuples = _pairs(pos, neg) if explicit else None
    _check_value_and_grad(
        lambda x, y: loss(x, y, tuples), lambda x, y: _lifted_ref(x, y, kind, alpha, pos, neg)
    )


def test_lifted_structure_hinge_clips_far_pairs():
    # identities 0 and 1 overlap (J > 0), 2, 3 and 4 lie far from all others (J < 0, clipped)
    centres = torch.tensor([[0.0, 0], [1, 0], [0, 8], [0, 16], [0, 24]], dtype=torch.float64)
    x = centres[torch.tensor(LABELS)] + 0.1 * torch.randn(len(LABELS), 2, dtype=torch.float64)
    d = torch.cdist(x, x)
    J = {
        (i, j): math.log(
            sum(math.exp(1.0 - d[e, k].item()) for e in (i, j) for k, _ in _negs_of(e))
        )
        + d[i, j].item()
        for i, j in _all_pos(LABELS)
    }
    assert all((v > 0) == (LABELS[i] < 2) for (i, _), v in J.items())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = LiftedStructureLoss(margin=1.0)(x1, torch.tensor(LABELS))
    want = _lifted_ref(x2, LABELS, "euclidean", 1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    got.backward()
    want.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-8, atol=1e-10)
    assert x1.grad[LABELS.index(3)].abs().max() < 1e-3  # a clipped identity barely moves


def _negs_of(e: int) -> list[tuple[int, int]]:
    return [(k, LABELS[k]) for k in range(len(LABELS)) if LABELS[k] != LABELS[e]]


def test_lifted_structure_positive_pair_without_negatives_costs_nothing():
    x, labels = _batch()
    x.requires_grad_(True)
    # the one negative pair makes 3 a negative of 0 and 0 one of 3; 1 and 4 have none
    tuples = _pairs([(0, 1), (3, 4)], [(3, 0)])
    loss = LiftedStructureLoss(margin=1.0)(x, labels, tuples)
    d = torch.cdist(x, x)
    want = (
        sum(
            torch.clamp(torch.log(torch.exp(1.0 - d[0, 3])) + d[i, j], min=0) ** 2
            for i, j in [(0, 1), (3, 4)]
        )
        / 4
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    empty_neg = _pairs([(0, 1)], [])
    out = LiftedStructureLoss()(x, labels, empty_neg)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("symmetric_explicit", [False, True])
def test_lifted_structure_matches_pml(symmetric_explicit):
    # pml's LiftedStructureLoss (not the "generalized" one) is eq. 4 with the negatives of
    # a pair's ends taken by their first index, which equals ours when negatives are
    # listed in both orders (true of all pairs); its /2 per ordered pair is our 1/(2|P|)
    x, labels = _batch(dim=8)
    if symmetric_explicit:
        pos, neg = _some_pairs(LABELS)
        neg = sorted({e for a, b in neg for e in ((a, b), (b, a))})
    else:
        pos, neg = _all_pos(LABELS), _all_neg(LABELS)
    tuples = _pairs(pos, neg)
    pml = pml_losses.LiftedStructureLoss(
        neg_margin=1.5,
        pos_margin=0.0,
        distance=pml_distances.LpDistance(normalize_embeddings=False),
        reducer=pml_reducers.MeanReducer(),
    )
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = LiftedStructureLoss(margin=1.5)(x1, labels, tuples if symmetric_explicit else None)
    theirs = pml(x2, labels, (tuples.pos_a, tuples.pos_b, tuples.neg_a, tuples.neg_b))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- N-pair
def _npair_ref(x, labels, l2_reg, kind=None, pos=None):
    pos = _all_pos(labels) if pos is None else pos

    def s(i, j):
        if kind is None:
            return sum(x[i, k] * x[j, k] for k in range(x.shape[1]))
        return -_d(x, i, j, kind)

    targets = sorted({p for _, p in pos})
    total = 0
    for a, p in pos:
        inner = 0
        for n in targets:
            if labels[n] != labels[a]:
                inner = inner + torch.exp(s(a, n) - s(a, p))
        total = total + torch.log(1 + inner)
    used = sorted({i for e in pos for i in e})
    reg = sum(sum(x[i, k] ** 2 for k in range(x.shape[1])) for i in used) / len(used)
    return total / len(pos) + l2_reg * reg


@pytest.mark.parametrize("kind", [None, "euclidean", "cosine"])
@pytest.mark.parametrize("explicit", [False, True])
def test_npair_matches_loop(kind, explicit):
    pos = _some_pairs(LABELS)[0] if explicit else None
    loss = NPairLoss(distance=None if kind is None else _distance(kind), l2_reg=0.3)
    tuples = _pairs(pos, []) if explicit else None
    _check_value_and_grad(
        lambda x, y: loss(x, y, tuples), lambda x, y: _npair_ref(x, y, 0.3, kind, pos)
    )


def test_npair_ignores_given_negative_pairs_and_accepts_triplets():
    x, labels = _batch()
    pos, neg = _some_pairs(LABELS)
    loss = NPairLoss(l2_reg=0.1)
    with_neg = loss(x, labels, _pairs(pos, neg))
    assert with_neg.item() == pytest.approx(loss(x, labels, _pairs(pos, [])).item(), rel=1e-12)
    t = _some_triplets(LABELS)
    ap = sorted({(a, p) for a, p, _ in t})
    got = loss(x, labels, _triplets(t))
    assert got.item() == pytest.approx(_npair_ref(x, LABELS, 0.1, None, ap).item(), rel=1e-10)


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_npair_matches_pml_on_one_pair_per_identity(kind):
    # Sohn's setting: N pairs of N distinct identities; pml picks one pair per label, and
    # with exactly one per label given it keeps them all; its cross-entropy over the
    # anchors × positives similarity matrix is log(1 + Σ_{j≠i} exp(s_ij − s_ii))
    x, labels = _batch(dim=8)
    pos = [(0, 2), (4, 3), (5, 8), (10, 9)]
    tuples = _pairs(pos, [])
    if kind == "dot":
        ours_fn = NPairLoss(l2_reg=0.0)
        sim = pml_distances.DotProductSimilarity(normalize_embeddings=False)
    else:
        ours_fn = NPairLoss(distance=CosineDistance(), l2_reg=0.0)
        sim = pml_distances.CosineSimilarity()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = ours_fn(x1, labels, tuples)
    theirs = pml_losses.NPairsLoss(distance=sim)(
        x2, labels, (tuples.pos_a, tuples.pos_b, *[torch.zeros(0, dtype=torch.long)] * 2)
    )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-9)


def test_npair_without_distance_needs_no_distance_matrix():
    class Recording(EuclideanDistance):
        calls = 0

        def matrix(self, x, y=None):
            Recording.calls += 1
            return super().matrix(x, y)

    x, labels = _batch()
    NPairLoss(miner=_FixedMiner(_pairs([(0, 1)], []), Recording()))(x, labels)
    assert Recording.calls == 1  # the miner's own, not one for the loss
    NPairLoss(distance=Recording())(x, labels)
    assert Recording.calls == 2


# ----------------------------------------------------------------------------- shared
class _FixedMiner(Miner):
    """Returns fixed tuples; records the distance matrix it was handed."""

    def __init__(self, tuples: Pairs | Triplets, distance: Distance | None = None) -> None:
        super().__init__(distance)
        self.tuples = tuples
        self.seen: torch.Tensor | None = None

    def mine(self, embeddings, labels, dist):
        self.seen = dist
        return self.tuples


def _losses() -> list:
    return [
        ContrastiveLoss(pos_margin=0.5, neg_margin=2.0),
        TripletLoss(margin=0.5),
        QuadrupletLoss(margin1=0.5, margin2=0.2),
        LiftedStructureLoss(margin=1.0),
        NPairLoss(l2_reg=0.1),
    ]


def _ids(loss) -> str:
    return type(loss).__name__


def _tuples_for(loss, t: list) -> Pairs | Triplets:
    if isinstance(loss, TripletLoss | QuadrupletLoss):
        return _triplets(t)
    return Triplets(*(torch.tensor([e[k] for e in t]) for k in range(3))).to_pairs()


@pytest.mark.parametrize("loss", _losses(), ids=_ids)
def test_gradcheck(loss):
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (x,))
    t = [(0, 1, 3), (3, 4, 5), (5, 6, 0), (7, 8, 2), (1, 2, 8)]
    tup = _tuples_for(loss, t)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels, tup), (x,))


@pytest.mark.parametrize("loss", _losses(), ids=_ids)
def test_miner_tuples_are_used_and_share_the_distance_matrix(loss):
    x, labels = _batch()
    t = [(0, 1, 3), (3, 4, 0), (5, 6, 11), (9, 10, 2)]
    tup = _tuples_for(loss, t)
    miner = _FixedMiner(tup, loss.distance)
    mined = type(loss)(miner=miner, **_params(loss))
    got = mined(x, labels)
    assert got.item() == pytest.approx(loss(x, labels, tup).item(), rel=1e-12)
    assert got.item() != pytest.approx(loss(x, labels).item(), rel=1e-6)
    if loss.uses_distance_matrix:
        torch.testing.assert_close(miner.seen, loss.distance.matrix(x))


def _params(loss) -> dict:
    names = {
        ContrastiveLoss: ("pos_margin", "neg_margin", "squared"),
        TripletLoss: ("margin", "squared"),
        QuadrupletLoss: ("margin1", "margin2", "second_pair"),
        LiftedStructureLoss: ("margin",),
        NPairLoss: ("l2_reg",),
    }[type(loss)]
    return {n: getattr(loss, n) for n in names}


@pytest.mark.parametrize("loss", _losses(), ids=_ids)
def test_empty_mined_tuples_give_zero_with_a_graph(loss):
    x, labels = _batch()
    x.requires_grad_(True)
    empty = torch.zeros(0, dtype=torch.long)
    tup = (
        Triplets(empty, empty, empty)
        if isinstance(loss, TripletLoss | QuadrupletLoss)
        else Pairs(empty, empty, empty, empty)
    )
    out = type(loss)(miner=_FixedMiner(tup), **_params(loss))(x, labels)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("loss", _losses(), ids=_ids)
def test_bad_input_raises(loss):
    x, labels = _batch()
    with pytest.raises(ValueError, match="differ in length"):
        loss(x, labels[:-1])
    with pytest.raises(ValueError, match=r"no positive pair|no two samples"):
        loss(x[:3], torch.tensor([0, 1, 2]))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss(bad, labels)
    t = _tuples_for(loss, [(0, 1, 3), (3, 4, len(LABELS))])
    with pytest.raises(ValueError, match="tuple indices"):
        loss(x, labels, t)


@pytest.mark.parametrize("cls", [TripletLoss, QuadrupletLoss])
def test_triplet_losses_reject_pairs(cls):
    x, labels = _batch()
    with pytest.raises(ValueError, match="needs Triplets"):
        cls()(x, labels, _pairs([(0, 1)], [(0, 3)]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ContrastiveLoss(pos_margin=1.0, neg_margin=0.5),
        lambda: ContrastiveLoss(pos_margin=-0.1),
        lambda: TripletLoss(margin=-1.0),
        lambda: QuadrupletLoss(margin2=-0.1),
        lambda: LiftedStructureLoss(margin=0.0),
        lambda: NPairLoss(l2_reg=-1.0),
    ],
)
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_all_tuples_defaults_count_what_they_say():
    # the default reductions against the explicit full tuple lists (float64, exact)
    x, labels = _batch()
    pos, neg = _all_pos(LABELS), _all_neg(LABELS)
    t = _all_triplets(LABELS)
    for loss in _losses():
        full = _triplets(t) if isinstance(loss, TripletLoss | QuadrupletLoss) else _pairs(pos, neg)
        assert loss(x, labels).item() == pytest.approx(loss(x, labels, full).item(), rel=1e-12)
    assert len(list(itertools.chain(pos, neg))) == len(LABELS) * (len(LABELS) - 1)


# ----------------------------------------------------------------------------- numerics
def test_masked_logsumexp_matches_the_masked_sum_and_keeps_gradients_normal():
    x = torch.tensor([[0.0, -30.0, -120.0, 5.0], [1.0, 2.0, 3.0, 4.0], [7.0, -200.0, 0.5, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    x64 = x.double().requires_grad_(True)
    got = masked_logsumexp(x64, mask)
    want0 = math.log(1 + math.exp(-30) + math.exp(-120))
    want2 = math.log(math.exp(7) + math.exp(-200) + math.exp(1))
    assert got[0].item() == pytest.approx(want0, rel=1e-15)
    assert got[2].item() == pytest.approx(want2, rel=1e-15)
    assert got[1].item() < -1e300  # no entry: a finite stand-in for −∞
    got[0].add(got[2]).backward()
    g = x64.grad
    assert g[0, 1].item() == pytest.approx(math.exp(-30 - want0), rel=1e-12)
    assert g[0, 2] == 0 and g[2, 1] == 0  # far below the row maximum: dropped, not subnormal
    assert g[0, 3] == 0 and g[1].abs().sum() == 0 and torch.isfinite(g).all()


def test_flush_subnormal_grad_zeroes_only_subnormal_entries():
    t = torch.ones(4, requires_grad=True)
    u = t * 1.0
    flush_subnormal_grad(u)
    (u * torch.tensor([1e-40, 2e-38, 0.5, -1e-39])).sum().backward()
    assert t.grad.tolist() == [0.0, pytest.approx(2e-38), 0.5, 0.0]


class _GradRecordingDistance(EuclideanDistance):
    """Records the gradient that reaches the distance matrix (after the loss's own hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.grads: list[torch.Tensor] = []

    def matrix(self, x, y=None):
        m = super().matrix(x, y)
        m.register_hook(self.grads.append)
        return m * 1.0


@pytest.mark.parametrize("cls", [NPairLoss, LiftedStructureLoss])
def test_float32_peaked_softmax_stays_accurate_and_free_of_subnormals(cls):
    # large-norm embeddings: exponents spread over hundreds, the subnormal range included
    x = 40.0 * torch.randn(24, 16, dtype=torch.float64)
    labels = torch.arange(6).repeat_interleave(4)
    params = {"l2_reg": 0.0} if cls is NPairLoss else {"margin": 1.0}
    x64, x32 = x.clone().requires_grad_(True), x.float().requires_grad_(True)
    want = cls(distance=EuclideanDistance(), **params)(x64, labels)
    recorder = _GradRecordingDistance()
    got = cls(distance=recorder, **params)(x32, labels)
    want.backward()
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-3, atol=1e-6)
    (g,) = recorder.grads
    nonzero = g[g != 0].abs()
    assert nonzero.numel() > 0 and bool((nonzero >= torch.finfo(torch.float32).tiny).all())


def test_npair_gram_backward_is_symmetrised_and_flushes_subnormals():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 5)
    w[0, 1] = 1e-40  # subnormal in float32: flushed, so only w[1, 0] reaches (0, 1)
    (_Gram.apply(x) * w).sum().backward()
    w_flushed = w.clone()
    w_flushed[0, 1] = 0.0
    torch.testing.assert_close(x.grad, (w_flushed + w_flushed.T) @ x.detach())
    torch.testing.assert_close(_Gram.apply(x.detach()), x.detach() @ x.detach().T)
