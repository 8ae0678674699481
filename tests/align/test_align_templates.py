"""warp_to_template: the ArcFace crop FaceAligner makes, and dlib's own 150×150 chip."""

from __future__ import annotations

from pathlib import Path

import dlib
import numpy as np
import pytest

from facemetric.align import FaceAligner, FaceDetector, model_file, warp_to_template
from facemetric.align.templates import TEMPLATE_SIZES
from facemetric.data.images import load_image
from facemetric.inference.contract import TEMPLATES

LFW_IMAGES = [
    "AJ_Cook/AJ_Cook_0001.jpg",
    "Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
    "Serena_Williams/Serena_Williams_0001.jpg",
    "Colin_Powell/Colin_Powell_0001.jpg",
]


@pytest.fixture(scope="module")
def dlib_models() -> dict[str, object]:
    """dlib's own detector and predictors, loaded here (not through facemetric)."""
    return {
        "hog": dlib.get_frontal_face_detector(),
        "dlib5": dlib.shape_predictor(str(model_file("shape_predictor_5_face_landmarks.dat"))),
        "dlib68": dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat"))),
    }


def _eye_centres(chip: np.ndarray, models: dict) -> tuple[np.ndarray, np.ndarray]:
    """Eye centres (means of the iBUG eye contours) re-detected on a chip by dlib."""
    rects = models["hog"](chip, 1)
    assert len(rects) == 1
    shape = models["dlib68"](chip, rects[0])
    pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return pts[36:42].mean(axis=0), pts[42:48].mean(axis=0)


def test_template_sizes_match_the_model_contract():
    assert TEMPLATE_SIZES == TEMPLATES


@pytest.mark.data
@pytest.mark.parametrize("rel", LFW_IMAGES)
@pytest.mark.parametrize("landmarks", ["dlib68", "dlib5"])
def test_arcface112_is_what_face_aligner_outputs(lfw_root: Path, rel, landmarks):
    image = load_image(lfw_root / "lfw-deepfunneled" / rel)
    aligner = FaceAligner(landmarks=landmarks)
    expected = aligner.align(image)
    face = aligner.detector.detect(image)[0]
    assert face.scheme == landmarks
    crop = warp_to_template(image, face.landmarks, face.scheme, "arcface112")
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8 and crop.flags.c_contiguous
    np.testing.assert_array_equal(crop, expected.face)


@pytest.mark.data
@pytest.mark.parametrize("rel", LFW_IMAGES)
@pytest.mark.parametrize("landmarks", ["dlib68", "dlib5"])
def test_dlib150_is_dlibs_own_chip(lfw_root: Path, dlib_models, rel, landmarks):
    image = load_image(lfw_root / "lfw-deepfunneled" / rel)
    face = FaceDetector(landmarks=landmarks).detect(image)[0]
    chip = warp_to_template(image, face.landmarks, face.scheme, "dlib150")
    # dlib's own pipeline: its predictor in the same box, its own chip extraction
    shape = dlib_models[landmarks](image, dlib.rectangle(*face.box))
    reference = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8 and chip.flags.c_contiguous
    np.testing.assert_array_equal(chip, reference)


@pytest.mark.data
@pytest.mark.parametrize("rel", LFW_IMAGES)
def test_dlib150_chip_geometry(lfw_root: Path, dlib_models, rel):
    """On the chip, re-detected eyes sit level, centred, about a third of the chip apart;
    the 5- and 68-point chips of one face put them within a few pixels of each other."""
    image = load_image(lfw_root / "lfw-deepfunneled" / rel)
    eyes = {}
    for landmarks in ("dlib68", "dlib5"):
        face = FaceDetector(landmarks=landmarks).detect(image)[0]
        chip = warp_to_template(image, face.landmarks, landmarks, "dlib150")
        left, right = _eye_centres(chip, dlib_models)
        mid = (left + right) / 2
        assert abs(mid[0] - 75) < 6, mid  # centred horizontally on the 150 px chip
        assert 38 < mid[1] < 54, mid
        assert abs(left[1] - right[1]) < 6  # no roll left
        assert 44 < right[0] - left[0] < 62  # interocular distance ≈ 0.35 of the chip
        eyes[landmarks] = np.stack([left, right])
    assert np.abs(eyes["dlib68"] - eyes["dlib5"]).max() < 5


def test_dlib150_with_float_points_on_a_synthetic_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 180, 3), dtype=np.uint8)
    # dlib5 order: image-right eye outer/inner, image-left eye outer/inner, nose base
    points = np.array([[120.2, 80.4], [105.0, 81.0], [70.0, 80.6], [55.3, 80.0], [88.0, 110.0]])
    chip = warp_to_template(image, points, "dlib5", "dlib150")
    again = warp_to_template(image, np.rint(points), "dlib5", "dlib150")
    assert chip.shape == (150, 150, 3)
    np.testing.assert_array_equal(chip, again)  # points are rounded to dlib's integer pixels
    grey = warp_to_template(image[..., 0], points, "dlib5", "dlib150")
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])  # grey in, grey RGB out


@pytest.mark.parametrize(
    ("points", "scheme", "template", "match"),
    [
        (np.zeros((5, 2)), "dlib5", "vggface", "unknown alignment template"),
        (np.zeros((5, 2)), "arcface5", "dlib150", "needs dlib's own landmarks"),
        (np.zeros((30, 2)), "cfp30", "dlib150", "needs dlib's own landmarks"),
        (np.zeros((68, 2)), "dlib5", "dlib150", r"must have shape \(5, 2\)"),
        (np.full((5, 2), np.nan), "dlib5", "dlib150", "NaN"),
        (np.zeros((5, 2)), "dlib68", "arcface112", r"must have shape \(68, 2\)"),
    ],
)
def test_bad_arguments_say_what_is_wrong(points, scheme, template, match):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=match):
        warp_to_template(image, points, scheme, template)


def test_bad_image_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        warp_to_template(np.zeros((64, 64, 3)), np.zeros((5, 2)), "arcface5", "arcface112")
