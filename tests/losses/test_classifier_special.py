"""Special cases that tie the classifier losses together, and pytorch-metric-learning as an
oracle where its conventions match ours (its ``W`` is ``(D, C)``, ArcFace's margin is in
degrees, its reduction is the mean over the batch)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml
from test_classifier_reference import ref_lsoftmax, ref_normalized, ref_psi
from torch import Tensor, nn

from facemetric.losses.classifier import (
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    DynamicMarginArcFaceLoss,
    LargeMarginSoftmaxLoss,
    NormFaceLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)

C, D, B = 9, 6, 12


def _inputs(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=gen)
    return x, labels


def _run(loss: nn.Module, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """loss value, d/dx, d/dweight."""
    xx = x.clone().requires_grad_()
    loss.zero_grad()
    value = loss(xx, labels)
    value.backward()
    return value.detach(), xx.grad, loss.weight.grad.clone()


def _same_weight(*losses: nn.Module) -> None:
    for other in losses[1:]:
        with torch.no_grad():
            other.weight.copy_(losses[0].weight)


def _assert_same(a: tuple[Tensor, ...], b: tuple[Tensor, ...], exact: bool = False) -> None:
    for u, v in zip(a, b, strict=True):
        if exact:
            assert torch.equal(u, v)
        else:
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


def test_arcface_with_zero_margin_is_normface() -> None:
    x, labels = _inputs()
    arc, norm = ArcFaceLoss(C, D, scale=10.0, margin=0.0).double(), NormFaceLoss(C, D, 10.0)
    norm.double()
    _same_weight(arc, norm)
    _assert_same(_run(arc, x, labels), _run(norm, x, labels), exact=True)


@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_combined_margin_reproduces_arcface(margin: float) -> None:
    x, labels = _inputs(1)
    x[0] = -x[0]  # make sure some target falls into the fallback region too
    comb = CombinedMarginLoss(C, D, 30.0, 1.0, margin, 0.0).double()
    arc = ArcFaceLoss(C, D, scale=30.0, margin=margin).double()
    _same_weight(comb, arc)
    with torch.no_grad():
        arc.weight[labels[0]] = x[0].neg()  # θ = π for sample 0
        comb.weight[labels[0]] = x[0].neg()
    _assert_same(_run(comb, x, labels), _run(arc, x, labels), exact=True)


def test_combined_margin_reproduces_cosface() -> None:
    x, labels = _inputs(2)
    comb = CombinedMarginLoss(C, D, 30.0, 1.0, 0.0, 0.35).double()
    cos = CosFaceLoss(C, D, scale=30.0, margin=0.35).double()
    _same_weight(comb, cos)
    _assert_same(_run(comb, x, labels), _run(cos, x, labels), exact=True)


def test_combined_margin_sphereface_style_matches_its_formula() -> None:
    # (m1, 0, 0) with integer m1 is SphereFace's ψ (without the λ annealing, fixed scale)
    x, labels = _inputs(3)
    comb = CombinedMarginLoss(C, D, 4.0, 3.0, 0.0, 0.0).double()
    xr = x.clone().requires_grad_()
    wr = comb.weight.detach().clone().requires_grad_()
    expected = ref_normalized(xr, wr, labels.tolist(), lambda c, b: ref_psi(c, 3), lambda b: 4.0)
    expected.backward()
    got = _run(comb, x, labels)
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], xr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got[2], wr.grad, rtol=1e-8, atol=1e-10)


def test_subcenter_with_one_subcenter_is_arcface() -> None:
    x, labels = _inputs(4)
    sub = SubCenterArcFaceLoss(C, D, k=1, scale=20.0, margin=0.4).double()
    arc = ArcFaceLoss(C, D, scale=20.0, margin=0.4).double()
    _same_weight(sub, arc)
    _assert_same(_run(sub, x, labels), _run(arc, x, labels), exact=True)


def test_subcenter_weight_layout_is_class_major() -> None:
    # a sample next to sub-centre 2 of class 1: the rows of class c are c·k … c·k + k − 1,
    # the class cosine is the max over them, and only the winning row gets a gradient
    k = 3
    sub = SubCenterArcFaceLoss(C, D, k=k, scale=20.0, margin=0.4).double()
    gen = torch.Generator().manual_seed(3)
    x = sub.weight.detach()[1 * k + 2] + 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
    x = x.unsqueeze(0)
    labels = torch.tensor([1])
    value, _, grad_w = _run(sub, x, labels)
    cosines = torch.nn.functional.cosine_similarity(x, sub.weight.detach())
    assert int(cosines.argmax()) == 1 * k + 2
    pooled = cosines.view(C, k).amax(1)
    ref_logits = 20.0 * pooled
    ref_logits[1] = 20.0 * math.cos(math.acos(float(pooled[1])) + 0.4)
    assert float(value) == pytest.approx(float(-torch.log_softmax(ref_logits, 0)[1]), rel=1e-10)
    winners = cosines.view(C, k).argmax(1)
    for c in range(C):
        for j in range(k):
            row = grad_w[c * k + j]
            assert bool(row.abs().sum() > 0) == (j == int(winners[c])), (c, j)


def test_dynamic_margin_with_zero_slope_is_arcface() -> None:
    x, labels = _inputs(5)
    counts = torch.arange(1, C + 1) * 7
    dyn = DynamicMarginArcFaceLoss(C, D, counts, a=0.0, b=0.45, lam=0.3, scale=20.0).double()
    arc = ArcFaceLoss(C, D, scale=20.0, margin=0.45).double()
    _same_weight(dyn, arc)
    _assert_same(_run(dyn, x, labels), _run(arc, x, labels), exact=True)


def test_lsoftmax_with_m1_is_softmax_without_bias() -> None:
    x, labels = _inputs(6)
    lsm = LargeMarginSoftmaxLoss(C, D, m=1).double()
    soft = SoftmaxLoss(C, D).double()
    _same_weight(lsm, soft)
    soft.bias.requires_grad_(False)  # zero and frozen: no bias
    _assert_same(_run(lsm, x, labels), _run(soft, x, labels))


def test_lsoftmax_defaults_are_the_l_softmax_schedule_not_sphereface() -> None:
    # L-Softmax's authors' models: m = 4, λ = 1000·(1 + 2.5e-5·it)^(−35), no floor
    lsm = LargeMarginSoftmaxLoss(C, D).double()
    mg = lsm.margin
    assert (mg.m, mg.base, mg.gamma, mg.power, mg.lambda_min) == (4, 1000.0, 2.5e-5, 35.0, 0.0)
    assert mg.current_lambda() == 1000.0
    x, labels = _inputs(8)
    lsm.train()
    for _ in range(3):  # training-mode forwards advance the schedule, one step each
        lsm(x, labels)
    # 1000·(1 + ε)^(−35), ε = 7.5e-5, by the binomial series to 3rd order (error ~1e-12)
    eps = 7.5e-5
    series = 1 - 35 * eps + 630 * eps**2 - 7770 * eps**3
    assert mg.current_lambda() == pytest.approx(1000 * series, rel=1e-10)
    mg.iteration.fill_(4000)  # 1.1^35 = 28.1024368
    assert mg.current_lambda() == pytest.approx(1000 / 28.1024368, rel=1e-8)
    mg.iteration.fill_(40_000)  # 2^(−35)·1000 = 2.91e−8: the full margin, nothing left
    assert mg.current_lambda() == pytest.approx(1000 * 2.0**-35, rel=1e-12)
    lsm.eval()  # evaluation mode neither counts nor changes λ
    w = lsm.weight.detach().clone()
    pure = ref_lsoftmax(x, w, labels.tolist(), 4, 0.0)
    torch.testing.assert_close(lsm(x, labels), pure, rtol=1e-6, atol=0)
    # SphereFace keeps its own schedule, which stops at λ = 5
    sphere = SphereFaceLoss(C, D).margin
    assert (sphere.base, sphere.gamma, sphere.power, sphere.lambda_min) == (1000.0, 0.12, 1.0, 5.0)
    sphere.iteration.fill_(40_000)
    assert sphere.current_lambda() == 5.0


def test_sphereface_annealing_limits() -> None:
    x, labels = _inputs(7)
    # λ → ∞ at the start: the target is ‖x‖·cos θ, i.e. no margin (m=1 is exactly that)
    start = SphereFaceLoss(C, D, m=4, base=1e12, lambda_min=0.0).double()
    plain = SphereFaceLoss(C, D, m=1).double()
    _same_weight(start, plain)
    a, b = _run(start, x, labels), _run(plain, x, labels)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    # λ → 0 late in training: the pure ψ of A-Softmax (checked against pml below too)
    late = SphereFaceLoss(C, D, m=4, base=1.0, gamma=1.0, power=1.0, lambda_min=0.0).double()
    late.margin.iteration.fill_(10**15)
    assert late.margin.current_lambda() < 1e-14
    xr = x.clone().requires_grad_()
    wr = late.weight.detach().clone().requires_grad_()
    expected = ref_normalized(
        xr, wr, labels.tolist(), lambda c, b: ref_psi(c, 4), lambda b: torch.linalg.norm(xr[b])
    )
    torch.testing.assert_close(_run(late, x, labels)[0], expected.detach(), rtol=1e-9, atol=0)


# ------------------------------------------------------------ pytorch-metric-learning oracle


def _near_centres(weight: Tensor, labels: Tensor, seed: int) -> Tensor:
    """Embeddings close to their class centres: every target angle well below π − m."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(weight[labels], dim=1)
    return 3.0 * (centres + 0.5 * torch.randn(centres.shape, generator=gen, dtype=weight.dtype))


pml_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside pml


def _compare_with_pml(ours: nn.Module, theirs: nn.Module, x: Tensor, labels: Tensor) -> None:
    with torch.no_grad():
        theirs.W.copy_(ours.weight.t())
    got = _run(ours, x, labels)
    xx = x.clone().requires_grad_()
    expected = theirs(xx, labels)
    expected.backward()
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], xx.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got[2], theirs.W.grad.t(), rtol=1e-7, atol=1e-10)


@pml_warnings
def test_arcface_matches_pml() -> None:
    ours = ArcFaceLoss(C, D, scale=16.0, margin=0.5).double()
    theirs = pml.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=16.0).double()
    _, labels = _inputs(8)
    x = _near_centres(ours.weight.detach(), labels, 8)
    cos = torch.nn.functional.cosine_similarity(x, ours.weight.detach()[labels])
    assert float(torch.acos(cos).max()) < math.pi - 0.5 - 0.1  # no fallback involved
    _compare_with_pml(ours, theirs, x, labels)


@pml_warnings
def test_cosface_matches_pml() -> None:
    ours = CosFaceLoss(C, D, scale=16.0, margin=0.35).double()
    theirs = pml.CosFaceLoss(C, D, margin=0.35, scale=16.0).double()
    x, labels = _inputs(9)
    _compare_with_pml(ours, theirs, x, labels)


@pml_warnings
def test_normface_matches_pml_normalized_softmax() -> None:
    ours = NormFaceLoss(C, D, scale=12.5).double()
    theirs = pml.NormalizedSoftmaxLoss(C, D, temperature=1 / 12.5).double()
    x, labels = _inputs(10)
    _compare_with_pml(ours, theirs, x, labels)


@pml_warnings
def test_subcenter_arcface_matches_pml() -> None:
    ours = SubCenterArcFaceLoss(C, D, k=3, scale=16.0, margin=0.3).double()
    theirs = pml.SubCenterArcFaceLoss(
        num_classes=C, embedding_size=D, margin=math.degrees(0.3), scale=16.0, sub_centers=3
    ).double()
    _, labels = _inputs(11)
    x = _near_centres(ours.weight.detach().view(C, 3, D)[:, 0], labels, 11)
    _compare_with_pml(ours, theirs, x, labels)


@pml_warnings
def test_sphereface_without_annealing_matches_pml() -> None:
    ours = SphereFaceLoss(C, D, m=4, base=0.0, lambda_min=0.0).double()
    theirs = pml.SphereFaceLoss(C, D, margin=4, scale=1).double()
    x, labels = _inputs(12)
    _compare_with_pml(ours, theirs, x, labels)


@pml_warnings
def test_lsoftmax_without_annealing_matches_pml() -> None:
    ours = LargeMarginSoftmaxLoss(C, D, m=3, base=0.0, lambda_min=0.0).double()
    theirs = pml.LargeMarginSoftmaxLoss(C, D, margin=3, scale=1).double()
    x, labels = _inputs(13)
    _compare_with_pml(ours, theirs, x, labels)
