"""Similarity estimation and the warp, on synthetic points and images."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from facemetric.align import (
    ARCFACE_TEMPLATE,
    centre_crop,
    estimate_similarity,
    transform_points,
    warp_affine,
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent reference: solve x' = a·x − b·y + tx, y' = b·x + a·y + ty by lstsq."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize(
    ("scale", "angle", "tx", "ty"),
    [(1.0, 0.0, 0.0, 0.0), (0.37, 23.0, -12.5, 40.0), (2.5, -170.0, 300.0, -7.0)],
)
def test_recovers_a_known_transform_exactly(scale, angle, tx, ty):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 250, size=(5, 2))
    truth = similarity(scale, angle, tx, ty)
    dst = transform_points(truth, src)
    fitted = estimate_similarity(src, dst)
    np.testing.assert_allclose(fitted, truth, atol=1e-9)
    got_scale = math.sqrt(np.linalg.det(fitted[:, :2]))
    got_angle = math.degrees(math.atan2(fitted[1, 0], fitted[0, 0]))
    assert got_scale == pytest.approx(scale, abs=1e-12)
    assert got_angle == pytest.approx(angle, abs=1e-9)


def test_two_points_determine_the_transform():
    truth = similarity(1.7, 40.0, 5.0, -3.0)
    src = np.array([[10.0, 20.0], [60.0, 25.0]])
    np.testing.assert_allclose(estimate_similarity(src, transform_points(truth, src)), truth)


def test_noisy_points_match_the_linear_least_squares_solution():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 200, size=(7, 2))
    dst = transform_points(similarity(0.5, -12.0, 20.0, 30.0), src) + rng.normal(0, 2, (7, 2))
    np.testing.assert_allclose(estimate_similarity(src, dst), lstsq_similarity(src, dst), atol=1e-9)


def test_never_returns_a_reflection():
    src = ARCFACE_TEMPLATE.copy()
    mirrored = src * np.array([-1.0, 1.0])  # only a reflection would fit exactly
    fitted = estimate_similarity(src, mirrored)
    assert np.linalg.det(fitted[:, :2]) > 0


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        (np.zeros((1, 2)), np.zeros((1, 2)), "at least 2"),
        (np.zeros((3, 2)), np.zeros((4, 2)), "differ in shape"),
        (np.zeros((3, 3)), np.zeros((3, 3)), r"\(n, 2\)"),
        (np.ones((3, 2)), np.zeros((3, 2)), "coincide"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros((2, 2)), "NaN"),
    ],
)
def test_bad_points_raise(src, dst, message):
    with pytest.raises(ValueError, match=message):
        estimate_similarity(src, dst)


def draw_dots(shape: tuple[int, int], points: np.ndarray, radius: float) -> np.ndarray:
    """Grey image with white anti-aliased discs centred exactly on (sub-pixel) points."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w), np.float64)
    for x, y in points:
        d = np.hypot(xx - x, yy - y)
        img = np.maximum(img, np.clip(radius + 0.5 - d, 0, 1))
    return np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def dot_centroids(image: np.ndarray, near: np.ndarray, window: int = 6) -> np.ndarray:
    grey = image[..., 0].astype(np.float64)
    out = []
    for x, y in near:
        x0, y0 = round(x) - window, round(y) - window
        patch = grey[y0 : y0 + 2 * window + 1, x0 : x0 + 2 * window + 1]
        yy, xx = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]]
        out.append([(xx * patch).sum() / patch.sum() + x0, (yy * patch).sum() / patch.sum() + y0])
    return np.array(out)


@pytest.mark.parametrize(("scale", "size"), [(1.2, 200), (2.2, 300), (14.0, 1800)])
def test_warp_lands_known_points_on_the_template(scale, size):
    # Place the template's points in a larger image by a known similarity, draw dots there,
    # fit the transform back from the points and warp: the dots must land on the template.
    # 1.2: one bilinear warp; 2.2 and 14: area pre-shrink first (warp scale below 0.75).
    to_image = similarity(scale, 17.0, size * 0.3, size * 0.1)
    points = transform_points(to_image, ARCFACE_TEMPLATE)
    image = draw_dots((size, size), points, radius=1.2 * scale)
    matrix = estimate_similarity(points, ARCFACE_TEMPLATE)
    face = warp_affine(image, matrix)
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    found = dot_centroids(face, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(found, ARCFACE_TEMPLATE, atol=0.3)


def test_warp_accepts_grey_and_refuses_bad_images():
    grey = np.full((50, 60), 200, np.uint8)
    face = warp_affine(grey, similarity(1.0, 0.0, 0.0, 0.0))
    assert face.shape == (112, 112, 3)
    assert (face[:50, :60] == 200).all() and (face[60:, 70:] == 0).all()  # black outside
    with pytest.raises(ValueError, match="uint8"):
        warp_affine(grey.astype(np.float32), similarity(1.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        warp_affine(grey, np.eye(3))


def test_warp_matches_cv2_for_a_plain_transform():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(120, 130, 3), dtype=np.uint8)
    m = similarity(0.9, 5.0, 3.0, -2.0)  # above the pre-shrink threshold: one warpAffine
    np.testing.assert_array_equal(warp_affine(image, m), cv2.warpAffine(image, m, (112, 112)))


def test_centre_crop_takes_the_central_square():
    image = np.zeros((200, 300, 3), np.uint8)
    image[50:150, 100:200] = 255  # the central 100×100 square
    full = centre_crop(image, fraction=0.5)
    assert full.shape == (112, 112, 3) and (full == 255).all()
    whole = centre_crop(image, fraction=1.0)  # central 200×200: white in its middle half
    assert whole[56, 56, 0] == 255 and whole[5, 5, 0] == 0
    with pytest.raises(ValueError, match="fraction"):
        centre_crop(image, fraction=0.0)
