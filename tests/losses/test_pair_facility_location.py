"""FacilityLocationLoss, its greedy inference and NMI against loop-written references."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from structured_toy import nn_accuracy, toy_problem

from facemetric.losses.pair.facility_location import (
    FacilityLocationLoss,
    greedy_loss_augmented_inference,
    normalized_mutual_info,
    oracle_medoids,
)
from facemetric.tuples import Triplets

# ---------------------------------------------------------------- loop-written references


def loop_distances(x: torch.Tensor) -> list[list[float]]:
    rows = x.tolist()
    return [
        [math.sqrt(sum((a - b) ** 2 for a, b in zip(r, s, strict=True))) for s in rows]
        for r in rows
    ]


def _assign(D: list[list[float]], S: list[int]) -> list[int]:
    """Nearest medoid (position in S), ties to the first listed."""
    out = []
    for i in range(len(D)):
        best = 0
        for k in range(1, len(S)):
            if D[i][S[k]] < D[i][S[best]]:
                best = k
        out.append(best)
    return out


def loop_nmi(a: list[int], b: list[int]) -> float:
    """NMI with arithmetic normalisation, by counting (checked against scikit-learn below)."""
    n = len(a)
    ca, cb, cab = Counter(a), Counter(b), Counter(zip(a, b, strict=True))
    if len(ca) == len(cb) == 1:
        return 1.0
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    mi = sum(c / n * math.log(c * n / (ca[u] * cb[v])) for (u, v), c in cab.items())
    return max(mi, 0.0) / ((ha + hb) / 2)


def _objective(D: list[list[float]], lab: list[int], S: list[int], gamma: float) -> float:
    F = -sum(min(D[i][s] for s in S) for i in range(len(D)))
    return F + gamma * (1.0 - loop_nmi(_assign(D, S), lab))


def ref_greedy(D: list[list[float]], lab: list[int], gamma: float) -> list[int]:
    S: list[int] = []
    for _ in range(len(set(lab))):
        best = None
        for j in range(len(D)):
            if j in S:
                continue
            score = _objective(D, lab, [*S, j], gamma)
            if best is None or score > best[0]:
                best = (score, j)
        assert best is not None
        S.append(best[1])
    return S


def ref_oracle_value(D: list[list[float]], lab: list[int]) -> float:
    total = 0.0
    for k in sorted(set(lab)):
        members = [i for i in range(len(lab)) if lab[i] == k]
        total += max(-sum(D[i][j] for i in members) for j in members)
    return total


def ref_loss(x: torch.Tensor, y: torch.Tensor, gamma: float) -> float:
    D, lab = loop_distances(x), y.tolist()
    S = ref_greedy(D, lab, gamma)
    return max(_objective(D, lab, S, gamma) - ref_oracle_value(D, lab), 0.0) / len(lab)


def _batch(seed: int, sizes: list[int], dim: int = 3, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((s,), 2 * k + 1) for k, s in enumerate(sizes)])
    centres = spread * torch.randn(len(sizes), dim, generator=g, dtype=torch.float64)
    x = centres.repeat_interleave(torch.tensor(sizes), 0)
    x = x + torch.randn(len(y), dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


# ---------------------------------------------------------------------------- NMI


def test_nmi_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(2, 40, (1,), generator=g))
        a = torch.randint(0, 1 + trial % 6, (n,), generator=g)
        b = torch.randint(0, 1 + (trial // 6) % 5, (n,), generator=g) * 7 - 3
        want = normalized_mutual_info_score(b.numpy(), a.numpy())
        assert math.isclose(float(normalized_mutual_info(a, b)), want, abs_tol=1e-12)
        assert math.isclose(loop_nmi(a.tolist(), b.tolist()), want, abs_tol=1e-12)
    for a, b in [
        ([0, 0, 0], [1, 1, 1]),  # both a single group: 1
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one group vs all singletons: 0
        ([0, 0, 1, 1], [1, 1, 0, 0]),  # same partition, other names: 1
        ([0, 1, 2, 3], [3, 2, 1, 0]),
    ]:
        ta, tb = torch.tensor(a), torch.tensor(b)
        want = normalized_mutual_info_score(b, a)
        assert math.isclose(float(normalized_mutual_info(ta, tb)), want, abs_tol=1e-12)
        assert math.isclose(loop_nmi(a, b), want, abs_tol=1e-12)
    with pytest.raises(ValueError):
        normalized_mutual_info(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))


# ---------------------------------------------------------------------------- inference


def check_greedy_trace(D: list[list[float]], lab: list[int], gamma: float, S: list[int]):
    """Every pick of ``S`` maximises the objective given the picks before it (exact ties, e.g.
    the two points of a two-sample class, may go either way)."""
    assert len(S) == len(set(lab)) == len(set(S))
    for k in range(len(S)):
        prefix = S[:k]
        scores = {
            j: _objective(D, lab, [*prefix, j], gamma) for j in range(len(D)) if j not in prefix
        }
        best = max(scores.values())
        assert math.isclose(scores[S[k]], best, rel_tol=1e-12, abs_tol=1e-12), (k, S)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 5.0, 50.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_loop_greedy(gamma: float, seed: int):
    x, y = _batch(seed, [3, 4, 2, 3])
    D, lab = loop_distances(x), y.tolist()
    got = greedy_loss_augmented_inference(torch.tensor(D, dtype=torch.float64), y, gamma)
    check_greedy_trace(D, lab, gamma, got.tolist())
    x, y = _batch(seed + 10, [3, 4, 3, 5])
    D, lab = loop_distances(x), y.tolist()
    got = greedy_loss_augmented_inference(torch.tensor(D, dtype=torch.float64), y, gamma)
    check_greedy_trace(D, lab, gamma, got.tolist())
    # and it reaches the loop greedy's value (its picks may differ only at exact ties)
    ref = _objective(D, lab, ref_greedy(D, lab, gamma), gamma)
    assert math.isclose(_objective(D, lab, got.tolist(), gamma), ref, rel_tol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 10.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_vs_brute_force(gamma: float, seed: int):
    # well-separated classes of at most two samples (either is a best medoid): greedy reaches
    # the exact maximum over all |S| = |Y| subsets
    x, y = _batch(seed, [2, 2, 1, 2], spread=12.0)
    D, lab = loop_distances(x), y.tolist()
    subsets = itertools.combinations(range(len(lab)), len(set(lab)))
    brute = max(_objective(D, lab, list(S), gamma) for S in subsets)
    S = greedy_loss_augmented_inference(torch.tensor(D, dtype=torch.float64), y, gamma)
    assert math.isclose(_objective(D, lab, S.tolist(), gamma), brute, rel_tol=1e-12)
    # overlapping classes, or a huge margin weight: greedy never beats the true maximum
    for x, y, g in [
        (*_batch(seed, [3, 2, 3], spread=0.3), gamma),
        (*_batch(seed, [2, 1, 2], spread=12.0), 100.0),
    ]:
        D, lab = loop_distances(x), y.tolist()
        subsets = itertools.combinations(range(len(lab)), len(set(lab)))
        brute = max(_objective(D, lab, list(S), g) for S in subsets)
        S = greedy_loss_augmented_inference(torch.tensor(D, dtype=torch.float64), y, g)
        assert _objective(D, lab, S.tolist(), g) <= brute + 1e-12


def test_oracle_medoids_minimise_within_class_distance():
    x, y = _batch(5, [4, 3, 5])
    D, lab = loop_distances(x), y.tolist()
    got = oracle_medoids(torch.tensor(D, dtype=torch.float64), y).tolist()
    for k, cls in enumerate(sorted(set(lab))):
        members = [i for i in range(len(lab)) if lab[i] == cls]
        assert got[k] == min(members, key=lambda j: sum(D[i][j] for i in members))


# ---------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("gamma", [0.0, 1.0, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_loop_reference(gamma: float, seed: int):
    x, y = _batch(seed, [3, 3, 2, 4], dim=4)
    want = ref_loss(x, y, gamma)
    assert want > 0
    got = float(FacilityLocationLoss(gamma=gamma)(x, y))
    assert math.isclose(got, want, rel_tol=1e-9)


def test_single_class_batch_gives_zero():
    x = torch.randn(5, 3, dtype=torch.float64)
    assert float(FacilityLocationLoss(gamma=3.0)(x, torch.zeros(5, dtype=torch.long))) == 0.0


def test_gradcheck():
    x, y = _batch(7, [3, 2, 3], dim=3, spread=0.5)
    x = x.clone().requires_grad_(True)
    loss = FacilityLocationLoss(gamma=2.0)
    assert float(loss(x, y).detach()) > 0
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,))


def test_bad_input():
    loss = FacilityLocationLoss()
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError):
        loss(x, y[:4])
    with pytest.raises(ValueError):
        loss(x, torch.arange(6))
    with pytest.raises(ValueError):
        bad = x.clone()
        bad[3, 2] = float("nan")
        loss(bad, y)
    with pytest.raises(ValueError):
        i = torch.tensor([0])
        loss(x, y, Triplets(i, i + 1, i + 2))
    with pytest.raises(ValueError):
        FacilityLocationLoss(gamma=-1.0)


# ---------------------------------------------------------------------------- optimisation


def test_optimisation_lowers_loss_and_raisesnn_accuracy():
    x, y = toy_problem()
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.copy_(torch.eye(8))
        model.bias.zero_()
    loss_fn = FacilityLocationLoss(gamma=10.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.no_grad():
        before, acc_before = float(loss_fn(model(x), y)), nn_accuracy(model(x), y)
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if float(loss.detach()) == 0.0:  # the structured margin is met: nothing left to learn
            break
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, acc_after = float(loss_fn(model(x), y)), nn_accuracy(model(x), y)
    assert after < 0.25 * before
    assert acc_before <= 0.5 and acc_after >= 0.9
