"""Classifier losses at the edges: θ = 0 and π, autocast, extreme logits, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from test_classifier_reference import CASES, build
from torch import Tensor, nn

from facemetric.losses.classifier import ArcFaceLoss, NormFaceLoss, margin_cross_entropy
from facemetric.losses.margins import ArcMargin, CosMargin

C, D = 7, 5  # as in CASES
NAMES = sorted(CASES)


def _rows_of_class(loss: nn.Module, labels: Tensor) -> Tensor:
    k = loss.weight.shape[0] // C
    return loss.weight.detach()[labels * k]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["theta0", "thetapi"])
def test_finite_at_theta_zero_and_pi(name: str, dtype: torch.dtype, sign: float) -> None:
    loss = build(name).to(dtype)
    labels = torch.tensor([0, 3, 3, 6, 1])
    x = (sign * 2.0 * _rows_of_class(loss, labels)).requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value)
    assert bool(torch.isfinite(x.grad).all())
    for p in loss.parameters():
        assert bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32(name: str, dtype: torch.dtype) -> None:
    loss = build(name).float()
    loss.eval()  # same λ / scale / centres in both calls
    torch.manual_seed(0)
    backbone = nn.Linear(8, D)
    inputs = torch.randn(10, 8)
    labels = torch.randint(0, C, (10,))
    with torch.autocast("cpu", dtype=dtype):
        features = backbone(inputs)
        value = loss(features, labels)
    assert features.dtype == dtype
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value)
    assert bool(torch.isfinite(backbone.weight.grad).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in loss.parameters())
    expected = loss(features.detach().float(), labels)  # the same numbers, no autocast
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-6, atol=1e-6)


def test_float32_matches_float64_at_large_scale_and_extreme_cosines() -> None:
    torch.manual_seed(0)
    loss64 = ArcFaceLoss(300, 16, scale=64.0, margin=0.5).double()
    labels = torch.randint(0, 300, (40,))
    x = torch.randn(40, 16, dtype=torch.float64)
    w = loss64.weight.detach()
    x[:10] = w[labels[:10]] * 3  # θ = 0
    x[10:20] = -w[labels[10:20]] * 3  # θ = π: fallback, huge loss
    loss32 = ArcFaceLoss(300, 16, scale=64.0, margin=0.5, chunk_size=64)
    with torch.no_grad():
        loss32.weight.copy_(w)
    per64 = margin_cross_entropy(x, w, labels, ArcMargin(0.5), 64.0, reduction="none")
    per32 = margin_cross_entropy(
        x.float(), w.float(), labels, ArcMargin(0.5), 64.0, reduction="none", chunk_size=64
    )
    # float32 cannot resolve θ below ~√eps ≈ 3e-4 rad: at θ = 0 the target logit is only
    # known to ~s·sin(m)·3e-4 ≈ 1e-2; everywhere else float32 tracks float64 closely
    torch.testing.assert_close(per32[:10].double(), per64[:10], rtol=0, atol=1e-2)
    torch.testing.assert_close(per32[10:].double(), per64[10:], rtol=2e-5, atol=2e-5)
    x32 = x.float().requires_grad_()
    x64 = x.clone().requires_grad_()
    loss32(x32[10:], labels[10:]).backward()
    loss64(x64[10:], labels[10:]).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    grad32, grad64 = loss32.weight.grad.double(), loss64.weight.grad
    torch.testing.assert_close(grad32, grad64, rtol=1e-4, atol=1e-5)


def test_log_sum_exp_survives_underflowing_chunks() -> None:
    # s = 300: a shift of s − 60 underflows every non-target term at cos ≈ −0.3; the chunk
    # must be redone with its own max, or the loss of a misclassified sample comes out 0
    gen = torch.Generator().manual_seed(1)
    num_classes, dim = 40, 8
    target_dir = torch.randn(dim, generator=gen, dtype=torch.float64)
    target_dir /= target_dir.norm()
    others = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    others -= (others @ target_dir).unsqueeze(1) * target_dir  # ⟂ target_dir
    others = torch.nn.functional.normalize(others, dim=1)
    w = math.sqrt(1 - 0.09) * others - 0.3 * target_dir  # cos(x, w_c) = −0.3 for x = dir
    w[0] = -0.9 * target_dir + math.sqrt(1 - 0.81) * others[0]  # the target: cos −0.9
    x = target_dir.unsqueeze(0).repeat(3, 1)
    labels = torch.zeros(3, dtype=torch.int64)
    # ≈ logsumexp of the non-targets minus the target logit: 300·(−0.3) + ln 39 + 300·1.1
    expected = 300 * (-0.3) + math.log(num_classes - 1) - 300 * (-0.9 - 0.2)
    for dtype in (torch.float32, torch.float64):
        got = margin_cross_entropy(
            x.to(dtype), w.to(dtype), labels, CosMargin(0.2), 300.0, chunk_size=8
        )
        assert float(got) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_chunk_size_does_not_change_the_result(name: str) -> None:
    results = []
    for chunk in (1, 2, 5, 4096):
        loss = build(name).float()
        loss.chunk_size = chunk
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(9, D, generator=gen).requires_grad_()
        labels = torch.randint(0, C, (9,), generator=gen)
        value = loss(x, labels)
        value.backward()
        results.append((value.detach(), x.grad, loss.weight.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backward_twice_with_retain_graph_and_forward_without_grad() -> None:
    torch.manual_seed(0)
    loss = ArcFaceLoss(C, D, scale=8.0)
    x = torch.randn(6, D, requires_grad=True)
    labels = torch.randint(0, C, (6,))
    value = loss(x, labels)
    value.backward(retain_graph=True)
    once = (x.grad.clone(), loss.weight.grad.clone())
    value.backward()
    torch.testing.assert_close(x.grad, 2 * once[0])
    torch.testing.assert_close(loss.weight.grad, 2 * once[1])
    with torch.no_grad():
        again = loss(x, labels)
    assert not again.requires_grad
    torch.testing.assert_close(again, value.detach())
    # gradient to the centres only (frozen backbone)
    loss.zero_grad()
    loss(x.detach(), labels).backward()
    torch.testing.assert_close(loss.weight.grad, once[1])


@pytest.mark.parametrize("name", NAMES)
def test_small_integer_label_dtypes_give_the_same_loss(name: str) -> None:
    # uint8 must not be taken for a boolean mask anywhere (indexing, per-class margins)
    loss = build(name).eval()
    x = torch.randn(6, D, dtype=torch.float64)
    labels = torch.tensor([0, 6, 2, 2, 5, 1])
    expected = loss(x, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(loss(x, labels.to(dtype)), expected, rtol=0, atol=0)


def test_every_loss_owns_weight_in_linear_layout() -> None:
    for name in NAMES:
        loss = build(name)
        rows = 3 * C if name == "subcenter" else C
        assert loss.weight.shape == (rows, D), name
        assert isinstance(loss.weight, nn.Parameter)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs() -> dict[str, tuple[Tensor, Tensor]]:
    x = torch.randn(4, D)
    y = torch.tensor([0, 1, 2, 3])
    nan = x.clone()
    nan[2, 1] = float("nan")
    inf = x.clone()
    inf[0, 0] = float("inf")
    return {
        "length": (x, y[:3]),
        "label_high": (x, torch.tensor([0, 1, 2, C])),
        "label_negative": (x, torch.tensor([0, -1, 2, 3])),
        "nan": (nan, y),
        "inf": (inf, y),
        "embedding_size": (torch.randn(4, D + 1), y),
        "float_labels": (x, y.float()),
        "rank": (x[0], y[:1]),
        "empty": (torch.randn(0, D), y[:0]),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(_bad_inputs()))
def test_bad_input_raises_value_error(name: str, case: str) -> None:
    loss = build(name).float()
    x, y = _bad_inputs()[case]
    with pytest.raises(ValueError):
        loss(x, y)


def test_margin_cross_entropy_checks_its_arguments() -> None:
    x = torch.randn(4, D)
    y = torch.tensor([0, 1, 2, 3])
    w = torch.randn(C, D)
    m = ArcMargin(0.5)
    with pytest.raises(ValueError, match="size"):
        margin_cross_entropy(x, torch.randn(C, D + 1), y, m, 10.0)
    with pytest.raises(ValueError, match="subcenters"):
        margin_cross_entropy(x, w, y, m, 10.0, subcenters=2)
    with pytest.raises(ValueError):
        margin_cross_entropy(x, w, torch.tensor([0, 1, 2, C]), m, 10.0)
    with pytest.raises(ValueError):
        margin_cross_entropy(x, w, y, m, float("nan"))
    with pytest.raises(ValueError):
        margin_cross_entropy(x, w, y, m, -1.0)
    with pytest.raises(ValueError):
        margin_cross_entropy(x, w, y, m, torch.ones(3))
    with pytest.raises(ValueError):
        margin_cross_entropy(x, w, y, m, 10.0, reduction="max")
    with pytest.raises(ValueError):
        margin_cross_entropy(x, w, y, m, 10.0, margin_labels=torch.tensor([0, 1]))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError):
        ArcFaceLoss(1, D)
    with pytest.raises(ValueError):
        NormFaceLoss(C, 0)
    with pytest.raises(ValueError):
        NormFaceLoss(C, D, scale=0.0)
    with pytest.raises(ValueError):
        ArcFaceLoss(C, D, margin=-0.1)
