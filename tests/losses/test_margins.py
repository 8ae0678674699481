"""Margins (target-cosine rewrites) against float64 formulas taken from their papers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from facemetric.losses.margins import (
    ArcMargin,
    CombinedMargin,
    CosMargin,
    DynamicArcMargin,
    Margin,
    MultiplicativeAngularMargin,
    NoMargin,
)

# cosines well inside (−1, 1), away from every branch point used below
THETAS = [0.05 + i * (math.pi - 0.1) / 40 for i in range(41)]


def _ref_value_and_slope(f, cos: float) -> tuple[float, float]:
    """f(cos) and df/dcos by autograd through an acos-based float64 reference."""
    c = torch.tensor(cos, dtype=torch.float64, requires_grad=True)
    out = f(c)
    (slope,) = torch.autograd.grad(out, c)
    return float(out.detach()), float(slope)


def _check_against(margin: Margin, ref, labels: Tensor | None = None) -> None:
    cos = torch.tensor([math.cos(t) for t in THETAS], dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(len(THETAS), dtype=torch.int64) if labels is None else labels
    out = margin(cos, labels)
    (slopes,) = torch.autograd.grad(out.sum(), cos)
    for i, t in enumerate(THETAS):
        value, slope = _ref_value_and_slope(lambda c, i=i: ref(c, i), math.cos(t))
        assert float(out[i].detach()) == pytest.approx(value, rel=1e-12, abs=1e-12), t
        assert float(slopes[i]) == pytest.approx(slope, rel=1e-9, abs=1e-9), t


def ref_arc(c: Tensor, m: float, fallback: bool = True) -> Tensor:
    theta = torch.acos(c)
    if fallback and float(theta.detach()) > math.pi - m:
        return c - m * math.sin(m)
    return torch.cos(theta + m)


def ref_psi(c: Tensor, m: int) -> Tensor:
    theta = torch.acos(c)
    k = min(math.floor(float(theta.detach()) * m / math.pi), m - 1)
    return (-1) ** k * torch.cos(m * theta) - 2 * k


def test_no_margin_and_cos_margin() -> None:
    _check_against(NoMargin(), lambda c, i: c)
    _check_against(CosMargin(0.35), lambda c, i: c - 0.35)


@pytest.mark.parametrize("m", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("fallback", [True, False])
def test_arc_margin(m: float, fallback: bool) -> None:
    _check_against(ArcMargin(m, fallback), lambda c, i: ref_arc(c, m, fallback))


def test_arc_margin_fallback_keeps_the_target_decreasing() -> None:
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    labels = torch.zeros_like(theta, dtype=torch.int64)
    with_fallback = ArcMargin(0.5)(torch.cos(theta), labels)
    without = ArcMargin(0.5, fallback=False)(torch.cos(theta), labels)
    assert bool((with_fallback[1:] <= with_fallback[:-1]).all())
    assert bool((without[1:] > without[:-1]).any())  # cos(θ + m) turns back up past π − m
    # the fallback never rewards: the target is always below the plain cosine
    assert bool((with_fallback <= torch.cos(theta) + 1e-15).all())


def test_dynamic_arc_margin_per_class() -> None:
    counts = torch.tensor([1, 4, 9, 100])
    margin = DynamicArcMargin.from_counts(counts, a=0.5, b=0.05, lam=0.25)
    expected = [0.5 * n**-0.25 + 0.05 for n in (1, 4, 9, 100)]
    assert margin.margins.tolist() == pytest.approx(expected, rel=1e-14)
    labels = torch.tensor([i % 4 for i in range(len(THETAS))])
    _check_against(margin, lambda c, i: ref_arc(c, expected[i % 4]), labels)


@pytest.mark.parametrize(("m1", "m2", "m3"), [(1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (2.0, 0.2, 0.1)])
def test_combined_margin(m1: float, m2: float, m3: float) -> None:
    def ref(c: Tensor, i: int) -> Tensor:
        if m1 == 1.0:
            return ref_arc(c, m2) - m3
        phi = m1 * torch.acos(c) + m2
        k = math.floor(float(phi.detach()) / math.pi)
        return (-1) ** k * torch.cos(phi) - 2 * k - m3

    _check_against(CombinedMargin(m1, m2, m3), ref)


def test_combined_margin_reproduces_arcface_cosface_and_sphereface_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    cos = torch.rand(1000, generator=gen) * 2 - 1
    cos = torch.cat([cos, torch.tensor([-1.0, 1.0, 0.0, -0.8775825618903728])])
    labels = torch.zeros_like(cos, dtype=torch.int64)
    assert torch.equal(CombinedMargin(1, 0.5, 0)(cos, labels), ArcMargin(0.5)(cos, labels))
    assert torch.equal(CombinedMargin(1, 0, 0.35)(cos, labels), CosMargin(0.35)(cos, labels))
    sphere = MultiplicativeAngularMargin(4, base=0.0, lambda_min=0.0)
    c64 = cos.double().clamp(-1 + 1e-9, 1 - 1e-9)
    torch.testing.assert_close(
        CombinedMargin(4, 0, 0)(c64, labels), sphere(c64, labels), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_multiplicative_margin_psi(m: int) -> None:
    margin = MultiplicativeAngularMargin(m, base=0.0, lambda_min=0.0)  # λ = 0: plain ψ
    _check_against(margin, lambda c, i: ref_psi(c, m))
    theta = torch.linspace(0.0, math.pi, 4001, dtype=torch.float64)
    psi = margin.psi(torch.cos(theta))
    assert bool((psi[1:] <= psi[:-1] + 1e-12).all())  # monotone, continuous at kπ/m
    assert float((psi[1:] - psi[:-1]).abs().max()) < 1e-2
    assert float(psi[0]) == pytest.approx(1.0)
    assert float(psi[-1]) == pytest.approx(1.0 - 2.0 * m)


def test_multiplicative_margin_annealing_schedule() -> None:
    margin = MultiplicativeAngularMargin(4, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
    cos = torch.tensor([0.3, -0.2], dtype=torch.float64)
    labels = torch.zeros(2, dtype=torch.int64)
    for it in range(200):
        lam = max(5.0, 1000.0 * (1 + 0.12 * it) ** -1.0)
        assert margin.current_lambda() == pytest.approx(lam, rel=1e-12)
        expected = (lam * cos + torch.stack([ref_psi(c, 4) for c in cos])) / (1 + lam)
        torch.testing.assert_close(margin(cos, labels), expected, rtol=1e-12, atol=1e-12)
    assert int(margin.iteration) == 200
    margin.eval()
    margin(cos, labels)
    assert int(margin.iteration) == 200  # evaluation does not count
    assert margin.current_lambda() == pytest.approx(1000.0 / (1 + 0.12 * 200))
    margin.iteration.fill_(10**6)
    assert margin.current_lambda() == 5.0  # the floor


def test_multiplicative_margin_annealing_limits() -> None:
    cos = torch.linspace(-0.99, 0.99, 50, dtype=torch.float64)
    labels = torch.zeros_like(cos, dtype=torch.int64)
    start = MultiplicativeAngularMargin(4, base=1e12, lambda_min=0.0).eval()
    torch.testing.assert_close(start(cos, labels), cos, rtol=0, atol=1e-10)  # λ → ∞: no margin
    end = MultiplicativeAngularMargin(4, base=1.0, gamma=1e9, power=1.0, lambda_min=0.0)
    end.iteration.fill_(10**6)
    psi = torch.stack([ref_psi(c, 4) for c in cos])
    torch.testing.assert_close(end(cos, labels), psi, rtol=0, atol=1e-12)  # λ → 0: pure ψ


ALL_MARGINS = [
    NoMargin(),
    CosMargin(0.35),
    ArcMargin(0.5),
    ArcMargin(0.5, fallback=False),
    DynamicArcMargin(torch.tensor([0.3, 0.6])),
    CombinedMargin(1.0, 0.3, 0.2),
    CombinedMargin(1.35, 0.25, 0.1),
    MultiplicativeAngularMargin(4),
]


@pytest.mark.parametrize("margin", ALL_MARGINS, ids=lambda m: repr(m))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_theta_zero_and_pi(margin: Margin, dtype: torch.dtype) -> None:
    eps = torch.finfo(dtype).eps
    cos = torch.tensor([1.0, -1.0, 1.0 - eps, -1.0 + eps, 1.0 + 1e-3, -1.0 - 1e-3], dtype=dtype)
    cos.requires_grad_()
    out = margin(cos, torch.tensor([0, 1, 0, 1, 0, 1]))
    out.sum().backward()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(cos.grad).all())
    assert float(out[0].detach()) <= 1.0 + 1e-6


@pytest.mark.parametrize("margin", ALL_MARGINS, ids=lambda m: repr(m))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(margin: Margin, dtype: torch.dtype) -> None:
    cos64 = torch.tensor([0.999, 0.5, 0.0, -0.5, -0.999], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0])
    low = cos64.to(dtype).requires_grad_()
    was_training = margin.training
    margin.eval()  # keep the annealed margin's λ fixed between the two calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = margin(low, labels)
    out.sum().backward()
    expected = margin(low.detach().float(), labels)  # same as float32 input, no autocast
    margin.train(was_training)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(low.grad.float()).all())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_invalid_margins_raise() -> None:
    with pytest.raises(ValueError):
        CosMargin(-0.1)
    with pytest.raises(ValueError):
        ArcMargin(-0.1)
    with pytest.raises(ValueError):
        ArcMargin(4.0)
    with pytest.raises(ValueError):
        CombinedMargin(0.0, 0.1, 0.1)
    with pytest.raises(ValueError):
        MultiplicativeAngularMargin(2.5)
    with pytest.raises(ValueError):
        MultiplicativeAngularMargin(0)
    with pytest.raises(ValueError):
        DynamicArcMargin(torch.tensor([[0.1, 0.2]]))
    with pytest.raises(ValueError):
        DynamicArcMargin(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError):
        DynamicArcMargin.from_counts(torch.tensor([0, 3]), a=0.5, b=0.05, lam=0.25)
    margin = DynamicArcMargin(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="labels"):
        margin(torch.tensor([0.5, 0.5]), torch.tensor([0, 2]))
