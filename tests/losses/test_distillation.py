"""Distillation losses against float64 loop references (formulas from the papers, written
element by element with ``math``), gradcheck, and their invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from facemetric.losses.classifier import ArcFaceLoss
from facemetric.losses.distillation import (
    DistillationObjective,
    EmbeddingDistillationLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityMatrixLoss,
)


def _unit_rows(x: Tensor) -> list[list[float]]:
    rows = x.detach().double().tolist()
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b, strict=True)))


def _huber(e: float, delta: float = 1.0) -> float:
    return 0.5 * e * e / delta if abs(e) < delta else abs(e) - 0.5 * delta


def ref_embedding(s: Tensor, t: Tensor, kind: str) -> float:
    su, tu = _unit_rows(s), _unit_rows(t)
    if kind == "l2":
        return sum(_dist(a, b) ** 2 for a, b in zip(su, tu, strict=True)) / len(su)
    cos = [sum(p * q for p, q in zip(a, b, strict=True)) for a, b in zip(su, tu, strict=True)]
    return sum(1 - c for c in cos) / len(cos)


def ref_rkd_distance(s: Tensor, t: Tensor) -> float:
    su, tu = _unit_rows(s), _unit_rows(t)
    n = len(su)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(_dist(su[i], su[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(_dist(tu[i], tu[j]) for i, j in pairs) / len(pairs)
    return sum(
        _huber(_dist(su[i], su[j]) / mu_s - _dist(tu[i], tu[j]) / mu_t) for i, j in pairs
    ) / len(pairs)


def _angle(x: list[list[float]], i: int, j: int, k: int) -> float:
    a = [p - q for p, q in zip(x[i], x[j], strict=True)]
    b = [p - q for p, q in zip(x[k], x[j], strict=True)]
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    return sum(p * q for p, q in zip(a, b, strict=True)) / (na * nb)


def ref_rkd_angle(s: Tensor, t: Tensor) -> float:
    su, tu = _unit_rows(s), _unit_rows(t)
    n = len(su)
    trip = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)
            if len({i, j, k}) == 3]
    return sum(_huber(_angle(su, i, j, k) - _angle(tu, i, j, k)) for i, j, k in trip) / len(trip)


def ref_similarity(s: Tensor, t: Tensor) -> float:
    su, tu = _unit_rows(s), _unit_rows(t)
    n = len(su)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                cs = sum(p * q for p, q in zip(su[i], su[j], strict=True))
                ct = sum(p * q for p, q in zip(tu[i], tu[j], strict=True))
                total += (cs - ct) ** 2
    return total / (n * (n - 1))


def _pair(b: int = 7, ds: int = 5, dt: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ds, generator=g, dtype=torch.float64), torch.randn(
        b, dt, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_embedding_loss_matches_loop(kind):
    s, t = _pair()
    got = EmbeddingDistillationLoss(kind)(s, t)
    assert float(got) == pytest.approx(ref_embedding(s, t, kind), rel=1e-12)


def test_l2_is_twice_cosine_for_unit_vectors():
    s, t = _pair(seed=3)
    cos = float(EmbeddingDistillationLoss("cosine")(s, t))
    assert float(EmbeddingDistillationLoss("l2")(s, t)) == pytest.approx(2 * cos, rel=1e-12)


def test_embedding_projection_when_dimensions_differ():
    s, t = _pair(ds=6, dt=4)
    loss = EmbeddingDistillationLoss("cosine", student_dim=6, teacher_dim=4).double()
    assert loss.projection is not None
    w = loss.projection.weight.detach().double().numpy()
    projected = torch.from_numpy(np.stack([w @ row for row in s.numpy()]))
    value = float(loss(s, t).detach())
    assert value == pytest.approx(ref_embedding(projected, t, "cosine"), rel=1e-10)
    loss(s, t).backward()
    assert loss.projection.weight.grad is not None  # the projection is trained


def test_embedding_dimension_mismatch_without_projection_is_refused():
    s, t = _pair(ds=6, dt=4)
    with pytest.raises(ValueError, match="projection"):
        EmbeddingDistillationLoss()(s, t)
    assert EmbeddingDistillationLoss(student_dim=4, teacher_dim=4).projection is None


def test_rkd_distance_matches_loop():
    s, t = _pair(b=6, ds=4, dt=3)
    assert float(RKDDistanceLoss()(s, t)) == pytest.approx(ref_rkd_distance(s, t), rel=1e-10)


def test_rkd_angle_matches_loop():
    s, t = _pair(b=6, ds=4, dt=3, seed=1)
    assert float(RKDAngleLoss()(s, t)) == pytest.approx(ref_rkd_angle(s, t), rel=1e-10)


def test_similarity_matrix_matches_loop():
    s, t = _pair(b=6, ds=4, dt=3, seed=2)
    got = float(SimilarityMatrixLoss()(s, t))
    assert got == pytest.approx(ref_similarity(s, t), rel=1e-10)


def test_huber_branch_beyond_delta_is_used():
    s, t = _pair(b=5, ds=3, dt=3, seed=4)
    small = RKDDistanceLoss(delta=0.05)
    su, tu = _unit_rows(s), _unit_rows(t)
    n = len(su)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    mu_s = sum(_dist(su[i], su[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(_dist(tu[i], tu[j]) for i, j in pairs) / len(pairs)
    errors = [_dist(su[i], su[j]) / mu_s - _dist(tu[i], tu[j]) / mu_t for i, j in pairs]
    assert any(abs(e) >= 0.05 for e in errors)
    want = sum(_huber(e, 0.05) for e in errors) / len(errors)
    assert float(small(s, t)) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("loss", [EmbeddingDistillationLoss("cosine"),
                                  EmbeddingDistillationLoss("l2"), RKDDistanceLoss(),
                                  RKDAngleLoss(), SimilarityMatrixLoss()],
                         ids=lambda m: type(m).__name__ + getattr(m, "kind", ""))
def test_gradcheck(loss):
    s, t = _pair(b=5, ds=4, dt=4, seed=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,))


def test_relational_losses_ignore_a_rotation_the_regression_does_not():
    """A student that is the teacher rotated (into another dimension) has the teacher's
    relations: RKD and the similarity loss are 0, the embedding regression is not."""
    _, t = _pair(b=8, ds=4, dt=4, seed=6)
    q, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))  # orthonormal columns
    student = t @ q.T  # (8, 6): same inner products as t
    for loss in (RKDDistanceLoss(), RKDAngleLoss(), SimilarityMatrixLoss()):
        assert float(loss(student, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(EmbeddingDistillationLoss()(t * 3.0, t)) == pytest.approx(0.0, abs=1e-12)
    assert float(EmbeddingDistillationLoss()(t @ q[:4].T, t)) > 1e-3


@pytest.mark.parametrize("loss", [EmbeddingDistillationLoss(), RKDDistanceLoss(),
                                  RKDAngleLoss(), SimilarityMatrixLoss()])
def test_nan_and_shape_errors(loss):
    s, t = _pair(b=5, ds=4, dt=4)
    bad = t.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss(s, bad)
    with pytest.raises(ValueError, match="teacher rows"):
        loss(s, t[:4])


def test_objective_is_the_weighted_sum():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(8, 4, generator=g)
    t = torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    arc = ArcFaceLoss(num_classes=4, embedding_size=4, scale=16.0, margin=0.2)
    objective = DistillationObjective(
        arc, {"embedding": (3.0, EmbeddingDistillationLoss()),
              "rkd_angle": (2.0, RKDAngleLoss()), "unused": (0.0, SimilarityMatrixLoss())},
        label_weight=0.5)
    got = float(objective(s, labels, t).detach())
    want = (0.5 * float(arc(s, labels).detach()) + 3.0 * ref_embedding(s, t, "cosine")
            + 2.0 * ref_rkd_angle(s, t))
    assert got == pytest.approx(want, rel=1e-5)
    assert set(objective.last) == {"label", "embedding", "rkd_angle"}
    assert any(p is arc.weight for p in objective.parameters())  # centres are trained


def test_objective_refuses_nothing_to_optimise():
    with pytest.raises(ValueError, match="every weight is 0"):
        DistillationObjective(None, {"embedding": (0.0, EmbeddingDistillationLoss())},
                              label_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        DistillationObjective(nn.Identity(), {"embedding": (-1.0, EmbeddingDistillationLoss())})
