"""Degradations against independent computations: float64 loops, scipy, PIL, geometry."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from facemetric.align.warp import ARCFACE_TEMPLATE
from facemetric.data.degradations import (
    DEFAULT_SEVERITIES,
    Blur,
    Brightness,
    Contrast,
    Downscale,
    FaceGeometry,
    Gamma,
    Jpeg,
    Mask,
    Patches,
    Rotation,
    Sunglasses,
    make_degradation,
    rotate_about,
)


def _face(scale: float = 2.0, offset: tuple[float, float] = (10.0, 20.0)) -> FaceGeometry:
    """The ArcFace template face magnified ``scale`` times and shifted: its 112 px crop spans
    ``112·scale`` photo pixels."""
    return FaceGeometry(ARCFACE_TEMPLATE * scale + np.array(offset), 112.0 * scale)


def _photo(h: int = 260, w: int = 250, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int = 260, w: int = 250) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([127 + 100 * np.sin(x / 9), 127 + 90 * np.cos(y / 13),
                    127 + 60 * np.sin((x - y) / 17)], axis=-1)
    return np.rint(img).astype(np.uint8)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_downscale_to_half_the_crop_is_a_2x2_block_average_of_a_checkerboard():
    # A one-pixel checkerboard has no detail left at half resolution: every 2×2 block
    # averages to the mid grey, so the whole output is that grey.
    y, x = np.mgrid[0:224, 0:224]
    board = np.where((x + y) % 2 == 0, 200, 40).astype(np.uint8)
    img = np.repeat(board[:, :, None], 3, axis=2)
    face = _face(scale=2.0)  # the crop spans 224 px
    out = Downscale(112)(img, face, _rng())  # 224 → 112: factor 1/2
    assert out.shape == img.shape
    assert np.all(np.abs(out.astype(int) - 120) <= 1)
    # face_px at or above the crop side changes nothing
    np.testing.assert_array_equal(Downscale(224)(img, face, _rng()), img)
    np.testing.assert_array_equal(Downscale(500)(img, face, _rng()), img)


@pytest.mark.parametrize(("face_px", "period"), [(56, 8), (28, 16), (14, 32)])
def test_downscale_keeps_slow_patterns_and_removes_faster_ones(face_px, period):
    # On a 448 px crop (scale 4), face_px pixels of detail keep a sine of period 8·448/face_px
    # well and wipe one of a period below the new pixel pitch (448/face_px photo pixels).
    side = 448
    face = _face(scale=4.0)
    x = np.arange(side, dtype=np.float64)
    pitch = side / face_px
    slow = 127 + 100 * np.sin(2 * np.pi * x / (8 * pitch))
    fast = 127 + 100 * np.sin(2 * np.pi * x / (pitch * 0.5))
    for wave, keep in ((slow, True), (fast, False)):
        img = np.repeat(np.repeat(np.rint(wave)[None, :, None], side, 0), 3, 2).astype(np.uint8)
        out = Downscale(face_px)(img, face, _rng()).astype(np.float64)[side // 2, :, 0]
        inner = slice(int(2 * pitch), side - int(2 * pitch))
        err = np.abs(out[inner] - wave[inner]).max()
        spread = out[inner].max() - out[inner].min()
        if keep:
            assert err < 25
        else:
            assert spread < 40  # amplitude 200 reduced to almost nothing
    assert period > 0


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_blur_matches_scipy_gaussian_filter_in_crop_pixels(sigma):
    img = _photo(90, 80)
    face = _face(scale=1.5)  # σ in the photo = 1.5·σ
    out = Blur(sigma)(img, face, _rng())
    s = sigma * 1.5
    want = np.stack([ndimage.gaussian_filter(img[:, :, c].astype(np.float64), s,
                                             mode="mirror", truncate=4.0)
                     for c in range(3)], axis=-1)
    assert np.abs(out.astype(np.float64) - want).max() <= 0.5 + 1e-3  # rounding only


def test_jpeg_is_pil_round_trip_deterministic_and_worse_at_lower_quality():
    img = _smooth(120, 100)
    face = _face(1.0)
    out = Jpeg(30)(img, face, _rng(0))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=30)
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(Jpeg(30)(img, face, _rng(5)), out)
    errors = [np.abs(Jpeg(q)(img, face, _rng()).astype(int) - img).mean() for q in (90, 30, 5)]
    assert errors[0] < errors[1] < errors[2]


def test_photometric_degradations_against_float64_loops():
    img = _photo(6, 5)
    face = _face(0.05, (0.0, 0.0))
    x = img.astype(np.float64)
    b = Brightness(0.3)(img, face, _rng())
    c = Contrast(0.4)(img, face, _rng())
    g = Gamma(2.2)(img, face, _rng())
    mean = sum(0.299 * x[i, j, 0] + 0.587 * x[i, j, 1] + 0.114 * x[i, j, 2]
               for i in range(6) for j in range(5)) / 30
    for i in range(6):
        for j in range(5):
            for k in range(3):
                v = x[i, j, k]
                assert b[i, j, k] == min(255, max(0, round(0.3 * v)))
                assert c[i, j, k] == min(255, max(0, round(mean + 0.4 * (v - mean))))
                assert g[i, j, k] == round(255 * (v / 255) ** 2.2)


def _painted(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=2)


def test_sunglasses_cover_the_template_eyes_and_only_a_band_around_them():
    img = np.full((300, 300, 3), 128, dtype=np.uint8)
    face = _face(2.0)
    out = Sunglasses(0.5)(img, face, _rng())
    mask = _painted(img, out)
    eyes = ARCFACE_TEMPLATE[:2] * 2 + np.array([10.0, 20.0])
    d = float(np.linalg.norm(eyes[1] - eyes[0]))  # 2 × 35.2 px
    cx, cy = eyes.mean(axis=0)
    for ex, ey in eyes:
        assert mask[round(ey), round(ex)]
    for i in range(300):
        for j in range(300):
            inside = (cx - d <= j + 0.5 < cx + d) and (cy - 0.25 * d <= i + 0.5 < cy + 0.25 * d)
            assert mask[i, j] == inside
    assert (out[mask] == 0).all()
    mouth = ARCFACE_TEMPLATE[3:] * 2 + np.array([10.0, 20.0])
    assert not mask[int(mouth[0, 1]), int(mouth[0, 0])]


@pytest.mark.parametrize("cover", [0.25, 0.5, 0.75])
def test_mask_covers_the_mouth_and_rises_to_its_level_never_to_the_eyes(cover):
    img = np.full((300, 300, 3), 30, dtype=np.uint8)
    face = _face(2.0)
    out = Mask(cover)(img, face, _rng())
    painted = _painted(img, out)
    pts = ARCFACE_TEMPLATE * 2 + np.array([10.0, 20.0])
    for x, y in pts[3:]:
        assert painted[round(y), round(x)]
    for x, y in pts[:2]:
        assert not painted[round(y), round(x)]
    rows = np.flatnonzero(painted.any(axis=1))
    eye_y, mouth_y = pts[:2, 1].mean(), pts[3:, 1].mean()
    assert abs(rows[0] + 0.5 - (mouth_y - cover * (mouth_y - eye_y))) <= 1.0
    # the nose tip (halfway up in the template) is covered exactly when cover > ~0.5
    nose = pts[2]
    assert painted[round(nose[1]), round(nose[0])] == (cover > 0.55)


def test_patches_are_seeded_inside_the_face_box_and_cover_about_the_fraction():
    img = np.full((300, 300, 3), 255, dtype=np.uint8)
    face = _face(2.0)
    a = Patches(0.2)(img, face, _rng(3))
    np.testing.assert_array_equal(Patches(0.2)(img, face, _rng(3)), a)
    assert not np.array_equal(Patches(0.2)(img, face, _rng(4)), a)
    painted = _painted(img, a)
    left, top, right, bottom = face.box()
    ys, xs = np.nonzero(painted)
    assert xs.min() + 0.5 >= left - 1 and xs.max() + 0.5 <= right + 1
    assert ys.min() + 0.5 >= top - 1 and ys.max() + 0.5 <= bottom + 1
    box_area = (right - left) * (bottom - top)
    covered = painted.sum() / box_area
    assert 0.1 < covered <= 0.23  # overlaps can only lower the covered share


def test_rotate_about_moves_a_dot_a_quarter_turn_counter_clockwise():
    img = np.zeros((101, 101, 3), dtype=np.uint8)
    img[50, 80] = 255  # 30 px right of the centre (50, 50)
    out = rotate_about(img, (50.0, 50.0), 90.0)
    y, x = np.unravel_index(np.argmax(out[:, :, 0]), out.shape[:2])
    assert (x, y) == (50, 20)  # counter-clockwise as displayed: right → up
    face = FaceGeometry(np.array([[40.0, 45], [60, 45], [50, 50], [42, 55], [58, 55]]), 60.0)
    outs = {tuple(np.unravel_index(np.argmax(Rotation(90)(img, face, _rng(s))[:, :, 0]),
                                   (101, 101))) for s in range(20)}
    assert outs == {(20, 50), (80, 50)}  # (row, col): either sign, from the seed
    # a 30° turn moves the dot by 2·30·sin(15°)
    one = rotate_about(img, (50.0, 50.0), 30.0)[:, :, 0].astype(np.float64)
    ys, xs = np.mgrid[0:101, 0:101]
    cx, cy = (one * xs).sum() / one.sum(), (one * ys).sum() / one.sum()
    assert math.hypot(cx - 80, cy - 50) == pytest.approx(2 * 30 * math.sin(math.radians(15)),
                                                         abs=0.2)


@pytest.mark.parametrize("name", sorted(DEFAULT_SEVERITIES))
def test_every_degradation_is_deterministic_for_a_seed_and_keeps_shape(name):
    img = _smooth(240, 230)
    face = _face(1.8, (15.0, 10.0))
    for severity in DEFAULT_SEVERITIES[name]:
        deg = make_degradation(name, severity)
        a = deg(img, face, _rng(7))
        b = deg(img, face, _rng(7))
        assert a.shape == img.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, img)
        assert deg.severity == pytest.approx(severity)


@pytest.mark.parametrize(("name", "severity", "pattern"), [
    ("downscale", 1, "face_px must be >= 2"),
    ("blur", 0, "sigma must be > 0"),
    ("jpeg", 0, "quality must be an integer in"),
    ("jpeg", 100, "quality must be an integer in"),
    ("jpeg", 7.5, "quality must be an integer"),
    ("brightness", -0.5, "factor must be > 0"),
    ("contrast", -1, "factor must be >= 0"),
    ("gamma", 0, "gamma must be > 0"),
    ("sunglasses", 0, "height must be > 0"),
    ("mask", 1.5, "cover must be in"),
    ("patches", 0, "fraction must be in"),
    ("rotation", 0, "degrees must be in"),
    ("rotation", float("nan"), "degrees must be in"),
    ("fog", 1, "unknown degradation 'fog'"),
])
def test_bad_severities_are_refused(name, severity, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_degradation(name, severity)


def test_face_geometry_is_checked():
    with pytest.raises(ValueError, match="five finite"):
        FaceGeometry(np.zeros((4, 2)), 10.0)
    with pytest.raises(ValueError, match="width must be > 0"):
        FaceGeometry(ARCFACE_TEMPLATE.copy(), 0.0)
    with pytest.raises(ValueError, match="expected a uint8 image"):
        Brightness(0.5)(np.zeros((4, 4, 3)), _face(), _rng())
