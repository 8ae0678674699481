"""The teacher cache: rows equal the teacher's embeddings computed by hand, a valid cache is
reused without the teacher, a stale or damaged one is rebuilt, an interrupted build resumes,
and dlib chips are made from the same detected face as the aligned image."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemetric.data.images import load_image
from facemetric.distillation import (
    TEACHER_DIR,
    AlignedFaces,
    RealignedFaces,
    images_digest,
    load_teacher_cache,
    teacher_cache,
)
from facemetric.inference.contract import ModelContract
from facemetric.inference.encoder import Encoder

SIDE = 112


class ProjectionTeacher(Encoder):
    """A stand-in teacher: raw embedding = flattened pixels · P (fixed random P); counts
    the faces it embeds and can be told to fail after some calls (a killed build)."""

    def __init__(self, seed: int = 0, fail_after: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.p = rng.normal(size=(SIDE * SIDE * 3, 8))
        self.embedded = 0
        self.calls = 0
        self.fail_after = fail_after
        self.contract = ModelContract(
            backbone="projection", input_size=SIDE, template="arcface112", embedding_size=8,
            weights_sha256=hashlib.sha256(self.p.tobytes()).hexdigest(), flip_test=False,
            source="test")

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.embedded += len(faces)
        return (faces.reshape(len(faces), -1).astype(np.float64) @ self.p).astype(np.float32)


def by_hand(teacher: ProjectionTeacher, root: Path, rels: list[str]) -> np.ndarray:
    rows = []
    for rel in rels:
        x = np.asarray(Image.open(root / rel).convert("RGB"), dtype=np.float64).reshape(-1)
        e = x @ teacher.p
        rows.append(e / np.linalg.norm(e))
    return np.stack(rows)


def make_tree(root: Path, people: int = 3, per: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    rels = []
    for i in range(people):
        (root / f"P{i}").mkdir(parents=True)
        for k in range(per):
            img = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"P{i}" / f"P{i}_{k}.png")
            rels.append(f"P{i}/P{i}_{k}.png")
    return rels


def test_rows_are_the_teachers_embeddings_in_order(tmp_path):
    rels = make_tree(tmp_path)
    teacher = ProjectionTeacher()
    order = rels[::-1]
    got = teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, order, chunk=4,
                        progress=False)
    np.testing.assert_allclose(got.rows, by_hand(teacher, tmp_path, order), atol=1e-5)
    np.testing.assert_allclose(got.rows_for([rels[0]])[0], by_hand(teacher, tmp_path,
                                                                     [rels[0]])[0], atol=1e-5)
    m = got.manifest
    assert m["images"] == order and m["dim"] == 8 and m["count"] == 9
    assert m["teacher_fingerprint"] == teacher.contract.fingerprint()
    assert m["teacher"]["backbone"] == "projection" and m["inputs"]["kind"] == "aligned"
    assert got.file.parent == tmp_path / TEACHER_DIR
    assert not list((tmp_path / TEACHER_DIR).glob("*.parts"))  # chunks removed when done
    with pytest.raises(KeyError, match="no teacher embedding"):
        got.rows_for(["P9/none.png"])


def test_valid_cache_is_reused_without_the_teacher(tmp_path):
    rels = make_tree(tmp_path)
    first = ProjectionTeacher()
    teacher_cache(first, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    again = ProjectionTeacher()
    got = teacher_cache(again, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    assert again.embedded == 0
    np.testing.assert_allclose(got.rows, by_hand(first, tmp_path, rels), atol=1e-5)


def test_changed_images_make_the_cache_stale_and_it_is_rebuilt(tmp_path):
    rels = make_tree(tmp_path)
    teacher = ProjectionTeacher()
    built = teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    other = np.random.default_rng(9).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(other).save(tmp_path / rels[4])
    with pytest.raises(ValueError, match="stale"):
        load_teacher_cache(built.file, tmp_path)
    teacher.embedded = 0
    rebuilt = teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    assert teacher.embedded == len(rels)
    np.testing.assert_allclose(rebuilt.rows, by_hand(teacher, tmp_path, rels), atol=1e-5)


def test_another_teacher_gets_its_own_cache(tmp_path):
    rels = make_tree(tmp_path)
    a = teacher_cache(ProjectionTeacher(0), AlignedFaces(tmp_path), tmp_path, rels,
                      progress=False)
    other = ProjectionTeacher(1)
    b = teacher_cache(other, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    assert other.embedded == len(rels) and a.file != b.file
    assert not np.allclose(a.rows, b.rows)


def test_damaged_array_is_refused_and_rebuilt(tmp_path):
    rels = make_tree(tmp_path)
    teacher = ProjectionTeacher()
    built = teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    np.save(built.file.with_suffix(".npy"), np.full((9, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="non-unit or non-finite"):
        load_teacher_cache(built.file, tmp_path)
    teacher.embedded = 0
    teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    assert teacher.embedded == len(rels)


def test_an_interrupted_build_resumes_with_the_missing_chunks_only(tmp_path):
    rels = make_tree(tmp_path)  # 9 images, chunks of 2: 5 chunks
    killed = ProjectionTeacher(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache(killed, AlignedFaces(tmp_path), tmp_path, rels, chunk=2, progress=False)
    assert not list((tmp_path / TEACHER_DIR).glob("*.json"))  # no manifest yet
    resumed = ProjectionTeacher()
    got = teacher_cache(resumed, AlignedFaces(tmp_path), tmp_path, rels, chunk=2,
                        progress=False)
    assert resumed.embedded == 3  # chunks [6, 8) and [8, 9)
    np.testing.assert_allclose(got.rows, by_hand(resumed, tmp_path, rels), atol=1e-5)


def test_chunks_of_other_image_bytes_are_not_resumed(tmp_path):
    rels = make_tree(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache(ProjectionTeacher(fail_after=2), AlignedFaces(tmp_path), tmp_path, rels,
                      chunk=2, progress=False)
    other = np.random.default_rng(9).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(other).save(tmp_path / rels[0])
    teacher = ProjectionTeacher()
    got = teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, chunk=2,
                        progress=False)
    assert teacher.embedded == len(rels)
    np.testing.assert_allclose(got.rows, by_hand(teacher, tmp_path, rels), atol=1e-5)


def test_bad_requests_are_refused(tmp_path):
    rels = make_tree(tmp_path, people=1, per=2)
    teacher = ProjectionTeacher()
    with pytest.raises(ValueError, match="repeats"):
        teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels + rels[:1])
    with pytest.raises(ValueError, match="empty"):
        teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, [])
    with pytest.raises(ValueError, match="dlib150"):
        teacher_cache(teacher, RealignedFaces(tmp_path, tmp_path), tmp_path, rels)
    with pytest.raises(ValueError, match="source string"):
        teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, workers=2)
    small = tmp_path / "small"
    (small / "P").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(small / "P" / "a.png")
    with pytest.raises(ValueError, match="not a arcface112 crop"):
        teacher_cache(teacher, AlignedFaces(small), small, ["P/a.png"])


def test_digest_covers_names_and_bytes(tmp_path):
    rels = make_tree(tmp_path, people=1, per=2)
    d = images_digest(tmp_path, rels)
    assert d != images_digest(tmp_path, rels[::-1])
    want = hashlib.sha256()
    for rel in rels:
        want.update(rel.encode() + b"\0" + hashlib.sha256((tmp_path / rel).read_bytes()).digest())
    assert d == want.hexdigest()


@pytest.mark.data
def test_dlib_chips_come_from_the_face_the_aligned_image_shows(lfw_root, tmp_path):
    """RealignedFaces re-detects the photo and makes the dlib150 chip of the face FaceAligner
    aligned (the box it reports): dlib's own landmarks and get_face_chip in that box give the
    same chip (so the teacher and the student see one face)."""
    import dlib

    from facemetric.align import FaceAligner, model_file

    photos = lfw_root / "lfw-deepfunneled"
    names = ["Aaron_Peirsol", "Abdullah_Gul"]
    aligned = tmp_path / "aligned"
    aligner = FaceAligner(fallback=True)
    rels = []
    for name in names:
        rel = f"{name}/{name}_0001.jpg"
        result = aligner.align(load_image(photos / rel))
        (aligned / name).mkdir(parents=True)
        Image.fromarray(result.face).save(aligned / rel.replace(".jpg", ".png"))
        rels.append((rel.replace(".jpg", ".png"), result))
    inputs = RealignedFaces(photos, aligned)
    predictor = dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat")))
    for rel, result in rels:
        chip, fell_back = inputs.face(rel)
        assert not fell_back and chip.shape == (150, 150, 3)
        photo = load_image(photos / rel.replace(".png", ".jpg"))
        box = dlib.rectangle(*result.box)  # the face FaceAligner aligned
        reference = dlib.get_face_chip(photo, predictor(photo, box), size=150, padding=0.25)
        assert np.abs(chip.astype(int) - reference.astype(int)).max() <= 1


def test_realigned_falls_back_to_the_aligned_image_without_a_face(tmp_path):
    photos, aligned = tmp_path / "photos", tmp_path / "aligned"
    (photos / "P").mkdir(parents=True)
    (aligned / "P").mkdir(parents=True)
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(photos / "P" / "a.jpg")
    face = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(face).save(aligned / "P" / "a.png")
    chip, fell_back = RealignedFaces(photos, aligned).face("P/a.png")
    assert fell_back and chip.shape == (150, 150, 3)
    import cv2

    np.testing.assert_array_equal(chip, cv2.resize(face, (150, 150),
                                                   interpolation=cv2.INTER_LINEAR))
    with pytest.raises(FileNotFoundError, match="no original photo"):
        RealignedFaces(photos, aligned).face("P/missing.png")
    shutil.rmtree(photos)


def test_manifest_is_json_with_the_contract(tmp_path):
    rels = make_tree(tmp_path, people=1, per=2)
    teacher = ProjectionTeacher()
    got = teacher_cache(teacher, AlignedFaces(tmp_path), tmp_path, rels, progress=False)
    raw = json.loads(got.file.read_text())
    assert ModelContract.from_dict(raw["teacher"]) == teacher.contract
