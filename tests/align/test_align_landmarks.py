"""Landmark schemes → template correspondences; landmark files; CFP fiducials on real data."""

from __future__ import annotations

import numpy as np
import pytest

from facemetric.align import (
    ARCFACE_TEMPLATE,
    DLIB5_NOSE_BASE,
    FaceAligner,
    estimate_similarity,
    read_landmark_file,
    template_correspondences,
    transform_points,
)
from facemetric.align.landmarks import scheme_for_count
from facemetric.data.images import load_image

T = ARCFACE_TEMPLATE
RING = np.array([[-6, 0], [-3, -2], [3, -2], [6, 0], [3, 2], [-3, 2]], dtype=np.float64)


def fit_is_identity(points: np.ndarray, scheme: str) -> bool:
    src, dst = template_correspondences(points, scheme)
    return np.allclose(estimate_similarity(src, dst), np.hstack([np.eye(2), np.zeros((2, 1))]))


def test_arcface5_is_the_template_order():
    src, dst = template_correspondences(T * 2 + 5, "arcface5")
    np.testing.assert_array_equal(src, T * 2 + 5)
    np.testing.assert_array_equal(dst, T)


def test_dlib68_uses_eye_contour_means_nose_tip_and_mouth_corners():
    pts = np.random.default_rng(0).uniform(0, 112, size=(68, 2))  # unused points: noise
    pts[36:42] = T[0] + RING
    pts[42:48] = T[1] + RING
    pts[30], pts[48], pts[54] = T[2], T[3], T[4]
    src, _ = template_correspondences(pts, "dlib68")
    np.testing.assert_allclose(src, T)
    assert fit_is_identity(pts, "dlib68")


def test_dlib5_uses_eye_corner_midpoints_and_the_nose_base():
    pts = np.array(
        [
            T[1] + [8, 0],  # 0: image-right eye, outer corner
            T[1] - [8, 0],  # 1: image-right eye, inner corner
            T[0] - [8, 0],  # 2: image-left eye, outer corner
            T[0] + [8, 0],  # 3: image-left eye, inner corner
            DLIB5_NOSE_BASE,  # 4: nose base
        ]
    )
    src, dst = template_correspondences(pts, "dlib5")
    assert src.shape == dst.shape == (3, 2)
    assert fit_is_identity(pts, "dlib5")


def cfp_points_left_side() -> np.ndarray:
    """Synthetic CFP fiducials of a template face, annotated on its image-left half."""
    mouth_centre = T[3:5].mean(axis=0)
    pts = np.zeros((30, 2))
    pts[0:9] = np.linspace([20, 50], [56, 110], 9)  # jaw
    pts[9:12] = T[0] + [[-8, -10], [0, -12], [8, -10]]  # brow
    pts[12:18] = T[0] + RING  # eye contour
    pts[18:22] = np.linspace([56, 50], T[2], 4)  # nose ridge ending at the tip
    pts[22:25] = T[2] + [[0, 6], [-4, 5], [-7, 3]]  # nose base
    pts[25] = T[3]  # mouth corner
    pts[26:30] = mouth_centre + np.array([[0, -4], [0, -1], [0, 5], [0, 0]])  # lips, mean 0
    return pts


def test_cfp30_left_side_maps_onto_the_template():
    pts = cfp_points_left_side()
    src, dst = template_correspondences(pts, "cfp30")
    assert src.shape == (4, 2)
    np.testing.assert_allclose(dst[:3], T[[0, 2, 3]])
    assert fit_is_identity(pts, "cfp30")


def test_cfp30_right_side_uses_the_right_template_points():
    mirrored = cfp_points_left_side() * [-1, 1] + [200, 0]  # a face annotated on its right
    src, dst = template_correspondences(mirrored, "cfp30")
    np.testing.assert_allclose(dst[:3], T[[1, 2, 4]])
    m = estimate_similarity(src, dst)
    assert np.linalg.det(m[:, :2]) > 0  # a rotation, not the mirror
    residual = np.linalg.norm(transform_points(m, src) - dst, axis=1).max()
    assert residual < 1.5  # the template is nearly symmetric


@pytest.mark.parametrize(
    ("points", "scheme", "message"),
    [
        (np.zeros((5, 2)), "dlib7", "unknown landmark scheme"),
        (np.zeros((30, 2)), "dlib68", r"\(68, 2\)"),
        (np.full((5, 2), np.inf), "arcface5", "NaN or Inf"),
    ],
)
def test_bad_landmarks_raise(points, scheme, message):
    with pytest.raises(ValueError, match=message):
        template_correspondences(points, scheme)


def test_read_landmark_file_formats(tmp_path):
    path = tmp_path / "pts.txt"
    path.write_text("# a comment\n1.5,2\n\n3 4.25\n  -1e1 , 7 \n")
    np.testing.assert_allclose(read_landmark_file(path), [[1.5, 2], [3, 4.25], [-10, 7]])


@pytest.mark.parametrize(
    ("text", "message"), [("1,2\n3\n", ":2: expected"), ("1,2,3\n", ":1:"), ("\n", "no landmark")]
)
def test_read_landmark_file_errors(tmp_path, text, message):
    path = tmp_path / "pts.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_landmark_file(path)


def test_scheme_for_count():
    assert [scheme_for_count(n) for n in (5, 30, 68)] == ["arcface5", "cfp30", "dlib68"]
    with pytest.raises(ValueError, match="got 4"):
        scheme_for_count(4)


# --- real CFP fiducials -------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


CFP_FRONTAL = ["001/frontal/01", "017/frontal/03", "250/frontal/05"]


@pytest.mark.data
@pytest.mark.parametrize("rel", CFP_FRONTAL)
def test_cfp_frontal_fiducials_agree_with_dlib(cfp_root, aligner, rel):
    image_path = cfp_root / "Data" / "Images" / f"{rel}.jpg"
    fiducials = cfp_root / "Data" / "Fiducials" / f"{rel}.txt"
    points = read_landmark_file(fiducials)
    assert points.shape == (30, 2)
    assert points[12:18, 0].mean() < points[21, 0]  # frontal: the image-left half is annotated
    given = aligner.align_file(image_path, fiducials)
    assert given.status == "given_landmarks" and given.face.shape == (112, 112, 3)
    detected = aligner.align_file(image_path)
    assert detected.face is not None
    # dlib's own five points, warped by the fiducial-based transform, land near the template
    image = load_image(image_path)
    five, _ = template_correspondences(
        aligner.detector.landmarks_in_box(image, detected.box), "dlib68"
    )
    error = np.linalg.norm(transform_points(given.transform, five) - T, axis=1)
    assert error.mean() < 5.0 and error.max() < 9.0


@pytest.mark.data
def test_cfp_profile_aligns_from_fiducials_on_the_visible_side(cfp_root, aligner):
    rel = "001/profile/02"  # faces image-left: the visible eye is right of the nose tip
    fiducials = cfp_root / "Data" / "Fiducials" / f"{rel}.txt"
    result = aligner.align_file(cfp_root / "Data" / "Images" / f"{rel}.jpg", fiducials)
    assert result.status == "given_landmarks"
    src, dst = template_correspondences(read_landmark_file(fiducials), "cfp30")
    np.testing.assert_allclose(dst[0], T[1])  # matched to the template's right eye
    warped = transform_points(result.transform, src)
    assert np.linalg.norm(warped - dst, axis=1).max() < 6.0
    assert result.face[:, 56:].mean() > result.face[:, :20].mean()  # face on the right, pad left
