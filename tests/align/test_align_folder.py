"""align_folder on a tiny tree: outputs, report, resume, landmarks, parallel workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemetric.align import ARCFACE_TEMPLATE, AlignStatus, align_folder
from facemetric.data.images import load_image

pytestmark = pytest.mark.data

FACES = {
    "Aaron_Eckhart/1.jpg": "Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
    "Aaron_Eckhart/2.jpg": "AJ_Cook/AJ_Cook_0001.jpg",
    "Colin_Powell/1.jpg": "Colin_Powell/Colin_Powell_0001.jpg",
    "Colin_Powell/2.png": "Colin_Powell/Colin_Powell_0002.jpg",  # re-encoded as PNG
}


@pytest.fixture
def tree(lfw_root: Path, tmp_path: Path) -> Path:
    """Six images: four faces, a blank one and a corrupt one, plus files to ignore."""
    src = tmp_path / "src"
    for rel, lfw_rel in FACES.items():
        out = src / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(lfw_root / "lfw-deepfunneled" / lfw_rel).save(out)
    (src / "Blank").mkdir()
    Image.fromarray(np.full((250, 250), 128, np.uint8)).save(src / "Blank" / "grey.png")
    (src / "Blank" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a real jpeg")
    (src / "Blank" / "notes.txt").write_text("not an image")
    (src / "Colin_Powell" / ".hidden.jpg").write_bytes(b"ignored")
    return src


def run(src: Path, dst: Path, **kwargs: object):
    kwargs.setdefault("workers", 1)
    return align_folder(src, dst, progress=False, **kwargs)


def outputs(dst: Path) -> list[str]:
    return sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.suffix == ".jpg")


def test_align_folder_outputs_report_and_resume(tree, tmp_path):
    dst = tmp_path / "aligned"
    report = run(tree, dst)
    expected = ["Aaron_Eckhart/1.jpg", "Aaron_Eckhart/2.jpg", "Colin_Powell/1.jpg"]
    expected.append("Colin_Powell/2.jpg")
    assert outputs(dst) == expected
    for rel in expected:
        face = load_image(dst / rel)
        assert face.shape == (112, 112, 3)
    assert (report.total, report.skipped, report.processed, report.written) == (6, 0, 6, 4)
    assert report.counts[AlignStatus.OK] == 4
    assert report.counts[AlignStatus.NO_FACE] == 1
    assert report.counts[AlignStatus.LOAD_ERROR] == 1
    assert report.failed == 2
    problems = {p.path: p for p in report.problems}
    assert set(problems) == {"Blank/broken.jpg", "Blank/grey.png"}
    assert problems["Blank/grey.png"].status == AlignStatus.NO_FACE
    assert problems["Blank/broken.jpg"].status == AlignStatus.LOAD_ERROR
    assert problems["Blank/broken.jpg"].reason

    data = json.loads((dst / "align_report.json").read_text())
    assert report.report_path == dst / "align_report.json"
    assert data["total"] == 6 and data["written"] == 4 and data["counts"]["ok"] == 4
    assert {(p["path"], p["status"]) for p in data["problems"]} == {
        ("Blank/broken.jpg", "load_error"),
        ("Blank/grey.png", "no_face"),
    }
    assert not list(dst.rglob(".tmp-*"))

    # Resume: existing outputs are skipped, the two failures are retried (and fail again).
    before = {rel: (dst / rel).stat().st_mtime_ns for rel in expected}
    again = run(tree, dst)
    assert (again.skipped, again.processed, again.written) == (4, 2, 0)
    assert {rel: (dst / rel).stat().st_mtime_ns for rel in expected} == before

    # A deleted output is redone; a stale temporary file from a killed run is cleaned up.
    (dst / "Colin_Powell/1.jpg").unlink()
    stale = dst / "Colin_Powell" / ".tmp-1-a1b2c3.jpg"  # what atomic_write leaves when killed
    stale.write_bytes(b"half written")
    third = run(tree, dst)
    assert (third.skipped, third.processed, third.written) == (3, 3, 1)
    assert (dst / "Colin_Powell/1.jpg").is_file() and not stale.exists()
    assert outputs(dst) == expected


def test_fallback_is_reported_and_remembered_across_runs(tree, tmp_path):
    dst = tmp_path / "aligned"
    first = run(tree, dst, fallback=True, fallback_crop=0.6, suffix=".png")
    assert first.counts[AlignStatus.FALLBACK_CENTRE_CROP] == 1 and first.written == 5
    assert (dst / "Blank" / "grey.png").is_file()
    second = run(tree, dst, fallback=True, fallback_crop=0.6, suffix=".png")
    assert second.skipped == 5 and second.processed == 1  # only the corrupt file again
    kept = {p.path: p.status for p in second.problems}
    assert kept == {
        "Blank/grey.png": AlignStatus.FALLBACK_CENTRE_CROP,  # carried over from run one
        "Blank/broken.jpg": AlignStatus.LOAD_ERROR,
    }


def test_landmark_files_replace_detection(tree, tmp_path):
    marks = tmp_path / "marks"
    (marks / "Blank").mkdir(parents=True)
    # the grey image's "face" is given by five points: exactly the template, shifted
    lines = [f"{x + 60},{y + 70}" for x, y in ARCFACE_TEMPLATE]
    (marks / "Blank" / "grey.txt").write_text("\n".join(lines))
    report = run(tree, tmp_path / "aligned", landmarks_root=marks)
    assert report.counts[AlignStatus.GIVEN_LANDMARKS] == 1
    assert report.counts[AlignStatus.OK] == 4
    assert "Blank/grey.png" not in {p.path for p in report.problems}
    assert (tmp_path / "aligned" / "Blank" / "grey.jpg").is_file()


def test_two_workers_write_the_same_files(tree, tmp_path):
    # the 5-point model: each spawned worker loads its models, the 68-point one is slow to load
    one = run(tree, tmp_path / "one", workers=1, landmarks="dlib5")
    two = run(tree, tmp_path / "two", workers=2, landmarks="dlib5")
    assert one.counts == two.counts
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")
    for rel in outputs(tmp_path / "one"):
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


def test_bad_arguments(tree, tmp_path):
    with pytest.raises(ValueError, match="inside the source"):
        run(tree, tree / "aligned")
    with pytest.raises(ValueError, match="does not exist"):
        run(tmp_path / "nowhere", tmp_path / "aligned")
    with pytest.raises(ValueError, match="suffix"):
        run(tree, tmp_path / "aligned", suffix=".gif")
    with pytest.raises(ValueError, match="workers"):
        run(tree, tmp_path / "aligned", workers=0)
    with pytest.raises(ValueError, match="unknown detector"):
        run(tree, tmp_path / "aligned", detector="retina")
    shutil.copy(tree / "Colin_Powell" / "1.jpg", tree / "Colin_Powell" / "1.png")
    with pytest.raises(ValueError, match="would both be written"):
        run(tree, tmp_path / "aligned")
    assert not (tmp_path / "aligned").exists()  # refused before writing anything
