"""Margins: rewrites of the target cosine used by the softmax-family classifier heads.

A margin is a small module ``margin(cos_target, labels) -> psi`` that maps the cosine
``cos θ_y`` between each sample and its own class centre, shape ``(B,)``, to the modified
target cosine ``ψ`` (before the head multiplies by its scale). Non-target cosines are never
touched, so any head — the full normalised classifier or a sampled Partial FC — can take any
margin (see :func:`facemetric.losses.classifier.margin_cross_entropy`).

``labels`` are class ids; only margins that depend on the class (``DynamicArcMargin``) read
them. Every margin clamps ``cos`` to ``[-1, 1]``, never takes ``acos`` on the gradient path,
clamps ``1 - cos²`` at the dtype's machine epsilon before ``sqrt`` (so values and gradients
stay finite at ``θ = 0`` and ``θ = π``; the value moves by at most that rounding), and
computes in float32 when given float16/bfloat16 input.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn


class Margin(nn.Module):
    """Base of every margin: ``forward(cos_target (B,), labels (B,)) -> ψ (B,)``.

    The input is cast to float32 if it is half precision (float64 stays float64), clamped to
    ``[-1, 1]``, and passed to :meth:`rewrite`, with autocast disabled.
    """

    def forward(self, cos_target: Tensor, labels: Tensor) -> Tensor:
        if cos_target.dtype in (torch.float16, torch.bfloat16):
            cos_target = cos_target.float()
        with no_autocast(cos_target.device.type):
            return self.rewrite(cos_target.clamp(-1.0, 1.0), labels)

    @abstractmethod
    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        """``ψ(cos)`` for cosines already clamped to ``[-1, 1]``."""


class NoMargin(Margin):
    """``ψ(cos θ) = cos θ``: the plain normalised softmax (NormFace, AdaCos)."""

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        return cos


class CosMargin(Margin):
    """Additive cosine margin (CosFace / LMCL, Wang et al. 2018): ``ψ = cos θ - m``."""

    def __init__(self, margin: float = 0.35) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"CosMargin: margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        return cos - self.margin

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class ArcMargin(Margin):
    """Additive angular margin (ArcFace, Deng et al. 2019): ``ψ = cos(θ + m)``.

    Computed as ``cos θ·cos m - sin θ·sin m`` with ``sin θ = sqrt(max(1 - cos²θ, eps))``, eps
    the dtype's machine epsilon.
    For ``θ > π - m`` the angle ``θ + m`` passes π and ``cos(θ + m)`` would rise again, which
    rewards pushing a sample *away* from its centre. With ``fallback=True`` (default) the
    target there is ``cos θ - m·sin m`` instead, which keeps ψ decreasing in θ; both branches
    are differentiated exactly (no straight-through gradient). ``fallback=False`` keeps the
    raw ``cos(θ + m)`` everywhere.
    """

    def __init__(self, margin: float = 0.5, fallback: bool = True) -> None:
        super().__init__()
        if not 0 <= margin < math.pi:
            raise ValueError(f"ArcMargin: margin must lie in [0, π) radians, got {margin}")
        self.margin = float(margin)
        self.fallback = fallback

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        # a 0-d CPU tensor combines with a GPU one as a number: creating it on the GPU would
        # be a copy from the host that waits for the queued kernels
        m = torch.tensor(self.margin, dtype=torch.float64)
        return additive_angular(cos, m, self.fallback)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, fallback={self.fallback}"


class DynamicArcMargin(Margin):
    """ArcFace margin with one margin per class: ``ψ = cos(θ + m_y)``.

    ``margins`` has shape ``(num_classes,)`` and is indexed by the class ids passed as
    ``labels``. The per-class fallback beyond ``θ > π - m_y`` is that of :class:`ArcMargin`.
    :meth:`from_counts` builds the Google-Landmark "dynamic margin" ``m_c = a·n_c^(-λ) + b``.
    """

    margins: Tensor

    def __init__(self, margins: Tensor, fallback: bool = True) -> None:
        super().__init__()
        margins = torch.as_tensor(margins, dtype=torch.float64).detach().clone()
        if margins.dim() != 1 or margins.numel() == 0:
            raise ValueError(
                f"DynamicArcMargin: margins must have shape (num_classes,), got "
                f"{tuple(margins.shape)}"
            )
        if not bool(torch.isfinite(margins).all()) or bool(
            ((margins < 0) | (margins >= math.pi)).any()
        ):
            raise ValueError("DynamicArcMargin: every margin must be finite and in [0, π)")
        self.register_buffer("margins", margins)
        self.fallback = fallback

    @classmethod
    def from_counts(
        cls, class_counts: Tensor, a: float, b: float, lam: float, fallback: bool = True
    ) -> DynamicArcMargin:
        """Margins ``m_c = a·n_c^(-lam) + b`` from per-class sample counts ``n_c >= 1``."""
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        if counts.dim() != 1 or bool((counts < 1).any()):
            raise ValueError(
                "DynamicArcMargin: class_counts must be a 1-D tensor of counts >= 1 (one per class)"
            )
        return cls(a * counts.pow(-lam) + b, fallback=fallback)

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        if labels.shape != cos.shape:
            raise ValueError(
                f"DynamicArcMargin: got {cos.shape[0]} cosines but {labels.shape[0]} labels"
            )
        if labels.numel():
            lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one read of the device
            if lo < 0 or hi >= self.margins.numel():
                raise ValueError(
                    f"DynamicArcMargin: labels must lie in [0, {self.margins.numel()}), got "
                    f"[{lo}, {hi}]"
                )
        return additive_angular(cos, self.margins[labels.long()], self.fallback)


class CombinedMargin(Margin):
    """Combined margin (InsightFace): ``ψ = cos(m1·θ + m2) - m3``.

    ``(1, m, 0)`` is ArcFace (same formula and fallback, bit for bit), ``(1, 0, m)`` CosFace,
    ``(m, 0, 0)`` a SphereFace-style multiplicative margin (without annealing). Once
    ``φ = m1·θ + m2`` passes π the target would rise again; with ``fallback=True`` (default):
    for ``m1 = 1`` ArcFace's ``cos θ - m2·sin m2 - m3``; otherwise SphereFace's monotone
    continuation ``(-1)^k cos φ - 2k - m3`` with ``k = ⌊φ/π⌋``. For ``m1 ≠ 1``, θ is
    ``atan2(sin θ, cos θ)`` with the clamped sine, so the gradient stays finite at 0 and π.
    """

    def __init__(
        self, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2, fallback: bool = True
    ) -> None:
        super().__init__()
        if m1 <= 0 or m2 < 0 or m3 < 0:
            raise ValueError(f"CombinedMargin: need m1 > 0, m2 >= 0, m3 >= 0, got {m1, m2, m3}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.fallback = fallback

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        if self.m1 == 1.0:
            m2 = torch.tensor(self.m2, dtype=torch.float64)  # on the CPU, as in ArcMargin
            return additive_angular(cos, m2, self.fallback) - self.m3
        theta = torch.atan2(_sin(cos), cos)
        phi = self.m1 * theta + self.m2
        psi = torch.cos(phi)
        if self.fallback:
            k = torch.floor(phi.detach() / math.pi)
            psi = (1.0 - 2.0 * torch.remainder(k, 2)) * psi - 2.0 * k
        return psi - self.m3

    def extra_repr(self) -> str:
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, fallback={self.fallback}"


class MultiplicativeAngularMargin(Margin):
    """Multiplicative angular margin of L-Softmax / SphereFace (Liu et al. 2016, 2017).

    ``ψ(θ) = (-1)^k cos(mθ) - 2k`` for ``θ ∈ [kπ/m, (k+1)π/m]``, ``k = 0..m-1``, with
    ``cos(mθ) = T_m(cos θ)`` (Chebyshev polynomial, so no ``acos`` at all: ψ is a polynomial
    in ``cos θ`` on each piece and its gradient is finite everywhere). The output is annealed:
    ``(λ·cos θ + ψ) / (1 + λ)`` with ``λ = max(lambda_min, base·(1 + gamma·it)^(-power))``,
    where ``it`` (buffer ``iteration``) counts forward calls in training mode; a forward uses
    the current ``it`` and then increments it. Evaluation mode neither counts nor changes λ.
    Defaults (1000, 0.12, 1, 5) are the schedule SphereFace was trained with.
    """

    iteration: Tensor

    def __init__(
        self,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__()
        if int(m) != m or m < 1:
            raise ValueError(f"MultiplicativeAngularMargin: m must be an integer >= 1, got {m}")
        if base < 0 or gamma < 0 or lambda_min < 0:
            raise ValueError("MultiplicativeAngularMargin: base, gamma, lambda_min must be >= 0")
        self.m = int(m)
        self.base, self.gamma, self.power = float(base), float(gamma), float(power)
        self.lambda_min = float(lambda_min)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        # θ ≥ jπ/m  ⇔  cos θ ≤ cos(jπ/m): the piece index k counts the thresholds passed
        self._thresholds = [math.cos(j * math.pi / self.m) for j in range(1, self.m)]

    def current_lambda(self) -> float:
        """``λ`` that the next forward will use."""
        it = float(self.iteration)
        return max(self.lambda_min, self.base * (1.0 + self.gamma * it) ** (-self.power))

    def psi(self, cos: Tensor) -> Tensor:
        """The un-annealed piecewise ``ψ(θ)`` as a function of ``cos θ ∈ [-1, 1]``."""
        prev, cur = torch.ones_like(cos), cos
        for _ in range(self.m - 1):
            prev, cur = cur, 2.0 * cos * cur - prev
        with torch.no_grad():
            k = torch.zeros_like(cos)
            for threshold in self._thresholds:
                k += (cos <= threshold).to(cos.dtype)
        return (1.0 - 2.0 * torch.remainder(k, 2)) * cur - 2.0 * k

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        lam = self.current_lambda()
        if self.training:
            self.iteration += 1
        return (lam * cos + self.psi(cos)) / (1.0 + lam)

    def extra_repr(self) -> str:
        return (
            f"m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
            f"lambda_min={self.lambda_min}"
        )


class WarmupMargin(Margin):
    """A margin switched on gradually: ``ψ_t = cos θ + α_t·(ψ(cos θ) − cos θ)``.

    ``ψ`` is the wrapped margin and ``α_t = min(1, t / steps)``, where ``t`` (buffer
    ``iteration``) counts forward calls in training mode (a forward uses the current ``t`` and
    then increments it; evaluation mode neither counts nor changes ``α``). ``α = 0`` is the
    plain normalised softmax, ``α = 1`` the wrapped margin. For an additive cosine margin this
    is exactly a margin ramped from 0 to ``m``; for ArcFace it is a blend of ``cos θ`` and
    ``cos(θ + m)`` rather than ``cos(θ + α m)`` (both rise monotonically from softmax to the
    full margin). It is the form of SphereFace's own annealing, ``(λ cos θ + ψ)/(1 + λ)`` —
    i.e. ``α = 1/(1 + λ)`` — with ``α`` linear in the step: meant for margin losses that
    stall near the untrained level early in training on small datasets (Liu et al. 2017
    anneal for the same reason). Measured on LFW DevTrain: docs/benchmarks.md.
    """

    iteration: Tensor

    def __init__(self, inner: Margin, steps: int) -> None:
        super().__init__()
        if isinstance(inner, WarmupMargin):
            raise ValueError("WarmupMargin: the margin is already warmed up; wrap it once")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"WarmupMargin: steps must be an integer >= 1, got {steps}")
        self.inner = inner
        self.steps = int(steps)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def current_alpha(self) -> float:
        """``α`` that the next forward will use."""
        return min(1.0, float(self.iteration) / self.steps)

    def rewrite(self, cos: Tensor, labels: Tensor) -> Tensor:
        alpha = self.current_alpha()
        if self.training:
            self.iteration += 1
        if alpha >= 1.0:
            return self.inner.rewrite(cos, labels)
        if alpha <= 0.0:
            return cos
        return cos + alpha * (self.inner.rewrite(cos, labels) - cos)

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


def additive_angular(cos: Tensor, margin: Tensor, fallback: bool) -> Tensor:
    """``cos(θ + m)`` from ``cos θ`` (clamped to [-1, 1]) and margins ``m`` (float64 tensor).

    With ``fallback``, ``cos θ - m·sin m`` where ``θ > π - m`` (see :class:`ArcMargin`).
    ``margin`` is a 0-d tensor (on the CPU, whatever the device of ``cos``) or one margin
    per entry of ``cos`` (on its device).
    """
    cos_m = torch.cos(margin).to(cos.dtype)
    sin_m = torch.sin(margin).to(cos.dtype)
    psi = cos * cos_m - _sin(cos) * sin_m
    if fallback:
        drop = (margin * torch.sin(margin)).to(cos.dtype)
        psi = torch.where(cos > -cos_m, psi, cos - drop)
    return psi


def _sin(cos: Tensor) -> Tensor:
    """``sin θ`` from ``cos θ``, with ``1 - cos²`` clamped at the dtype's epsilon."""
    return torch.sqrt(torch.clamp(1.0 - cos * cos, min=torch.finfo(cos.dtype).eps))


def no_autocast(device_type: str) -> AbstractContextManager[object]:
    """A context that disables autocast on ``device_type`` (a no-op where it has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()
