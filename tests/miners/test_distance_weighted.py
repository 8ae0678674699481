"""DistanceWeightedMiner: analytic weights by loops, sampling frequencies, reproducibility."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from facemetric.distances import (
    CosineDistance,
    EuclideanDistance,
    MahalanobisDistance,
    SquaredEuclideanDistance,
)
from facemetric.miners import DistanceWeightedMiner
from facemetric.tuples import all_pairs


def _sphere(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64))


def _ref_probabilities(
    x: torch.Tensor, labels: list[int], cutoff: float, nonzero_loss_cutoff: float
) -> list[list[float]]:
    """Rows of ∝ 1/q(d) over eligible negatives, by loops in float64 log space."""
    rows = x.tolist()
    dim = len(rows[0])
    out = []
    for a, xa in enumerate(rows):
        logs: dict[int, float] = {}
        negatives = [j for j in range(len(rows)) if labels[j] != labels[a]]
        for j in negatives:
            d = math.sqrt(sum((u - v) ** 2 for u, v in zip(xa, rows[j], strict=True)))
            if d < nonzero_loss_cutoff:
                dc = max(d, cutoff)
                logs[j] = -(dim - 2) * math.log(dc) - (dim - 3) / 2 * math.log(1 - dc * dc / 4)
        if not logs:  # nothing below the loss cut-off: uniform over the negatives
            logs = dict.fromkeys(negatives, 0.0)
        top = max(logs.values(), default=0.0)
        total = sum(math.exp(v - top) for v in logs.values())
        out.append(
            [math.exp(logs[j] - top) / total if j in logs else 0.0 for j in range(len(rows))]
        )
    return out


def _miner(seed: int = 0, **kwargs) -> DistanceWeightedMiner:
    return DistanceWeightedMiner(generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("dim", [2, 3, 5, 16, 512])
def test_probabilities_match_loop_reference(dim):
    x = _sphere(14, dim, seed=dim)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6]
    miner = _miner()
    got = miner.negative_probabilities(miner.distance.matrix(x), torch.tensor(labels), dim)
    want = torch.tensor(_ref_probabilities(x, labels, 0.5, 1.4), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(got.sum(1), torch.ones(14, dtype=torch.float64))


def test_cutoffs_are_respected():
    x = _sphere(10, 3, seed=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    miner = _miner(cutoff=0.7, nonzero_loss_cutoff=1.3)
    d = miner.distance.matrix(x)
    probs = miner.negative_probabilities(d, labels, 3)
    want = torch.tensor(_ref_probabilities(x, labels.tolist(), 0.7, 1.3), dtype=torch.float64)
    torch.testing.assert_close(probs, want, rtol=1e-9, atol=1e-12)
    same = labels[:, None] == labels[None, :]
    assert bool((probs[same] == 0).all())
    far = (d >= 1.3) & ((d < 1.3) & ~same).any(1, keepdim=True)  # outside the fallback rows
    assert int(far.sum()) > 5 and bool((probs[far] == 0).all())
    near = (d < 0.7) & ~same
    assert int(near.sum()) > 0  # clamped: all of an anchor's nearest negatives weigh the same
    for a, n in near.nonzero().tolist():
        assert probs[a, n] == pytest.approx(float(probs[a][near[a]].max()), rel=1e-12)


def test_sampling_frequencies_follow_the_weights():
    # anchor 0 with 300 positives (so one call draws 300 of its negatives) and 9 negatives
    dim = 4
    negatives = _sphere(9, dim, seed=3)
    anchor = _sphere(1, dim, seed=4)
    positives = _sphere(300, dim, seed=5)
    x = torch.cat([anchor, positives, negatives]).float()
    labels = torch.tensor([0] * 301 + list(range(1, 10)))
    probs = _ref_probabilities(torch.cat([anchor, negatives]), [0, *range(1, 10)], 0.5, 1.4)[0]
    expected = probs[1:]  # over the 9 negatives, indices 301..309 of the batch
    assert min(expected) == 0.0 and max(expected) > 0.3  # the test data is not near-uniform

    miner, counts = _miner(seed=11), Counter()
    for _ in range(40):
        t = miner(x, labels)
        counts.update(t.negative[t.anchor == 0].tolist())
    observed = [counts[301 + j] for j in range(9)]
    total = sum(observed)
    assert total == 40 * 300
    # never a negative at or beyond the loss cut-off
    assert all(o == 0 for o, e in zip(observed, expected, strict=True) if e == 0.0)
    live = [j for j in range(9) if expected[j] > 0]
    obs, exp = [observed[j] for j in live], [expected[j] * total for j in live]
    assert chisquare(obs, exp).pvalue > 1e-3
    # the same counts are far from uniform sampling among the live negatives
    assert chisquare(obs, [total / len(live)] * len(live)).pvalue < 1e-12


def test_uniform_fallback_when_all_negatives_are_far():
    # identity 0 at the north pole, its negatives all on the southern cap (d > 1.4)
    x = torch.tensor(
        [[0.0, 0.0, 1.0], [0.1, 0.0, 0.995], [0.0, 0.3, -0.95], [0.3, 0.0, -0.95], [0, 0, -1]]
    )
    x = torch.nn.functional.normalize(x)
    labels = torch.tensor([0, 0, 1, 1, 2])
    miner = _miner(seed=2)
    probs = miner.negative_probabilities(miner.distance.matrix(x), labels, 3)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.0, 1 / 3, 1 / 3, 1 / 3]))
    counts = Counter()
    for _ in range(600):
        t = miner(x, labels)
        counts.update(t.negative[t.anchor == 0].tolist())
    assert chisquare([counts[2], counts[3], counts[4]]).pvalue > 1e-3


def test_every_positive_pair_once_with_a_valid_negative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 6, (30,), generator=g)
    labels[4] = 50  # a singleton: no triplet as anchor, still a valid negative
    t = _miner()(x, labels)
    ref = all_pairs(labels)
    got_pos = sorted(zip(t.anchor.tolist(), t.positive.tolist(), strict=True))
    assert got_pos == sorted(zip(ref.pos_a.tolist(), ref.pos_b.tolist(), strict=True))
    assert bool((labels[t.negative] != labels[t.anchor]).all())
    pairs = t.to_pairs()  # pair losses: all positives + the distinct sampled negatives
    assert pairs.num_pos == ref.num_pos
    assert bool((labels[pairs.neg_a] != labels[pairs.neg_b]).all())


def test_reproducible_with_a_seed():
    x = torch.randn(40, 16)
    labels = torch.arange(10).repeat_interleave(4)
    a, b, c = _miner(seed=7)(x, labels), _miner(seed=7)(x, labels), _miner(seed=8)(x, labels)
    assert torch.equal(a.negative, b.negative)
    assert not torch.equal(a.negative, c.negative)
    assert torch.equal(a.anchor, c.anchor) and torch.equal(a.positive, c.positive)


def test_no_nan_at_zero_and_antipodal_distance():
    # a negative identical to the anchor (d = 0) and one antipodal to it (d = 2)
    base = torch.nn.functional.normalize(torch.randn(1, 64))
    x = torch.cat([base, base + 0.01, base, -base, torch.randn(4, 64)])
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    for nonzero_loss_cutoff in (1.4, 2.5):
        miner = _miner(nonzero_loss_cutoff=nonzero_loss_cutoff)
        dist = miner.distance.matrix(x)
        probs = miner.negative_probabilities(dist, labels, 64)
        assert bool(torch.isfinite(probs).all())
        torch.testing.assert_close(probs.sum(1), torch.ones(8))
        t = miner(x, labels)
        assert len(t) == 2
    # with the cut-off above 2 the antipodal point is the most likely negative of anchor 0
    assert int(probs[0].argmax()) == 3


def test_cosine_distance_gives_the_same_weights():
    x = torch.randn(12, 5, dtype=torch.float64) * 3.0  # not normalised
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    euclid, cosine = _miner(), _miner(distance=CosineDistance())
    pe = euclid.negative_probabilities(euclid.distance.matrix(x), labels, 5)
    pc = cosine.negative_probabilities(cosine.distance.matrix(x), labels, 5)
    torch.testing.assert_close(pe, pc, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "distance",
    [EuclideanDistance(), SquaredEuclideanDistance(normalize=True), MahalanobisDistance(4)],
)
def test_rejects_distances_off_the_sphere(distance):
    with pytest.raises(ValueError, match="unit sphere"):
        DistanceWeightedMiner(distance=distance)


@pytest.mark.parametrize(("cutoff", "nonzero"), [(0.0, 1.4), (1.5, 1.4), (0.5, float("inf"))])
def test_rejects_bad_cutoffs(cutoff, nonzero):
    with pytest.raises(ValueError, match="cutoff"):
        DistanceWeightedMiner(cutoff, nonzero)


def test_empty_without_negatives_and_one_dimensional_input():
    for labels in ([1, 1, 1, 1], [0, 1, 2, 3]):
        t = _miner()(torch.randn(4, 3), torch.tensor(labels))
        assert len(t) == 0 and t.negative.dtype == torch.int64
    with pytest.raises(ValueError, match="dim >= 2"):
        _miner()(torch.randn(4, 1), torch.tensor([0, 0, 1, 1]))
