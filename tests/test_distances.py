"""Distances against float64 loops; gradients at zero distance; the Mahalanobis projection."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from facemetric.distances import (
    CosineDistance,
    Distance,
    EuclideanDistance,
    MahalanobisDistance,
    SquaredEuclideanDistance,
)


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(u * u for u in v))
    return [u / n for u in v]


def _ref(kind: str, a: list[float], b: list[float], w: list[list[float]] | None = None) -> float:
    if kind == "cosine":
        dot = sum(u * v for u, v in zip(a, b, strict=True))
        return 1.0 - dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))
    if kind.endswith("_normalized"):
        a, b = _unit(a), _unit(b)
    diff = [u - v for u, v in zip(a, b, strict=True)]
    if w is not None:
        diff = [sum(r * d for r, d in zip(row, diff, strict=True)) for row in w]
    sq = sum(d * d for d in diff)
    return sq if kind.startswith("squared") else math.sqrt(sq)


def _make(kind: str) -> Distance:
    return {
        "cosine": CosineDistance(),
        "euclidean": EuclideanDistance(),
        "euclidean_normalized": EuclideanDistance(normalize=True),
        "squared": SquaredEuclideanDistance(),
        "squared_normalized": SquaredEuclideanDistance(normalize=True),
    }[kind]


KINDS = ["cosine", "euclidean", "euclidean_normalized", "squared", "squared_normalized"]


@pytest.mark.parametrize("kind", KINDS)
def test_matrix_and_pairs_match_loops(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(4, 5, generator=g, dtype=torch.float64)
    dist = _make(kind)
    xs, ys = x.tolist(), y.tolist()
    want_xy = torch.tensor([[_ref(kind, a, b) for b in ys] for a in xs], dtype=torch.float64)
    want_xx = torch.tensor([[_ref(kind, a, b) for b in xs] for a in xs], dtype=torch.float64)
    torch.testing.assert_close(dist.matrix(x, y), want_xy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dist.matrix(x), want_xx, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(dist(x, y), want_xy, rtol=1e-10, atol=1e-10)  # forward = matrix
    want_pairs = torch.tensor(
        [_ref(kind, a, b) for a, b in zip(xs[:4], ys, strict=True)], dtype=torch.float64
    )
    torch.testing.assert_close(dist.pairs(x[:4], y), want_pairs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_matrix_close_to_float64_loops(kind):
    x = torch.randn(16, 64)
    want = torch.tensor([[_ref(kind, a, b) for b in x.tolist()] for a in x.tolist()])
    got = _make(kind).matrix(x)
    off = ~torch.eye(16, dtype=torch.bool)
    torch.testing.assert_close(got[off], want[off], rtol=1e-4, atol=1e-4)
    assert float(got.diagonal().abs().max()) < 1e-3


@pytest.mark.parametrize("kind", ["euclidean", "euclidean_normalized", "squared"])
def test_zero_diagonal_with_zero_finite_gradient(kind):
    # large-norm float32 rows: ‖x‖² + ‖x‖² − 2x·x cancels badly unless the diagonal is pinned
    x = (torch.randn(32, 512) * 3.0).requires_grad_()
    d = _make(kind).matrix(x)
    if kind.startswith("euclidean"):
        assert float(d.detach().diagonal().max()) <= 1e-6  # sqrt of the 1e-12 clamp at most
    else:
        assert float(d.detach().diagonal().abs().max()) == 0.0
    (grad,) = torch.autograd.grad(d.diagonal().sum(), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0
    (grad,) = torch.autograd.grad(_make(kind).pairs(x, x.detach().clone()).sum(), x)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


def test_euclidean_full_matrix_gradient_is_finite_with_duplicates():
    base = torch.randn(4, 8)
    x = torch.cat([base, base]).requires_grad_()  # exact duplicate rows: distance 0 off-diagonal
    d = EuclideanDistance().matrix(x)
    (grad,) = torch.autograd.grad(d.sum(), x)
    assert bool(torch.isfinite(grad).all())


def test_cosine_zero_row_is_orthogonal_to_everything():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    d = CosineDistance().matrix(x)
    torch.testing.assert_close(d[0], torch.ones(3))
    assert CosineDistance.bounded and not EuclideanDistance.bounded


def test_mahalanobis_is_euclidean_at_init():
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    m = MahalanobisDistance(5).double()
    torch.testing.assert_close(m.matrix(x, y), EuclideanDistance().matrix(x, y))
    torch.testing.assert_close(m.pairs(x[:3], y), EuclideanDistance().pairs(x[:3], y))
    assert m.weight.shape == (5, 5)


@pytest.mark.parametrize("rank", [5, 3])
@pytest.mark.parametrize("normalize", [False, True])
def test_mahalanobis_is_norm_of_projected_difference(rank, normalize):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = MahalanobisDistance(5, rank=rank, normalize=normalize).double()
    w = torch.randn(rank, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(w)
    kind = "euclidean_normalized" if normalize else "euclidean"
    wl = w.tolist()
    want = torch.tensor(
        [[_ref(kind, a, b, wl) for b in y.tolist()] for a in x.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(m.matrix(x, y), want, rtol=1e-10, atol=1e-10)
    want_pairs = torch.tensor(
        [_ref(kind, a, b, wl) for a, b in zip(x[:3].tolist(), y.tolist(), strict=True)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(m.pairs(x[:3], y), want_pairs, rtol=1e-10, atol=1e-10)


class _Pairs(torch.nn.Module):
    """``forward`` = the wrapped distance's ``pairs``, so ``functional_call`` can reach it."""

    def __init__(self, distance: Distance) -> None:
        super().__init__()
        self.distance = distance

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance.pairs(x, y)


def test_mahalanobis_gradcheck_wrt_weight():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, generator=g, dtype=torch.float64)
    m = MahalanobisDistance(4, rank=3).double()
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: functional_call(m, {"weight": w}, (x, y)), (w0,))
    pairs = _Pairs(m)
    assert torch.autograd.gradcheck(
        lambda w: functional_call(pairs, {"distance.weight": w}, (x[:3], y)), (w0,)
    )
    # and the gradient reaches the module's own parameter in ordinary training
    m.matrix(x, y).sum().backward()
    assert m.weight.grad is not None and float(m.weight.grad.abs().sum()) > 0


def test_mahalanobis_is_trainable_and_checks_dim():
    m = MahalanobisDistance(4, rank=2)
    assert [p.shape for p in m.parameters()] == [torch.Size([2, 4])]
    with pytest.raises(ValueError, match="dim=4"):
        m.matrix(torch.randn(3, 5))
    with pytest.raises(ValueError, match="positive"):
        MahalanobisDistance(0)
    with pytest.raises(ValueError, match="positive"):
        MahalanobisDistance(4, rank=0)


def test_gram_backward_is_the_true_derivative():
    from facemetric.distances import gram

    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gram, (x,))
    g = torch.randn(6, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad(gram(x), x, g)
    (plain,) = torch.autograd.grad(x @ x.T, x, g)
    torch.testing.assert_close(ours, plain)
