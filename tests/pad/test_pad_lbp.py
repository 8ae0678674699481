"""Local binary patterns against a per-pixel loop and hand-worked codes; the Määttä et al.
descriptor's layout; the logistic regression against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facemetric.pad.base import PadInput
from facemetric.pad.lbp import (
    LbpConfig,
    MultiScaleLbp,
    face_region,
    lbp_codes,
    lbp_features,
    region_starts,
    uniform_bins,
    uniform_labels,
)
from facemetric.pad.linear import fit_logistic


def _loop_lbp(image: np.ndarray, points: int, radius: float) -> np.ndarray:
    """Reference: one pixel at a time, plain Python floats."""
    g = image.astype(float).tolist()
    h, w = len(g), len(g[0])
    m = math.ceil(radius)
    out = np.zeros((h - 2 * m, w - 2 * m), dtype=np.int64)
    for i in range(m, h - m):
        for j in range(m, w - m):
            c = g[i][j]
            code = 0
            for p in range(points):
                a = 2 * math.pi * p / points
                y = round(-radius * math.sin(a), 12) + 0.0
                x = round(radius * math.cos(a), 12) + 0.0
                y0, x0 = math.floor(y), math.floor(x)
                fy, fx = y - y0, x - x0
                d = 0.0
                for oy, ox, wgt in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                                    (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
                    if wgt != 0.0:
                        d = d + wgt * (g[i + oy][j + ox] - c)
                if d >= 0.0:
                    code += 1 << p
            out[i - m, j - m] = code
    return out


@pytest.mark.parametrize(("points", "radius"), [(8, 1.0), (8, 2.0), (16, 2.0), (4, 1.5)])
def test_vectorised_lbp_equals_the_pixel_loop(points, radius):
    rng = np.random.default_rng(points * 10 + int(radius * 2))
    image = rng.integers(0, 256, size=(13, 17)).astype(np.uint8)
    image[2:6, 3:9] = 77  # a flat patch: ties everywhere inside it
    got = lbp_codes(image, points, radius)
    assert got.shape == (13 - 2 * math.ceil(radius), 17 - 2 * math.ceil(radius))
    np.testing.assert_array_equal(got, _loop_lbp(image, points, radius))


def test_lbp_hand_worked_on_a_linear_ramp():
    # g = 10 + 10 x + 30 y: bilinear interpolation is exact on it, so g_p ≥ g_c
    # ⇔ cos θ − 3 sin θ ≥ 0, true for θ = 0°, 225°, 270°, 315° → bits 0, 5, 6, 7
    ramp = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]])
    assert lbp_codes(ramp, 8, 1.0).tolist() == [[1 + 32 + 64 + 128]]
    # a flat image: every neighbour equals the centre → all bits set
    assert (lbp_codes(np.full((5, 5), 9), 8, 1.0) == 255).all()
    assert (lbp_codes(np.full((5, 5), 9), 16, 2.0) == 2**16 - 1).all()


def _transitions(code: int, points: int) -> int:
    bits = [(code >> p) & 1 for p in range(points)]
    return sum(bits[p] != bits[(p + 1) % points] for p in range(points))


@pytest.mark.parametrize(("points", "uniform"), [(8, 58), (16, 242)])
def test_uniform_labels(points, uniform):
    labels = uniform_labels(points)
    ref_uniform = [c for c in range(1 << points) if _transitions(c, points) <= 2]
    assert len(ref_uniform) == uniform == points * (points - 1) + 2
    assert uniform_bins(points) == uniform + 1  # 59 and 243 bins, as in the paper
    for rank, code in enumerate(ref_uniform):
        assert labels[code] == rank
    assert labels[0b0101] == uniform  # 4 transitions: the non-uniform bin
    assert set(labels.tolist()) == set(range(uniform + 1))


def test_region_layout_of_the_paper():
    # 64×64 face → 62×62 LBP_{8,1} image → 3×3 regions of 30 px overlapping by 14 px
    side, starts = region_starts(62, 3, 14)
    assert (side, starts) == (30, [0, 16, 32])
    assert starts[1] - starts[0] == side - 14


def test_descriptor_is_833_normalised_histograms():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(80, 70)).astype(np.float32)
    d = MultiScaleLbp()
    v = d(gray)
    assert v.shape == (833,) and d.dim == 833
    assert v.sum() == pytest.approx(9 + 2)  # 9 regional + 2 global histograms, each sums to 1
    assert (v >= 0).all()
    # the first region's histogram counted directly from the codes
    import cv2

    small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
    labels = uniform_labels(8)[_loop_lbp(small, 8, 1.0)]
    first = np.bincount(labels[:30, :30].ravel(), minlength=59) / 900
    np.testing.assert_allclose(v[:59], first, atol=1e-15)


def test_face_region_and_features_of_crops():
    crop = np.zeros((200, 160, 3), np.uint8)
    crop[50:150, 40:120] = 255
    face = face_region(crop, PadInput().face_fraction)
    assert face.shape == (100, 80, 3) and (face == 255).all()
    feats = lbp_features([crop, crop[::-1]], LbpConfig(), PadInput())
    assert feats.shape == (2, 2 * 833)
    with pytest.raises(ValueError, match="wrap a single crop"):
        lbp_features(crop, LbpConfig(), PadInput())
    with pytest.raises(ValueError, match="uint8"):
        lbp_features([crop.astype(np.float32)], LbpConfig(), PadInput())


@pytest.mark.parametrize("C", [0.01, 1.0, 10.0])
def test_logistic_regression_matches_scikit_learn(C):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 20)) * rng.uniform(0.5, 5, size=20) + rng.normal(size=20)
    y = x[:, 0] - 0.3 * x[:, 3] + rng.normal(size=150) > 0.5  # unbalanced classes
    model = fit_logistic(x, y, C=C)
    np.testing.assert_allclose(model.mean, x.mean(0))
    np.testing.assert_allclose(model.scale, x.std(0))
    ref = LogisticRegression(C=C, class_weight="balanced", tol=1e-12, max_iter=100_000)
    ref.fit((x - x.mean(0)) / x.std(0), y)
    np.testing.assert_allclose(model.coef, ref.coef_[0], atol=2e-5 * max(1, C))
    assert model.intercept == pytest.approx(ref.intercept_[0], abs=2e-5 * max(1, C))
    np.testing.assert_allclose(model.proba(x), ref.predict_proba((x - x.mean(0)) / x.std(0))[:, 1],
                               atol=1e-5)
