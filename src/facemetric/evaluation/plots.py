"""Figures of verification and identification results: ROC, score histograms, CMC.

Every function draws on a fresh ``matplotlib.figure.Figure`` rendered by the Agg canvas —
never ``pyplot``, so no display is opened, no global backend is switched and nothing leaks
between calls — and writes a PNG **atomically** (``facemetric.atomic.atomic_write``): a
failure while drawing or saving leaves neither a partial PNG nor a temporary file behind
(an existing file at ``path`` is kept as it was). The figure title is also stored in the
PNG's ``Title`` text chunk.

matplotlib is an optional dependency (``pip install facemetric[plot]``), imported on the
first call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemetric.atomic import atomic_write
from facemetric.evaluation.identification import CMCCurve
from facemetric.evaluation.verification import VerificationReport, check_pairs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Above this many ROC points the curve is drawn from TAR@FAR evaluated on a log-spaced FAR
# grid of this size (exact values of the step function, just fewer of them).
_MAX_ROC_POINTS = 4000
_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure attached to an Agg canvas; clear error without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (fail here, with our message, if it is missing)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install facemetric[plot]"
        ) from exc
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike[str], title: str) -> Path:
    """Render ``fig`` as PNG and write it atomically (``facemetric.atomic``)."""
    return atomic_write(
        path, lambda fh: fig.savefig(fh, format="png", dpi=_DPI, metadata={"Title": title})
    )


def _as_named(items: Mapping[str, Any] | Any, kind: type, what: str) -> dict[str, Any]:
    """``{name: item}`` from a mapping or one bare item (named ``""``)."""
    named = dict(items) if isinstance(items, Mapping) else {"": items}
    if not named:
        raise ValueError(f"nothing to plot: no {what} given")
    for name, item in named.items():
        if not isinstance(item, kind):
            raise TypeError(f"{what} {name!r} is a {type(item).__name__}, not a {kind.__name__}")
    return named


def _roc_polyline(report: VerificationReport) -> tuple[np.ndarray, np.ndarray]:
    """``(far, tar)`` of the ROC points with FAR ≥ 1/num_negatives, for a ``steps-post`` plot.

    FAR = 0 cannot sit on a log axis and lies below the resolution anyway. Long curves are
    resampled: TAR@FAR (largest TAR with FAR ≤ x) at log-spaced ``x`` from 1/N to 1.
    """
    roc = report.roc
    keep = roc.far > 0.0
    far, tar = roc.far[keep], roc.tar[keep]
    if far.shape[0] > _MAX_ROC_POINTS:
        grid = np.geomspace(1.0 / roc.num_negatives, 1.0, _MAX_ROC_POINTS)
        index = np.searchsorted(roc.far, grid * (1.0 + 1e-9), side="right") - 1
        far, tar = grid, roc.tar[index]
    return far, tar


def _percent(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def plot_roc(
    reports: Mapping[str, VerificationReport] | VerificationReport,
    path: str | os.PathLike[str],
    *,
    title: str = "ROC",
) -> Path:
    """TAR against FAR on a log FAR axis, one curve per report (legend: name, AUC, EER).

    Only FARs ≥ 1/N (N = the report's number of negative pairs) are drawn; a dotted vertical
    line in the curve's colour marks that resolution limit. The resolved TAR@FAR operating
    points of each report are marked with dots. Returns ``Path(path)``.
    """
    named = _as_named(reports, VerificationReport, "report")
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    lowest = 1.0
    for name, report in named.items():
        far, tar = _roc_polyline(report)
        label = f"AUC {report.auc:.4f}, EER {_percent(report.eer)}"
        label = f"{name}: {label}" if name else label
        (line,) = ax.plot(far, tar, drawstyle="steps-post", lw=1.5, label=label)
        limit = 1.0 / report.num_negatives
        lowest = min(lowest, limit)
        ax.axvline(limit, color=line.get_color(), ls=":", lw=1.0)
        points = [(f, t) for f, t in report.tar_at_far.items() if t is not None]
        if points:
            fx, ty = zip(*points, strict=True)
            ax.plot(fx, ty, "o", ms=4, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlim(10.0 ** np.floor(np.log10(lowest) - 1e-9), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (log; dotted: 1 / number of negative pairs)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _save_figure(fig, path, title)


def plot_score_histograms(
    scores: Any,
    is_same: Any,
    threshold: float | None,
    path: str | os.PathLike[str],
    *,
    bins: int = 60,
    title: str = "Pair scores",
) -> Path:
    """Densities of same-identity and different-identity pair scores on shared bins.

    ``threshold`` (e.g. the mean k-fold threshold) is drawn as a vertical line; ``None`` or a
    non-finite value (accept/reject everything) draws no line and says so in the legend.
    Each histogram is normalised to unit area, so unequal class sizes stay comparable; the
    legend gives the counts. Returns ``Path(path)``.
    """
    s, y = check_pairs(scores, is_same)
    if bins < 1:
        raise ValueError(f"bins must be ≥ 1, got {bins}")
    edges = np.histogram_bin_edges(s, bins=bins)
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    for mask, label, color in ((y, "same identity", "tab:green"), (~y, "different", "tab:red")):
        count = int(mask.sum())
        if count:
            ax.hist(
                s[mask],
                bins=edges,
                density=True,
                histtype="stepfilled",
                alpha=0.35,
                color=color,
                edgecolor=color,
                label=f"{label} ({count} pairs)",
            )
    if threshold is not None and np.isfinite(threshold):
        tau = float(threshold)
        ax.axvline(tau, color="black", ls="--", lw=1.2, label=f"threshold {tau:.4f}")
    else:
        ax.plot([], [], " ", label="threshold: none finite")
    ax.set_xlabel("score (higher = more similar)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save_figure(fig, path, title)


def plot_cmc(
    curves: Mapping[str, CMCCurve] | CMCCurve,
    path: str | os.PathLike[str],
    max_rank: int = 20,
    *,
    title: str = "CMC",
) -> Path:
    """Identification rate against rank ``1..max_rank`` (or the gallery size if smaller),
    one curve per CMC (legend: name and rank-1 rate). Returns ``Path(path)``."""
    named = _as_named(curves, CMCCurve, "CMC curve")
    if max_rank < 1:
        raise ValueError(f"max_rank must be ≥ 1, got {max_rank}")
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    longest = 1
    for name, cmc in named.items():
        rates = cmc.curve[:max_rank]
        ranks = np.arange(1, rates.shape[0] + 1)
        longest = max(longest, int(ranks[-1]))
        label = f"rank-1 {_percent(cmc.rank1)}"
        label = f"{name}: {label}" if name else label
        ax.plot(ranks, rates, marker="o" if rates.shape[0] <= 30 else None, ms=3, label=label)
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_ylim(None, 1.01)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _save_figure(fig, path, title)


__all__ = ["plot_cmc", "plot_roc", "plot_score_histograms"]
