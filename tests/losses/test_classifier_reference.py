"""Every classifier loss against a float64 reference written as loops, plus gradcheck.

The references below loop over samples and classes and take each formula from its paper
(angles through ``acos``, ``cos(mθ)`` directly, no Chebyshev, no shared code with the
package); autograd through them gives the reference gradients. Other test files of the
classifier losses import these helpers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

from facemetric.losses.center import CenterLoss
from facemetric.losses.classifier import (
    AdaCosLoss,
    ArcFaceLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    DynamicMarginArcFaceLoss,
    L2SoftmaxLoss,
    LargeMarginSoftmaxLoss,
    NormFaceLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    margin_cross_entropy,
)
from facemetric.losses.margins import ArcMargin, CosMargin, DynamicArcMargin, NoMargin

# ---------------------------------------------------------------- references (loops, float64)


def ref_cross_entropy(rows: list[list[Tensor]], labels: list[int]) -> Tensor:
    """``mean_b [log Σ_c exp(z_bc) − z_{b,y_b}]`` from per-entry 0-d tensors."""
    total = torch.zeros((), dtype=torch.float64)
    for row, y in zip(rows, labels, strict=True):
        top = max(float(v.detach()) for v in row)
        lse = top + torch.log(sum(torch.exp(v - top) for v in row))
        total = total + (lse - row[y])
    return total / len(rows)


def ref_cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a, b) / (torch.linalg.norm(a) * torch.linalg.norm(b))


def ref_arc(cos: Tensor, m: float, fallback: bool = True) -> Tensor:
    theta = torch.acos(cos)
    if fallback and float(theta.detach()) > math.pi - m:
        return cos - m * math.sin(m)
    return torch.cos(theta + m)


def ref_psi(cos: Tensor, m: int) -> Tensor:
    """``(−1)^k cos(mθ) − 2k`` for ``θ ∈ [kπ/m, (k+1)π/m]``."""
    theta = torch.acos(cos)
    k = min(math.floor(float(theta.detach()) * m / math.pi), m - 1)
    return (-1) ** k * torch.cos(m * theta) - 2 * k


def ref_combined(cos: Tensor, m1: float, m2: float, m3: float) -> Tensor:
    theta = torch.acos(cos)
    if m1 == 1.0:
        return ref_arc(cos, m2) - m3
    phi = m1 * theta + m2
    k = math.floor(float(phi.detach()) / math.pi)
    return (-1) ** k * torch.cos(phi) - 2 * k - m3


def ref_normalized(
    x: Tensor,
    w: Tensor,
    labels: list[int],
    target: Callable[[Tensor, int], Tensor],
    scale: Callable[[int], Tensor | float],
    subcenters: int = 1,
) -> Tensor:
    """Normalised-centre softmax; ``target(cos, b)`` rewrites the target cosine."""
    rows = []
    num_classes = w.shape[0] // subcenters
    for b in range(x.shape[0]):
        s = scale(b)
        row = []
        for c in range(num_classes):
            cos = max(
                (ref_cos(x[b], w[c * subcenters + j]) for j in range(subcenters)),
                key=lambda v: float(v.detach()),
            )
            row.append(s * (target(cos, b) if c == labels[b] else cos))
        rows.append(row)
    return ref_cross_entropy(rows, labels)


def ref_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, labels: list[int], alpha: float | None = None
) -> Tensor:
    """``x·w_c + β_c``; with ``alpha``, ``x`` is replaced by ``alpha·x/‖x‖``."""
    rows = []
    for b in range(x.shape[0]):
        feat = x[b] if alpha is None else alpha * x[b] / torch.linalg.norm(x[b])
        row = []
        for c in range(w.shape[0]):
            z = torch.dot(feat, w[c])
            row.append(z if bias is None else z + bias[c])
        rows.append(row)
    return ref_cross_entropy(rows, labels)


def ref_lsoftmax(x: Tensor, w: Tensor, labels: list[int], m: int, lam: float) -> Tensor:
    rows = []
    for b in range(x.shape[0]):
        row = []
        for c in range(w.shape[0]):
            if c == labels[b]:
                cos = ref_cos(x[b], w[c])
                mag = torch.linalg.norm(x[b]) * torch.linalg.norm(w[c])
                row.append(mag * (lam * cos + ref_psi(cos, m)) / (1 + lam))
            else:
                row.append(torch.dot(x[b], w[c]))
        rows.append(row)
    return ref_cross_entropy(rows, labels)


def ref_adacos_scale(x: Tensor, w: Tensor, labels: list[int], old: float) -> float:
    """The dynamic AdaCos update from one batch, in plain floats."""
    sums, angles = [], []
    for b in range(x.shape[0]):
        total = 0.0
        for c in range(w.shape[0]):
            cos = float(ref_cos(x[b], w[c]))
            if c == labels[b]:
                angles.append(math.acos(cos))
            else:
                total += math.exp(old * cos)
        sums.append(total)
    b_avg = sum(sums) / len(sums)
    return math.log(b_avg) / math.cos(min(math.pi / 4, statistics.median(angles)))


def batch(
    b: int = 6, d: int = 5, c: int = 7, seed: int = 0, rows_per_class: int = 1
) -> tuple[Tensor, Tensor]:
    """Random float64 embeddings and labels (with repeats)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (b,), generator=gen)
    return x, labels


# ----------------------------------------------------------------------------- the cases

C, D = 7, 5
COUNTS = torch.tensor([1, 3, 10, 2, 50, 7, 4])


def _dyn_margins() -> list[float]:
    return [0.4 * float(n) ** -0.25 + 0.1 for n in COUNTS]


# name -> (factory, reference(module, x, w, bias, labels) -> loss)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[..., Tensor]]] = {
    "softmax": (
        lambda: SoftmaxLoss(C, D),
        lambda mod, x, w, bias, y: ref_linear(x, w, bias, y),
    ),
    "l2softmax": (
        lambda: L2SoftmaxLoss(C, D, alpha=6.0),
        lambda mod, x, w, bias, y: ref_linear(x, w, bias, y, alpha=6.0),
    ),
    "normface": (
        lambda: NormFaceLoss(C, D, scale=5.0),
        lambda mod, x, w, bias, y: ref_normalized(x, w, y, lambda c, b: c, lambda b: 5.0),
    ),
    "lsoftmax": (
        lambda: LargeMarginSoftmaxLoss(C, D, m=3, base=2.0, gamma=1.0, lambda_min=0.5),
        lambda mod, x, w, bias, y: ref_lsoftmax(x, w, y, 3, 2.0),
    ),
    "sphereface": (
        lambda: SphereFaceLoss(C, D, m=4, base=2.0, gamma=1.0, lambda_min=0.5),
        lambda mod, x, w, bias, y: ref_normalized(
            x,
            w,
            y,
            lambda c, b: (2.0 * c + ref_psi(c, 4)) / 3.0,
            lambda b: torch.linalg.norm(x[b]),
        ),
    ),
    "cosface": (
        lambda: CosFaceLoss(C, D, scale=6.0, margin=0.35),
        lambda mod, x, w, bias, y: ref_normalized(x, w, y, lambda c, b: c - 0.35, lambda b: 6.0),
    ),
    "arcface": (
        lambda: ArcFaceLoss(C, D, scale=6.0, margin=0.5),
        lambda mod, x, w, bias, y: ref_normalized(
            x, w, y, lambda c, b: ref_arc(c, 0.5), lambda b: 6.0
        ),
    ),
    "combined": (
        lambda: CombinedMarginLoss(C, D, scale=6.0, m1=1.0, m2=0.3, m3=0.2),
        lambda mod, x, w, bias, y: ref_combined_case(x, w, y, 1.0, 0.3, 0.2),
    ),
    "combined_sphere": (
        lambda: CombinedMarginLoss(C, D, scale=6.0, m1=1.5, m2=0.2, m3=0.1),
        lambda mod, x, w, bias, y: ref_combined_case(x, w, y, 1.5, 0.2, 0.1),
    ),
    "adacos_fixed": (
        lambda: AdaCosLoss(C, D, dynamic=False),
        lambda mod, x, w, bias, y: ref_normalized(
            x, w, y, lambda c, b: c, lambda b: math.sqrt(2) * math.log(C - 1)
        ),
    ),
    "subcenter": (
        lambda: SubCenterArcFaceLoss(C, D, k=3, scale=6.0, margin=0.5),
        lambda mod, x, w, bias, y: ref_normalized(
            x, w, y, lambda c, b: ref_arc(c, 0.5), lambda b: 6.0, subcenters=3
        ),
    ),
    "dynamic_margin": (
        lambda: DynamicMarginArcFaceLoss(C, D, COUNTS, a=0.4, b=0.1, lam=0.25, scale=6.0),
        lambda mod, x, w, bias, y: ref_normalized(
            x, w, y, lambda c, b: ref_arc(c, _dyn_margins()[y[b]]), lambda b: 6.0
        ),
    ),
    "center": (
        lambda: _center_with_centres(),
        lambda mod, x, w, bias, y: (
            ref_linear(x, w, bias, y)
            + 0.5
            * 0.2
            * sum(torch.sum((x[b] - mod.centers[y[b]]) ** 2) for b in range(x.shape[0]))
            / x.shape[0]
        ),
    ),
}


def ref_combined_case(x: Tensor, w: Tensor, y: list[int], m1: float, m2: float, m3: float):
    return ref_normalized(x, w, y, lambda c, b: ref_combined(c, m1, m2, m3), lambda b: 6.0)


def _center_with_centres() -> CenterLoss:
    loss = CenterLoss(C, D, lam=0.2, alpha=0.5)
    loss.centers.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(5)))
    return loss


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(1)
    module = CASES[name][0]().double()
    if hasattr(module, "bias"):
        with torch.no_grad():
            module.bias.copy_(torch.randn(C, dtype=torch.float64))
    return module


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk", [3, 4096])
def test_value_and_gradients_match_loop_reference(name: str, chunk: int) -> None:
    module = build(name)
    if hasattr(module, "chunk_size"):
        module.chunk_size = chunk
    x, labels = batch()
    centers_before = module.centers.clone() if name == "center" else None
    xr = x.clone().requires_grad_()
    wr = module.weight.detach().clone().requires_grad_()
    br = module.bias.detach().clone().requires_grad_() if hasattr(module, "bias") else None
    expected = CASES[name][1](module, xr, wr, br, labels.tolist())
    expected.backward()

    xm = x.clone().requires_grad_()
    got = module(xm, labels)
    got.backward()
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(module.weight.grad, wr.grad, rtol=1e-8, atol=1e-10)
    if br is not None:
        torch.testing.assert_close(module.bias.grad, br.grad, rtol=1e-8, atol=1e-10)
    if centers_before is not None:
        assert not torch.equal(module.centers, centers_before)  # trained: centres moved


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_every_loss(name: str) -> None:
    module = build(name)
    module.chunk_size = 4  # several chunks, one of them partial
    module.eval()  # AdaCos / annealing / centre updates would change the function per call
    x, labels = batch(b=4, seed=3)
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    names = list(params)

    def f(xx: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(module, dict(zip(names, ps, strict=True)), (xx, labels))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *params.values()))


@pytest.mark.parametrize("name", ["sphereface", "lsoftmax"])
def test_gradcheck_training_mode_with_constant_lambda(name: str) -> None:
    # training mode counts iterations; with lambda_min = base, λ stays constant
    torch.manual_seed(0)
    module = {
        "sphereface": lambda: SphereFaceLoss(C, D, m=3, base=0.3, lambda_min=0.3),
        "lsoftmax": lambda: LargeMarginSoftmaxLoss(C, D, m=2, base=0.3, lambda_min=0.3),
    }[name]().double()
    x, labels = batch(b=4, seed=4)
    w = module.weight.detach().clone().requires_grad_()

    def f(xx: Tensor, ww: Tensor) -> Tensor:
        return functional_call(module, {"weight": ww}, (xx, labels))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w))
    assert int(module.margin.iteration) > 0


def test_adacos_dynamic_scale_and_loss_match_reference() -> None:
    torch.manual_seed(2)
    module = AdaCosLoss(C, D, dynamic=True).double()
    x, labels = batch(b=8, seed=6)
    old = math.sqrt(2) * math.log(C - 1)
    assert float(module.current_scale) == pytest.approx(old, rel=1e-12)
    new = ref_adacos_scale(x, module.weight.detach(), labels.tolist(), old)

    xr = x.clone().requires_grad_()
    wr = module.weight.detach().clone().requires_grad_()
    expected = ref_normalized(xr, wr, labels.tolist(), lambda c, b: c, lambda b: new)
    expected.backward()
    xm = x.clone().requires_grad_()
    got = module(xm, labels)
    got.backward()
    assert float(module.current_scale) == pytest.approx(new, rel=1e-10)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
    # the scale is a constant for the gradient
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(module.weight.grad, wr.grad, rtol=1e-8, atol=1e-10)

    # a second step starts from the updated scale; evaluation mode leaves it alone
    newer = ref_adacos_scale(x, module.weight.detach(), labels.tolist(), new)
    module(x, labels)
    assert float(module.current_scale) == pytest.approx(newer, rel=1e-10)
    module.eval()
    module(x, labels)
    assert float(module.current_scale) == pytest.approx(newer, rel=1e-10)


def test_margin_cross_entropy_on_a_sampled_subset_with_remapped_labels() -> None:
    # the Partial FC seam: some rows of W, labels remapped into them, the margin keyed by
    # the original class ids
    gen = torch.Generator().manual_seed(7)
    num_classes, dim = 12, 6
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(5, dim, generator=gen, dtype=torch.float64)
    original = torch.tensor([3, 9, 3, 0, 11])
    sampled = torch.tensor([0, 2, 3, 5, 9, 11])  # holds every positive class
    remapped = torch.searchsorted(sampled, original)
    margins = torch.linspace(0.1, 0.6, num_classes, dtype=torch.float64)
    margin = DynamicArcMargin(margins)

    wr = w.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    rows = [
        [
            4.0
            * (
                ref_arc(ref_cos(xr[b], wr[int(c)]), float(margins[original[b]]))
                if int(c) == int(original[b])
                else ref_cos(xr[b], wr[int(c)])
            )
            for c in sampled
        ]
        for b in range(5)
    ]
    expected = ref_cross_entropy(rows, remapped.tolist())
    expected.backward()

    wm = w.clone().requires_grad_()
    xm = x.clone().requires_grad_()
    got = margin_cross_entropy(
        xm, wm[sampled], remapped, margin, 4.0, margin_labels=original, chunk_size=2
    )
    got.backward()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(wm.grad, wr.grad, rtol=1e-8, atol=1e-10)
    assert torch.count_nonzero(wm.grad.abs().sum(1)) == len(sampled)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_margin_cross_entropy_reductions(reduction: str) -> None:
    x, labels = batch(seed=8)
    w = torch.randn(C, D, dtype=torch.float64)
    per_sample = torch.stack(
        [
            ref_normalized(x[b : b + 1], w, [int(labels[b])], lambda c, _: c - 0.2, lambda _: 3.0)
            for b in range(x.shape[0])
        ]
    )
    got = margin_cross_entropy(x, w, labels, CosMargin(0.2), 3.0, reduction=reduction)
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}
    torch.testing.assert_close(got, expected[reduction], rtol=1e-10, atol=1e-12)


def test_gradcheck_custom_function_with_per_row_scale_subcenters_and_weights() -> None:
    # per-row scale with its own gradient, sub-centres, uneven chunks, 'none' reduction
    x, labels = batch(b=5, seed=9)
    w = torch.randn(4 * 3, D, dtype=torch.float64)
    labels = labels % 4
    s = torch.rand(5, dtype=torch.float64) * 3 + 0.5

    def f(xx: Tensor, ww: Tensor, ss: Tensor) -> Tensor:
        return margin_cross_entropy(
            xx, ww, labels, ArcMargin(0.3), ss, subcenters=3, reduction="none", chunk_size=7
        )

    inputs = (x.requires_grad_(), w.requires_grad_(), s.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_sum_of_weighted_samples() -> None:
    # negative, zero and positive output weights exercise the sign handling of the backward
    x, labels = batch(b=5, seed=10)
    w = torch.randn(C, D, dtype=torch.float64)
    coeff = torch.tensor([1.0, -2.0, 0.0, 0.5, -0.1], dtype=torch.float64)

    def f(xx: Tensor, ww: Tensor) -> Tensor:
        out = margin_cross_entropy(xx, ww, labels, NoMargin(), 2.0, reduction="none")
        return (out * coeff).sum()

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_()))


def test_adacos_scale_floor_and_recovery() -> None:
    # every non-target cosine ≈ −1: ln B_avg < 0, the scale is floored, then recovers
    module = AdaCosLoss(3, 2, dynamic=True).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-1.0, -0.1]]))
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    old = float(module.current_scale)
    assert ref_adacos_scale(x, module.weight.detach(), labels.tolist(), old) < 0
    first = module(x, labels)
    assert float(module.current_scale) == AdaCosLoss.MIN_SCALE
    assert torch.isfinite(first)
    expected = ref_adacos_scale(x, module.weight.detach(), labels.tolist(), AdaCosLoss.MIN_SCALE)
    second = module(x, labels)
    assert float(module.current_scale) == pytest.approx(expected, rel=1e-10) and expected > 0.5
    assert torch.isfinite(second)
