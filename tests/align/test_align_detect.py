"""Detection + landmarks + warp on real LFW images, composites, blanks and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facemetric.align import (
    ARCFACE_TEMPLATE,
    AlignStatus,
    FaceAligner,
    FaceDetector,
    model_file,
    template_correspondences,
    transform_points,
)
from facemetric.data.images import load_image

LFW_IMAGES = [
    "AJ_Cook/AJ_Cook_0001.jpg",
    "Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
    "Serena_Williams/Serena_Williams_0001.jpg",
    "Colin_Powell/Colin_Powell_0001.jpg",
]


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()  # HOG, 68-point landmarks, no fallback


@pytest.fixture(scope="module")
def aligner5() -> FaceAligner:
    return FaceAligner(landmarks="dlib5", fallback=True, fallback_crop=0.5)


def lfw(root: Path, rel: str) -> Path:
    return root / "lfw-deepfunneled" / rel


def output_box(matrix: np.ndarray, box: tuple[int, int, int, int]) -> tuple[int, ...]:
    left, top, right, bottom = box
    corners = np.array([[left, top], [right, top], [left, bottom], [right, bottom]], float)
    warped = transform_points(matrix, corners)
    return tuple(round(v) for v in (*warped.min(axis=0), *warped.max(axis=0)))


@pytest.mark.data
@pytest.mark.parametrize("rel", LFW_IMAGES)
def test_lfw_face_lands_on_the_template(lfw_root, aligner, rel):
    result = aligner.align_file(lfw(lfw_root, rel))
    assert result.status == AlignStatus.OK, result.reason
    assert result.num_faces == 1
    assert result.face.shape == (112, 112, 3) and result.face.dtype == np.uint8
    assert result.residual < 6.0
    # Re-detect landmarks on the aligned face (in the warped detection box): its five points
    # must lie within a few pixels of the template.
    points = aligner.detector.landmarks_in_box(
        result.face, output_box(result.transform, result.box)
    )
    five, _ = template_correspondences(points, "dlib68")
    error = np.linalg.norm(five - ARCFACE_TEMPLATE, axis=1)
    assert error.mean() < 5.0 and error.max() < 8.0, error


@pytest.mark.data
def test_dlib5_point_order(lfw_root, aligner5):
    image = load_image(lfw(lfw_root, LFW_IMAGES[1]))
    (face,) = aligner5.detector.detect(image)
    assert face.scheme == "dlib5"
    pts = face.landmarks
    assert pts.shape == (5, 2)
    assert pts[0, 0] > pts[1, 0] > pts[3, 0] > pts[2, 0]  # right eye outer, inner; left...
    assert pts[4, 1] > pts[:4, 1].max()  # the nose base lies below the eyes
    result = aligner5.align(image)
    assert result.status == AlignStatus.OK and result.face.shape == (112, 112, 3)


@pytest.mark.data
def test_cnn_detector_finds_the_face(lfw_root):
    result = FaceAligner(detector="cnn", landmarks="dlib5").align_file(lfw(lfw_root, LFW_IMAGES[3]))
    assert result.status == AlignStatus.OK and result.residual < 6.0
    left, top, right, bottom = result.box
    assert 60 < (left + right) / 2 < 190 and 60 < (top + bottom) / 2 < 190


def centre_patch(path: Path, side: int = 150) -> np.ndarray:
    image = load_image(path)
    top = (image.shape[0] - side) // 2
    left = (image.shape[1] - side) // 2
    return image[top : top + side, left : left + side]


@pytest.mark.data
@pytest.mark.parametrize("centred", [0, 1])
def test_two_faces_pick_the_one_nearest_the_centre(lfw_root, aligner, centred):
    a, b = (centre_patch(lfw(lfw_root, rel)) for rel in LFW_IMAGES[:2])
    canvas = np.full((190, 600, 3), 90, np.uint8)
    middle, side = (a, b) if centred == 0 else (b, a)
    canvas[20:170, 225:375] = middle  # centred
    canvas[20:170, 10:160] = side  # off to the left
    result = aligner.align(canvas)
    assert result.status == AlignStatus.MULTIPLE_FACES_PICKED_CENTRE
    assert result.num_faces == 2
    assert "nearest the image centre" in result.reason
    left, _, right, _ = result.box
    assert 225 <= (left + right) / 2 <= 375
    # the chosen face is the centred person: same output as aligning that patch alone
    alone = aligner.align(middle)
    assert alone.status == AlignStatus.OK
    diff = np.abs(result.face.astype(int) - alone.face.astype(int)).mean()
    assert diff < 8.0


def test_blank_image_is_no_face_or_a_fallback_crop(aligner, aligner5):
    grey = np.full((250, 250, 3), 128, np.uint8)
    result = aligner.align(grey)
    assert result.status == AlignStatus.NO_FACE and result.face is None
    assert "no face detected" in result.reason
    fallback = aligner5.align(grey)
    assert fallback.status == AlignStatus.FALLBACK_CENTRE_CROP
    assert fallback.face.shape == (112, 112, 3) and (fallback.face == 128).all()
    assert "centre crop" in fallback.reason and fallback.transform is None


def test_corrupt_truncated_and_missing_files_are_load_errors(tmp_path, aligner):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    result = aligner.align_file(garbage)
    assert result.status == AlignStatus.LOAD_ERROR and result.face is None
    assert result.reason.startswith("ImageLoadError") and "not an image file" in result.reason
    assert str(garbage) in result.reason
    header_only = tmp_path / "header_only.jpg"
    header_only.write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then nothing")
    result = aligner.align_file(header_only)
    assert result.status == AlignStatus.LOAD_ERROR and "truncated" in result.reason
    missing = aligner.align_file(tmp_path / "missing.jpg")
    assert missing.status == AlignStatus.LOAD_ERROR and "No such file" in missing.reason


@pytest.mark.data
def test_truncated_jpeg_is_a_load_error(lfw_root, tmp_path, aligner):
    data = lfw(lfw_root, LFW_IMAGES[0]).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 3])
    result = aligner.align_file(cut)
    assert result.status == AlignStatus.LOAD_ERROR and "truncated" in result.reason


def test_bad_landmark_file_is_a_load_error(tmp_path, aligner):
    image = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    points = tmp_path / "face.txt"
    points.write_text("1,2\n3,4\n")
    result = aligner.align_file(image, points)
    assert result.status == AlignStatus.LOAD_ERROR and "got 2" in result.reason


def test_given_template_points_give_the_identity_warp(aligner):
    image = np.random.default_rng(0).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    result = aligner.align(image, landmarks=ARCFACE_TEMPLATE)
    assert result.status == AlignStatus.GIVEN_LANDMARKS
    np.testing.assert_array_equal(result.face, image)
    assert result.residual == pytest.approx(0.0, abs=1e-9)


def test_model_files_and_settings():
    assert model_file("shape_predictor_5_face_landmarks.dat").is_file()
    with pytest.raises(ImportError, match=r"facemetric\[detect\]"):
        model_file("no_such_model.dat")
    with pytest.raises(ValueError, match="unknown detector"):
        FaceAligner(detector="mtcnn")
    with pytest.raises(ValueError, match="unknown landmark model"):
        FaceDetector(landmarks="dlib194")
    with pytest.raises(ValueError, match="upsample"):
        FaceAligner(upsample=-1)
    with pytest.raises(ValueError, match="fallback_crop"):
        FaceAligner(fallback_crop=1.5)
