"""Multi-scale local binary patterns (LBP) and the texture PAD detector built on them.

**LBP** (Ojala, Pietikäinen, Mäenpää, "Multiresolution gray-scale and rotation invariant
texture classification with local binary patterns", TPAMI 2002): for a pixel with grey
value ``g_c`` and ``P`` neighbours ``g_p`` sampled on a circle of radius ``R`` (angle
``2πp/P``, ``x = R cos``, ``y = −R sin``, bilinear interpolation between pixels),

    LBP_{P,R} = Σ_p s(g_p − g_c) · 2^p,     s(v) = 1 if v ≥ 0 else 0.

The interpolated difference is computed as ``g_p − g_c = Σ_k w_k (g_k − g_c)`` over the
(up to four) pixels ``k`` around the sample point, with bilinear weights ``w_k`` (they sum
to 1): a flat patch then gives exactly 0 (bit 1) whatever rounding the weights carry.

A pattern is *uniform* (``u2``) when its circular bit string has at most two 0/1
transitions; there are ``P(P−1) + 2`` of them (58 for ``P = 8``, 242 for ``P = 16``). The
``u2`` histogram has one bin per uniform pattern (in increasing code order) plus one for
every non-uniform pattern: 59 bins for ``P = 8``, 243 for ``P = 16``. Only pixels whose
whole circle lies inside the image (``⌈R⌉`` from the border) get a code.

**Features** (Määttä, Hadid, Pietikäinen, "Face spoofing detection from single images using
micro-texture analysis", IJCB 2011): the grey image normalised to 64 × 64;
``LBP^{u2}_{8,1}`` histograms of 3 × 3 overlapping regions (14 px overlap) = 9 × 59, plus
whole-image ``LBP^{u2}_{8,2}`` (59) and ``LBP^{u2}_{16,2}`` (243): 833 values, each
histogram normalised to sum 1. Here they are computed twice — on the face (the centre of
the context crop, where the face box lies) and on the whole context crop (paper edge,
fingers, background of the print) — and concatenated (1,666 values); the paper's
non-linear SVM is replaced by the linear classifier of :mod:`facemetric.pad.linear`.

All codes are computed with whole-array numpy operations (one shifted-array expression
per neighbour), no per-pixel loop.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write
from facemetric.pad.base import PadDetector, PadInput, check_crops
from facemetric.pad.linear import LogisticModel, fit_logistic

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (R, G, B) for the grey image."""


def neighbour_offsets(points: int, radius: float) -> np.ndarray:
    """``(P, 2)`` offsets ``(dy, dx)`` of the circle's sample points (rounded to 1e-12, so
    ``cos(π/2)`` is exactly 0 and points on the pixel grid need no interpolation)."""
    if points < 1 or radius <= 0:
        raise ValueError(f"LBP needs points >= 1 and radius > 0, got {points}, {radius}")
    angle = 2.0 * np.pi * np.arange(points) / points
    return np.round(np.stack([-radius * np.sin(angle), radius * np.cos(angle)], 1), 12) + 0.0


def lbp_codes(gray: np.ndarray, points: int = 8, radius: float = 1.0) -> np.ndarray:
    """``LBP_{P,R}`` code of every pixel at least ``⌈R⌉`` from the border.

    Args:
        gray: ``(H, W)`` grey image (any real dtype).

    Returns:
        ``(H − 2⌈R⌉, W − 2⌈R⌉)`` int64 codes in ``[0, 2^P)``.
    """
    g = np.asarray(gray, dtype=np.float64)
    m = math.ceil(radius)
    if g.ndim != 2 or min(g.shape) <= 2 * m:
        raise ValueError(f"LBP radius {radius} needs a 2-D image larger than {2 * m} pixels, "
                         f"got shape {g.shape}")
    h, w = g.shape
    centre = g[m:h - m, m:w - m]
    codes = np.zeros(centre.shape, dtype=np.int64)
    for p, (dy, dx) in enumerate(neighbour_offsets(points, radius)):
        y0, x0 = math.floor(dy), math.floor(dx)
        fy, fx = dy - y0, dx - x0
        diff = np.zeros_like(centre)
        for oy, ox, weight in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                               (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
            if weight != 0.0:
                diff = diff + weight * (g[m + oy:h - m + oy, m + ox:w - m + ox] - centre)
        codes |= (diff >= 0.0).astype(np.int64) << p
    return codes


@functools.cache
def uniform_labels(points: int) -> np.ndarray:
    """``(2^P,)`` lookup table: code → ``u2`` label (uniform codes numbered in increasing
    order, every non-uniform code gets the last label ``P(P−1) + 2``)."""
    if not 1 <= points <= 24:
        raise ValueError(f"uniform LBP tables are built for 1..24 points, got {points}")
    codes = np.arange(1 << points, dtype=np.int64)
    rotated = (codes >> 1) | ((codes & 1) << (points - 1))
    uniform = np.bitwise_count(codes ^ rotated) <= 2
    labels = np.full(codes.shape, int(uniform.sum()), dtype=np.int64)
    labels[uniform] = np.arange(int(uniform.sum()))
    labels.setflags(write=False)
    return labels


def uniform_bins(points: int) -> int:
    """Bins of the ``u2`` histogram: ``P(P−1) + 3``."""
    return points * (points - 1) + 3


def lbp_histogram(labels: np.ndarray, bins: int) -> np.ndarray:
    """Normalised histogram (sums to 1) of ``u2`` labels: ``(bins,)`` float64."""
    counts = np.bincount(labels.reshape(-1), minlength=bins).astype(np.float64)
    return counts / max(1.0, counts.sum())


def region_starts(length: int, regions: int, overlap: int) -> tuple[int, list[int]]:
    """``(side, starts)`` of ``regions`` windows with ``overlap`` pixels shared by
    neighbours covering ``length`` pixels: ``side = ⌈(length + (regions−1)·overlap) /
    regions⌉``, starts spread evenly from 0 to ``length − side``."""
    side = math.ceil((length + (regions - 1) * overlap) / regions)
    if side > length or side < 1:
        raise ValueError(f"{regions} regions with {overlap} px overlap do not fit {length} px")
    starts = np.round(np.linspace(0, length - side, regions)).astype(int).tolist()
    return side, starts


@dataclass(frozen=True)
class MultiScaleLbp:
    """The 833-value descriptor of Määttä et al. (module docstring) of one grey image.

    Attributes:
        size: the image is resized to ``size × size`` first (64 in the paper).
        grid, overlap: regions of the ``LBP^{u2}_{8,1}`` image (3 × 3, 14 px).
        scales: ``(P, R)`` of the whole-image histograms ((8, 2) and (16, 2)).
    """

    size: int = 64
    grid: int = 3
    overlap: int = 14
    scales: tuple[tuple[int, float], ...] = ((8, 2.0), (16, 2.0))

    @property
    def dim(self) -> int:
        return self.grid * self.grid * uniform_bins(8) + sum(uniform_bins(p) for p, _ in
                                                             self.scales)

    def __call__(self, gray: np.ndarray) -> np.ndarray:
        import cv2

        g = np.asarray(gray, dtype=np.float32)
        if g.shape != (self.size, self.size):
            interp = cv2.INTER_AREA if min(g.shape) > self.size else cv2.INTER_LINEAR
            g = cv2.resize(g, (self.size, self.size), interpolation=interp)
        local = uniform_labels(8)[lbp_codes(g, 8, 1.0)]
        side, starts = region_starts(local.shape[0], self.grid, self.overlap)
        parts = [lbp_histogram(local[r:r + side, c:c + side], uniform_bins(8))
                 for r in starts for c in starts]
        for points, radius in self.scales:
            labels = uniform_labels(points)[lbp_codes(g, points, radius)]
            parts.append(lbp_histogram(labels, uniform_bins(points)))
        return np.concatenate(parts)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of a uint8 RGB image: ``(H, W)`` float32 in ``[0, 255]``."""
    return np.asarray(rgb, dtype=np.float32) @ np.asarray(LUMA, dtype=np.float32)


def face_region(crop: np.ndarray, face_fraction: float) -> np.ndarray:
    """The centred square of side ``face_fraction`` × the crop's side: where the face box
    lies in an unclipped context crop."""
    h, w = crop.shape[:2]
    side_h, side_w = max(8, round(h * face_fraction)), max(8, round(w * face_fraction))
    top, left = (h - side_h) // 2, (w - side_w) // 2
    return crop[top:top + side_h, left:left + side_w]


@dataclass(frozen=True)
class LbpConfig:
    """Which regions the descriptor is computed on (``"face"``, ``"context"``) and the
    classifier's candidate regularisation values ``cs`` (scikit-learn's ``C``)."""

    regions: tuple[str, ...] = ("face", "context")
    descriptor: MultiScaleLbp = field(default_factory=MultiScaleLbp)
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)

    def __post_init__(self) -> None:
        if not self.regions or any(r not in ("face", "context") for r in self.regions):
            raise ValueError(f"LBP regions must be 'face' and/or 'context', got {self.regions}")
        if not self.cs or min(self.cs) <= 0:
            raise ValueError(f"cs must be positive regularisation values, got {self.cs}")

    def to_dict(self) -> dict[str, Any]:
        return {"regions": list(self.regions), "descriptor": asdict(self.descriptor),
                "cs": list(self.cs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LbpConfig:
        desc = dict(d["descriptor"])
        desc["scales"] = tuple((int(p), float(r)) for p, r in desc["scales"])
        return cls(tuple(d["regions"]), MultiScaleLbp(**desc), tuple(float(c) for c in d["cs"]))


def lbp_features(crops: Sequence[np.ndarray], config: LbpConfig,
                 pad_input: PadInput) -> np.ndarray:
    """``(n, len(regions) · 833)`` descriptors of context crops."""
    rows = []
    for crop in check_crops(crops):
        parts = []
        for region in config.regions:
            image = face_region(crop, pad_input.face_fraction) if region == "face" else crop
            parts.append(config.descriptor(to_gray(image)))
        rows.append(np.concatenate(parts))
    width = len(config.regions) * config.descriptor.dim
    return np.stack(rows) if rows else np.zeros((0, width))


class LbpDetector(PadDetector):
    """Multi-scale LBP (face + context) → logistic regression (module docstring).

    ``score`` = ``σ(β·x̃ + b)``, the attack probability; weights saved as ``lbp.npz``
    (mean, scale, coef, intercept — plain float64 arrays).
    """

    kind = "lbp"
    weights_file = "lbp.npz"

    def __init__(self, model: LogisticModel, config: LbpConfig, threshold: float,
                 pad_input: PadInput | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(threshold, pad_input, info)
        self.model = model
        self.config = config
        want = len(config.regions) * config.descriptor.dim
        if model.coef.shape[0] != want:
            raise ValueError(f"the LBP classifier has {model.coef.shape[0]} weights but the "
                             f"configuration makes {want} features")

    def features(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        return lbp_features(crops, self.config, self.input)

    def score(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        return self.model.proba(self.features(crops))

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _write_weights(self, path: Path) -> None:
        arrays = self.model.arrays()
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def _from_saved(cls, manifest: dict[str, Any], weights: Path) -> LbpDetector:
        with np.load(weights, allow_pickle=False) as arrays:
            model = LogisticModel.from_arrays(arrays)
        return cls(model, LbpConfig.from_dict(manifest["config"]), float(manifest["threshold"]),
                   PadInput(**manifest["input"]), manifest.get("info", {}))


def train_lbp(
    crops: Sequence[np.ndarray],
    is_attack: Any,
    subjects: Sequence[str],
    config: LbpConfig | None = None,
    pad_input: PadInput | None = None,
    threshold_rule: str = "equal",
    target_apcer: float | None = None,
    features: np.ndarray | None = None,
) -> LbpDetector:
    """Train on ``crops`` of ``subjects``; regularisation and threshold from the training
    subjects only.

    Leave-one-subject-out *inside* the training subjects gives every training crop a score
    from a model that never saw its subject; ``C`` is the candidate with the lowest
    (class-balanced) log-loss of those scores, and the threshold is chosen on them with
    :func:`~facemetric.evaluation.pad.select_threshold` (``threshold_rule``). The final model
    is then fitted on all training crops. ``features`` may pass precomputed
    :func:`lbp_features` of ``crops``.
    """
    from facemetric.evaluation.pad import pad_errors, select_threshold

    config = config or LbpConfig()
    pad_input = pad_input or PadInput()
    started = time.perf_counter()
    y = np.asarray(is_attack).astype(bool)
    subj = np.asarray([str(s) for s in subjects])
    x = lbp_features(crops, config, pad_input) if features is None else np.asarray(features)
    if not (x.shape[0] == y.shape[0] == subj.shape[0]):
        raise ValueError(f"{x.shape[0]} crops, {y.shape[0]} labels and {subj.shape[0]} "
                         "subjects must match")
    groups = sorted(set(subj.tolist()))
    if len(groups) < 2:
        raise ValueError(f"training needs at least 2 subjects (the threshold is chosen on "
                         f"held-out subjects), got {groups}")
    best: tuple[float, float, np.ndarray] | None = None
    for c in config.cs:
        oof = np.zeros(y.shape[0])
        for g in groups:
            test = subj == g
            if y[~test].all() or not y[~test].any():
                raise ValueError(f"without subject {g!r} the training data has one class only")
            oof[test] = fit_logistic(x[~test], y[~test], C=c).proba(x[test])
        p = np.clip(oof, 1e-12, 1 - 1e-12)
        w = np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
        loss = float(np.mean(w * -(y * np.log(p) + (~y) * np.log(1 - p))))
        if best is None or loss < best[0]:
            best = (loss, c, oof)
    assert best is not None
    loss, c, oof = best
    threshold = select_threshold(oof, y, threshold_rule, target_apcer)
    model = fit_logistic(x, y, C=c)
    errors = pad_errors(oof, y, threshold)
    info = {
        "training_subjects": groups,
        "attacks": int(y.sum()),
        "bona_fide": int((~y).sum()),
        "C": c,
        "inner_log_loss": loss,
        "threshold_rule": (f"{threshold_rule}" + (f" (APCER ≤ {target_apcer})"
                                                  if threshold_rule == "apcer" else "")
                           + " on leave-one-subject-out scores of the training subjects"),
        "training_subject_errors": errors.to_dict(),
        "train_seconds": time.perf_counter() - started,
    }
    return LbpDetector(model, config, threshold, pad_input, info)


__all__ = [
    "LbpConfig",
    "LbpDetector",
    "MultiScaleLbp",
    "face_region",
    "lbp_codes",
    "lbp_features",
    "lbp_histogram",
    "neighbour_offsets",
    "region_starts",
    "to_gray",
    "train_lbp",
    "uniform_bins",
    "uniform_labels",
]
