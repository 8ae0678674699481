"""Presentation-attack detection (PAD) metrics as ISO/IEC 30107-3 defines them.

Scores are *attack scores* (higher = more likely an attack, e.g. an attack probability); a
presentation is classified as an attack when ``score >= threshold``. For ``N_A`` attack
presentations and ``N_BF`` bona fide presentations:

- **APCER** (attack presentation classification error rate) = attacks classified as bona
  fide / ``N_A`` = ``#{attack: s < τ} / N_A``. ISO/IEC 30107-3 computes it per attack
  instrument species (print, replay, mask, …) and reports the *worst* species:
  ``APCER = max_species APCER_species``; without species labels all attacks are one species;
- **BPCER** (bona fide presentation classification error rate) = bona fide classified as
  attacks / ``N_BF`` = ``#{bona fide: s >= τ} / N_BF``;
- **ACER** = (APCER + BPCER) / 2 (not an ISO metric, but the one the anti-spoofing
  literature ranks by; reported beside the other two, never alone);
- **BPCER@APCER=x**: the lowest BPCER of any threshold whose APCER ≤ ``x``. With ``N_A``
  attacks APCER moves in steps of ``1/N_A``: a target below ``1/N_A`` cannot be told apart
  from 0 and is reported as unresolved (``None``), as ``tar_at_far`` does for FAR;
- the **DET curve**: BPCER against APCER over every threshold, both on normal-deviate
  (probit) axes (ISO/IEC 19795-1's detection error trade-off plot).

Every result carries the numbers of attack and bona fide presentations behind it.

Thresholds *chosen* from scores (:func:`select_threshold`) are placed in the middle of the
gap between two consecutive distinct scores, so a threshold chosen on training subjects is
not glued to one training sample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "THRESHOLD_RULES",
    "BpcerAtApcer",
    "DetCurve",
    "PadErrors",
    "PadReport",
    "bpcer_at_apcer",
    "check_pad_scores",
    "det_curve",
    "pad_errors",
    "pad_report",
    "plot_det",
    "select_threshold",
]

THRESHOLD_RULES = ("equal", "apcer")
"""How :func:`select_threshold` chooses: ``"equal"`` (APCER = BPCER as nearly as the data
allows) or ``"apcer"`` (lowest BPCER with APCER ≤ a target)."""


def check_pad_scores(
    scores: Any, is_attack: Any, species: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores float64, is_attack bool, species str)`` as 1-D arrays of equal length.

    Raises:
        ValueError: shapes differ, a score is not finite, or there is no attack or no bona
            fide presentation (the rates would be 0/0).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_attack).reshape(-1)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("is_attack must be booleans or 0/1 values")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and is_attack ({y.shape[0]}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (a NaN or inf score cannot be thresholded)")
    if not y.any() or y.all():
        raise ValueError(
            f"PAD metrics need both attack and bona fide presentations, got {int(y.sum())} "
            f"attacks and {int((~y).sum())} bona fide"
        )
    sp = np.full(s.shape, "attack", dtype=object) if species is None else np.asarray(species)
    if sp.reshape(-1).shape != s.shape:
        raise ValueError(f"species has {sp.size} labels for {s.shape[0]} scores")
    return s, y, sp.reshape(-1).astype(str)


def _species_scores(s: np.ndarray, y: np.ndarray, sp: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.sort(s[y & (sp == name)]) for name in sorted(set(sp[y].tolist()))}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100.0 * x:.2f}%"


@dataclass(frozen=True)
class PadErrors:
    """APCER, BPCER and ACER at one threshold (module docstring).

    Attributes:
        threshold: attack when ``score >= threshold``.
        apcer: worst species' APCER; ``apcer_by_species`` each species'.
        attacks, bona_fide: the numbers of presentations behind the rates.
    """

    threshold: float
    apcer: float
    bpcer: float
    attacks: int
    bona_fide: int
    apcer_by_species: Mapping[str, float] = field(default_factory=dict)

    @property
    def acer(self) -> float:
        return 0.5 * (self.apcer + self.bpcer)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "apcer": self.apcer, "bpcer": self.bpcer,
                "acer": self.acer, "attacks": self.attacks, "bona_fide": self.bona_fide,
                "apcer_by_species": dict(self.apcer_by_species)}

    def __str__(self) -> str:
        return (f"APCER {_pct(self.apcer)} ({self.attacks} attacks), BPCER {_pct(self.bpcer)} "
                f"({self.bona_fide} bona fide), ACER {_pct(self.acer)} at τ={self.threshold:.4g}")


def pad_errors(scores: Any, is_attack: Any, threshold: float, species: Any = None) -> PadErrors:
    """APCER/BPCER/ACER of ``scores`` at ``threshold`` (attack when ``score >= threshold``)."""
    s, y, sp = check_pad_scores(scores, is_attack, species)
    t = float(threshold)
    by_species = {name: float(np.mean(a < t)) for name, a in _species_scores(s, y, sp).items()}
    bpcer = float(np.mean(s[~y] >= t))
    return PadErrors(t, max(by_species.values()), bpcer, int(y.sum()), int((~y).sum()),
                     by_species)


@dataclass(frozen=True)
class DetCurve:
    """APCER and BPCER at every distinct threshold, ``thresholds`` increasing (the last is
    ``+inf``: everything bona fide). APCER rises and BPCER falls along the arrays."""

    thresholds: np.ndarray
    apcer: np.ndarray
    bpcer: np.ndarray
    attacks: int
    bona_fide: int


def _rates(s: np.ndarray, y: np.ndarray, sp: np.ndarray,
           thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    apcer = np.zeros(thresholds.shape[0])
    for a in _species_scores(s, y, sp).values():
        apcer = np.maximum(apcer, np.searchsorted(a, thresholds, side="left") / a.shape[0])
    bona = np.sort(s[~y])
    bpcer = (bona.shape[0] - np.searchsorted(bona, thresholds, side="left")) / bona.shape[0]
    return apcer, bpcer


def det_curve(scores: Any, is_attack: Any, species: Any = None) -> DetCurve:
    """The DET curve (every distinct score as a threshold, then ``+inf``)."""
    s, y, sp = check_pad_scores(scores, is_attack, species)
    thresholds = np.append(np.unique(s), np.inf)
    apcer, bpcer = _rates(s, y, sp, thresholds)
    return DetCurve(thresholds, apcer, bpcer, int(y.sum()), int((~y).sum()))


@dataclass(frozen=True)
class BpcerAtApcer:
    """BPCER at APCER ≤ ``target``: ``bpcer`` and its ``threshold`` are ``None`` when the
    ``attacks`` cannot resolve the target (fewer than ``1/target`` attacks per species)."""

    target: float
    bpcer: float | None
    threshold: float | None
    attacks: int
    bona_fide: int

    @property
    def resolved(self) -> bool:
        return self.bpcer is not None

    def __str__(self) -> str:
        if self.bpcer is None:
            return (f"BPCER@APCER={_pct(self.target)}: unresolved ({self.attacks} attacks "
                    f"cannot resolve {_pct(self.target)}; it needs ≥ "
                    f"{math.ceil(1.0 / self.target - 1e-9)})")
        return (f"BPCER@APCER={_pct(self.target)}: {_pct(self.bpcer)} "
                f"({self.attacks} attacks, {self.bona_fide} bona fide)")


def bpcer_at_apcer(scores: Any, is_attack: Any, target: float,
                   species: Any = None) -> BpcerAtApcer:
    """The lowest BPCER of a threshold with APCER ≤ ``target`` (module docstring).

    With ``k_s = floor(target · N_s)`` attacks of species ``s`` allowed through, the largest
    such threshold is ``min_s a_s[k_s]`` (``a_s`` that species' attack scores, ascending,
    0-based): every attack scoring below it is accepted, ties at it are caught.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"the APCER target must be in (0, 1), got {target}")
    s, y, sp = check_pad_scores(scores, is_attack, species)
    per_species = _species_scores(s, y, sp)
    n_a, n_bf = int(y.sum()), int((~y).sum())
    if min(a.shape[0] for a in per_species.values()) * target < 1.0 - 1e-9:
        return BpcerAtApcer(target, None, None, n_a, n_bf)
    candidates = []
    for a in per_species.values():
        k = math.floor(target * a.shape[0] + 1e-9)
        candidates.append(np.inf if k >= a.shape[0] else float(a[k]))
    t = float(min(candidates))
    return BpcerAtApcer(target, float(np.mean(s[~y] >= t)), t, n_a, n_bf)


def select_threshold(
    scores: Any, is_attack: Any, rule: str = "equal", target_apcer: float | None = None,
    species: Any = None,
) -> float:
    """A threshold chosen from (training) scores.

    Candidates are the midpoints between consecutive distinct scores, plus one below the
    lowest and one above the highest (everything attack / everything bona fide).

    - ``rule="equal"``: minimise ``max(APCER, BPCER)`` (the equal-error point as nearly as
      the data allows), then ``APCER + BPCER``, then take the middle candidate of those left;
    - ``rule="apcer"``: the largest candidate with APCER ≤ ``target_apcer`` (lowest BPCER).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    s, y, sp = check_pad_scores(scores, is_attack, species)
    u = np.unique(s)
    span = max(1.0, float(u[-1] - u[0]))
    cand = np.concatenate([[u[0] - 1e-6 * span], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1e-6 * span]])
    apcer, bpcer = _rates(s, y, sp, cand)
    if rule == "apcer":
        if target_apcer is None or not 0.0 <= target_apcer < 1.0:
            raise ValueError(f"rule 'apcer' needs target_apcer in [0, 1), got {target_apcer}")
        ok = np.flatnonzero(apcer <= target_apcer + 1e-12)
        return float(cand[ok[-1]])  # the lowest candidate always has APCER 0
    worst = np.maximum(apcer, bpcer)
    best = np.flatnonzero(np.isclose(worst, worst.min(), rtol=0.0, atol=1e-12))
    total = apcer[best] + bpcer[best]
    best = best[np.isclose(total, total.min(), rtol=0.0, atol=1e-12)]
    return float(cand[best[(best.shape[0] - 1) // 2]])


@dataclass(frozen=True)
class PadReport:
    """The errors at an operating ``threshold`` plus BPCER at APCER targets and the DET."""

    at_threshold: PadErrors
    bpcer_at: tuple[BpcerAtApcer, ...]
    det: DetCurve

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.at_threshold.to_dict(),
            "bpcer_at_apcer": {f"{b.target:g}": b.bpcer for b in self.bpcer_at},
            "unresolved_apcer_targets": [b.target for b in self.bpcer_at if not b.resolved],
        }

    def __str__(self) -> str:
        return "\n".join([str(self.at_threshold), *(str(b) for b in self.bpcer_at)])


def pad_report(scores: Any, is_attack: Any, threshold: float,
               apcer_targets: Sequence[float] = (0.05, 0.01), species: Any = None) -> PadReport:
    """:class:`PadReport` of ``scores`` at ``threshold`` and at each APCER target."""
    return PadReport(
        pad_errors(scores, is_attack, threshold, species),
        tuple(bpcer_at_apcer(scores, is_attack, t, species) for t in apcer_targets),
        det_curve(scores, is_attack, species),
    )


# ------------------------------------------------------------------ DET plot

_DET_TICKS = (0.0001, 0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95)
_PROBIT = NormalDist()


def _probit(p: np.ndarray, lo: float) -> np.ndarray:
    clipped = np.clip(p, lo / 10.0, 1.0 - lo / 10.0)
    return np.array([_PROBIT.inv_cdf(float(v)) for v in clipped])


def plot_det(
    reports: Mapping[str, PadReport] | PadReport,
    path: str | os.PathLike[str],
    *,
    title: str = "DET (presentation-attack detection)",
) -> Path:
    """BPCER against APCER on probit axes, one curve per report, its operating point
    (the report's threshold) as a dot; the legend gives ACER and the presentation counts
    and says when a curve separates the classes perfectly (its (0, 0) point is off the axes).
    Dotted lines mark ``1/N_A`` and ``1/N_BF``, the smallest non-zero rates; a rate of 0
    lies beyond the axis edge. Same style as :mod:`facemetric.evaluation.plots` (Agg
    figure, atomic PNG write). Returns ``Path(path)``."""
    from facemetric.evaluation.plots import _as_named, _new_figure, _save_figure

    named = _as_named(reports, PadReport, "PAD report")
    lowest = min(min(1.0 / r.det.attacks, 1.0 / r.det.bona_fide) for r in named.values())
    lo = max(_DET_TICKS[0], 10.0 ** math.floor(math.log10(lowest) + 1e-9))
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    for name, report in named.items():
        det, op = report.det, report.at_threshold
        label = (f"ACER {_pct(op.acer)} (APCER {_pct(op.apcer)}, BPCER {_pct(op.bpcer)}), "
                 f"{det.attacks} A / {det.bona_fide} BF")
        if np.any((det.apcer == 0.0) & (det.bpcer == 0.0)):
            label += ", separable"
        label = f"{name}: {label}" if name else label
        (line,) = ax.plot(_probit(det.apcer, lo), _probit(det.bpcer, lo), lw=1.5,
                          label=label)
        ax.plot(_probit(np.array([op.apcer]), lo), _probit(np.array([op.bpcer]), lo), "o",
                ms=5, color=line.get_color())
        ax.axvline(_PROBIT.inv_cdf(1.0 / det.attacks), color=line.get_color(), ls=":", lw=1.0)
        ax.axhline(_PROBIT.inv_cdf(1.0 / det.bona_fide), color=line.get_color(), ls=":", lw=1.0)
    ticks = [t for t in _DET_TICKS if t >= lo]
    pos = [_PROBIT.inv_cdf(t) for t in ticks]
    labels = [f"{100 * t:g}%" for t in ticks]
    edge = (_PROBIT.inv_cdf(lo), _PROBIT.inv_cdf(0.95))
    for setter, lim, tick, tlabel in ((ax.set_xticks, ax.set_xlim, pos, labels),
                                      (ax.set_yticks, ax.set_ylim, pos, labels)):
        setter(tick, tlabel)
        lim(*edge)
    ax.set_xlabel("APCER (attacks accepted; probit; dotted: 1/attacks)")
    ax.set_ylabel("BPCER (bona fide rejected; probit)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="x-small",
              title="A: attacks, BF: bona fide; separable: a threshold\nmakes no error "
                    "(its 0 % point is off the axes)", title_fontsize="x-small")
    fig.tight_layout()
    return _save_figure(fig, path, title)
