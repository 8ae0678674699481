"""DlibEncoder on our dlib150 chips reproduces dlib's own face descriptor on LFW."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import dlib
import numpy as np
import pytest

from facemetric.align import FaceDetector, model_file, warp_to_template
from facemetric.data.images import load_image
from facemetric.evaluation import read_lfw_pairs
from facemetric.inference import load_model
from facemetric.inference.dlib import MODEL_FILE, DlibEncoder


@pytest.fixture(scope="module")
def dlib_net() -> dlib.face_recognition_model_v1:
    """dlib's descriptor network, loaded directly (the reference)."""
    return dlib.face_recognition_model_v1(str(model_file(MODEL_FILE)))


@pytest.fixture(scope="module", params=["torch", "dlib"])
def encoder(request) -> DlibEncoder:
    """Both engines: the torch port (the default) and dlib's own network."""
    return DlibEncoder(engine=request.param)


@pytest.fixture(scope="module")
def lfw_pair_images(lfw_root: Path) -> dict[str, tuple[Path, Path]]:
    """The first matched and the first mismatched pair of View 1's DevTest."""
    pairs = read_lfw_pairs(lfw_root / "pairsDevTest.txt", lfw_root / "lfw-deepfunneled")
    same = int(np.flatnonzero(pairs.is_same)[0])
    diff = int(np.flatnonzero(~pairs.is_same)[0])
    return {
        "genuine": (pairs.path_a[same], pairs.path_b[same]),
        "impostor": (pairs.path_a[diff], pairs.path_b[diff]),
    }


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_contract():
    enc = DlibEncoder()
    c = enc.contract
    assert (c.backbone, c.template, c.input_size, c.embedding_size, c.source) == (
        "dlib_resnet_v1", "dlib150", 150, 128, "dlib")
    assert c.flip_test is False
    expected = hashlib.sha256(model_file(MODEL_FILE).read_bytes()).hexdigest()
    assert c.weights_sha256 == expected
    assert DlibEncoder(flip_test=True).contract.fingerprint() != c.fingerprint()


def test_load_model_dlib():
    enc = load_model("dlib")
    assert isinstance(enc, DlibEncoder) and not enc.contract.flip_test
    assert enc.thresholds is None
    assert load_model("dlib", flip_test=True).contract.flip_test


def test_engines_agree_and_share_the_fingerprint():
    torch_enc, dlib_enc = DlibEncoder(), DlibEncoder(engine="dlib")
    assert torch_enc.engine == "torch" and torch_enc.contract.extra["engine"] == "torch"
    assert torch_enc.contract.fingerprint() == dlib_enc.contract.fingerprint()
    rng = np.random.default_rng(3)
    chips = cv2.resize(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), (150, 150))
    chips = np.stack([chips, chips[::-1].copy()])
    assert np.abs(torch_enc.embed_faces(chips) - dlib_enc.embed_faces(chips)).max() < 1e-5
    with pytest.raises(ValueError, match="engine must be one of"):
        DlibEncoder(engine="onnx")


def test_missing_model_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dlib descriptor model file"):
        DlibEncoder(model_path=tmp_path / "nope.dat")


@pytest.mark.data
@pytest.mark.parametrize("landmarks", ["dlib5", "dlib68"])
def test_descriptors_match_dlibs_own(lfw_pair_images, encoder, dlib_net, landmarks):
    detector = FaceDetector(landmarks=landmarks)
    predictor = dlib.shape_predictor(str(model_file(
        "shape_predictor_5_face_landmarks.dat" if landmarks == "dlib5"
        else "shape_predictor_68_face_landmarks.dat")))
    paths = [*lfw_pair_images["genuine"], *lfw_pair_images["impostor"]]
    chips, reference = [], []
    for path in paths:
        image = load_image(path)
        face = detector.detect(image)[0]
        chips.append(warp_to_template(image, face.landmarks, face.scheme, "dlib150"))
        # dlib's documented pipeline: shape in the detection box, descriptor of the image
        shape = predictor(image, dlib.rectangle(*face.box))
        reference.append(np.asarray(dlib_net.compute_face_descriptor(image, shape)))
    ours = encoder.embed_faces(chips, batch_size=3)
    assert ours.shape == (4, 128) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * _unit(np.stack(reference))).sum(axis=1)
    assert cos.min() > 0.999, cos
    # dlib's raw descriptors are not unit vectors (norms ≈ 1.3–1.45 on these faces): the
    # encoder's normalisation is what makes its rows comparable by cosine
    norms = np.linalg.norm(reference, axis=1)
    assert (norms > 1.1).all() and (norms < 1.8).all(), norms
    # a genuine pair scores higher than an impostor pair; in dlib's own terms the genuine
    # pair is within its 0.6 distance threshold and the impostor pair is not
    genuine, impostor = float(ours[0] @ ours[1]), float(ours[2] @ ours[3])
    assert genuine > impostor
    assert np.linalg.norm(reference[0] - reference[1]) < 0.6
    assert np.linalg.norm(reference[2] - reference[3]) > 0.6
    # cosine of unit vectors is the monotone function 1 − d²/2 of their Euclidean distance
    unit_ref = _unit(np.stack(reference))
    d = np.linalg.norm(unit_ref[0] - unit_ref[1])
    assert genuine == pytest.approx(1 - d**2 / 2, abs=2e-3)


@pytest.mark.data
def test_other_chip_sizes_are_resized_and_flip_test(lfw_pair_images, encoder, dlib_net):
    image = load_image(lfw_pair_images["genuine"][0])
    face = FaceDetector(landmarks="dlib5").detect(image)[0]
    chip = warp_to_template(image, face.landmarks, "dlib5", "dlib150")
    base = encoder.embed_faces(chip[None])
    # a 2× upscaled chip is shrunk back to 150 (area): nearly the same descriptor
    big = cv2.resize(chip, (300, 300), interpolation=cv2.INTER_LINEAR)
    assert float(encoder.embed_faces(big)[0] @ base[0]) > 0.99
    # flip test: normalise(d(x) + d(mirror(x))), with dlib's own descriptors
    flipped = DlibEncoder(flip_test=True, engine=encoder.engine).embed_faces(chip[None])[0]
    d_x = np.asarray(dlib_net.compute_face_descriptor(chip))
    d_m = np.asarray(dlib_net.compute_face_descriptor(np.ascontiguousarray(chip[:, ::-1])))
    np.testing.assert_allclose(flipped, _unit(d_x + d_m), atol=1e-5)
