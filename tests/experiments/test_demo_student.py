"""``make demo``'s second half on real LFW photos, at a size a test can afford: the student
of ``configs/demo_student.toml`` (dlib's network from dlib's weights, distilled from dlib)
trains two steps, is calibrated on people the showcase leaves out, exported to ONNX without
the flip test, installed as the default model, and the showcase enrolls and identifies
real photos with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from facemetric.data.images import load_image
from facemetric.experiments.lfw_demo import (
    DEMO_STUDENT_CONFIG_FILE,
    ShowcasePeople,
    demo_config,
    recognition_showcase,
    train_and_export_student,
)
from facemetric.inference import load_model
from facemetric.inference.default import HOME_ENV, resolve_default_model
from facemetric.inference.onnx import OnnxEncoder
from facemetric.training import config_from_dict

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _small_lfw(lfw_root: Path, out: Path) -> Path:
    """An LFW root with a ``peopleDevTest.txt`` of real DevTest people, in the order the
    showcase reads it: 3 with 2–5 photos (enrolled), 1 with one photo (a stranger), then 20
    with 2–5 photos for the calibration — about 70 photos."""
    rows = (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]
    people = [(n, int(c)) for n, c in (r.split() for r in rows if r.strip())]
    several = [(n, c) for n, c in people if 2 <= c <= 5]
    single = [(n, c) for n, c in people if c == 1]
    chosen = several[:3] + single[:1] + several[3:23]
    lfw = out / "lfw"
    for name, _ in chosen:
        shutil.copytree(lfw_root / "lfw-deepfunneled" / name, lfw / "lfw-deepfunneled" / name)
    text = f"{len(chosen)}\n" + "".join(f"{n}\t{c}\n" for n, c in chosen)
    (lfw / "peopleDevTest.txt").write_text(text)
    return lfw


def test_the_demo_student_is_exported_installed_and_recognises(
    lfw_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("dlib")
    from facemetric.align import align_folder

    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    lfw = _small_lfw(lfw_root, tmp_path)
    aligned = tmp_path / "aligned"
    report = align_folder(lfw / "lfw-deepfunneled", aligned, workers=1, fallback=True,
                          progress=False)
    assert report.failed == 0
    people = ShowcasePeople.from_lfw(lfw, enrolled=3, strangers=1)
    assert len(people.enrolled) == 3 and len(people.strangers) == 1
    assert len(people.calibration) == 20

    raw = demo_config(aligned, lfw / "peopleDevTest.txt", tmp_path / "demo", 2,
                      DEMO_STUDENT_CONFIG_FILE)
    raw["output_dir"] = str(tmp_path / "demo" / "student")
    raw["batch"]["size"] = 8
    raw["distill"]["workers"] = 1
    raw["train"]["checkpoint_every"] = 2
    config = config_from_dict(raw, source=str(DEMO_STUDENT_CONFIG_FILE))
    assert config.model.name == "dlib_resnet" and config.distill.teacher == "dlib"
    out = tmp_path / "demo"
    student = train_and_export_student(config, aligned, people, out, progress=False)

    # the export: no flip test, calibrated, the same numbers as the trained run
    onnx = OnnxEncoder(student.onnx)
    assert student.onnx == out / "student.onnx" and student.train_steps == 2
    assert onnx.contract.flip_test is False and onnx.contract.backbone == "dlib_resnet"
    assert onnx.contract.input_size == 150
    assert onnx.thresholds is not None
    assert onnx.thresholds.model_fingerprint == onnx.contract.fingerprint()
    assert onnx.thresholds.impostors >= 1000  # resolves FAR 1e-3
    torch_encoder = load_model(student.checkpoint, flip_test=False)
    assert torch_encoder.contract.fingerprint() == onnx.contract.fingerprint()
    faces = np.stack([load_image(p) for p in sorted(aligned.glob("*/*.jpg"))[:8]])
    np.testing.assert_allclose(onnx.embed_faces(faces), torch_encoder.embed_faces(faces), atol=1e-5)
    # the calibration never saw the showcase's people
    listed = (out / "calibration_people.txt").read_text()
    assert not any(n in listed for n in (*people.enrolled, *people.strangers))

    # installed as the default model
    assert student.installed == resolve_default_model()
    assert student.installed.read_bytes() == student.onnx.read_bytes()

    # the showcase with the default model: real photos, detection and alignment
    lines = recognition_showcase(student.installed, lfw, people, out)
    text = "\n".join(lines)
    assert "enrolled 3 of 3" in text, text
    named = [line.split("→")[1].split()[0] for line in lines[-4:]]
    # two steps from dlib's weights are not yet at home on these crops (dlib's weights alone:
    # 90.5% on pairsDevTest): two of the three enrolled people are named, none wrongly
    assert sum(n == truth for n, truth in zip(named, people.enrolled, strict=False)) >= 2, text
    assert all(n in (truth, "unknown") for n, truth in zip(named, people.enrolled,
                                                             strict=False)), text
    assert named[3] == "unknown", text  # the stranger
