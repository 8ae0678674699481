"""PAD detectors on real NUAA photos: the input contract is the recognizer's context crop,
training keeps subjects apart, saved detectors reload to the same scores, leave-subjects-out
counts add up, and the ``facemetric pad`` commands work end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facemetric.cli import main
from facemetric.evaluation.pad import pad_errors
from facemetric.pad import (
    CnnConfig,
    LbpDetector,
    PadInput,
    leave_subjects_out,
    load_detector,
    load_pad_faces,
    subject_folds,
    train_cnn,
    train_lbp,
)
from facemetric.pad.evaluate import time_per_face

pytestmark = [pytest.mark.data]

TRAIN = ["0002", "0003", "0005", "0006", "0008", "0009"]
TEST = ["0001", "0004", "0007"]


@pytest.fixture(scope="module")
def faces(nuaa_root):
    """Six evenly spaced photos per subject and class, all nine subjects."""
    return load_pad_faces(nuaa_root, per_class=6)


@pytest.fixture(scope="module")
def lbp(faces):
    train = faces.subset(np.isin(faces.subjects, TRAIN))
    return train_lbp(train.crops, train.is_attack, train.subjects.tolist())


def test_crops_are_the_recognizers_context_crops(faces):
    from facemetric.align.detect import FaceDetector
    from facemetric.data.images import load_image
    from facemetric.recognizer.faces import context_crop

    assert len(faces) + len(faces.missing) == 9 * 2 * 6
    assert len(faces) >= 100
    assert sorted(set(faces.subjects.tolist())) == sorted(TRAIN + TEST)
    for i in (0, len(faces) - 1):
        rgb = load_image(faces.paths[i])
        found = FaceDetector(upsample=1).detect(rgb)
        face = max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        want, _ = context_crop(rgb, face.box, face.landmarks)  # the recognizer's defaults
        np.testing.assert_array_equal(faces.crops[i], want)
        assert max(want.shape[:2]) <= 224
        assert faces.is_attack[i] == ("spoof" in faces.paths[i].parts)


def test_subject_folds_interleave_and_cover():
    subjects = [f"{i:04d}" for i in range(1, 10)] * 3
    folds = subject_folds(subjects, 3)
    assert folds == [["0001", "0004", "0007"], ["0002", "0005", "0008"],
                     ["0003", "0006", "0009"]]
    assert subject_folds(subjects, 9) == [[f"{i:04d}"] for i in range(1, 10)]
    with pytest.raises(ValueError, match="between 2 and the number of subjects"):
        subject_folds(subjects, 10)


def test_lbp_detector_generalises_to_unseen_subjects(faces, lbp):
    assert lbp.info["training_subjects"] == TRAIN
    test = faces.subset(np.isin(faces.subjects, TEST))
    scores = lbp.score(test.crops)
    assert scores.shape == (len(test),) and ((scores >= 0) & (scores <= 1)).all()
    errors = pad_errors(scores, test.is_attack, lbp.threshold)
    # measured 0 % APCER / 0 % BPCER on this split; a broken feature or label flip gives ~50 %
    assert errors.acer <= 0.15, errors
    np.testing.assert_array_equal(lbp.is_attack(test.crops), scores >= lbp.threshold)


def test_lbp_detector_saves_without_pickle_and_reloads(lbp, faces, tmp_path):
    folder = lbp.save(tmp_path / "lbp")
    manifest = json.loads((folder / "pad.json").read_text())
    assert manifest["kind"] == "lbp" and manifest["threshold"] == lbp.threshold
    assert manifest["input"] == {"margin": 0.5, "max_side": 224, "detector": "hog"}
    with np.load(folder / "lbp.npz", allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["coef", "intercept", "mean", "scale"]
        assert all(arrays[k].dtype == np.float64 for k in arrays.files)
    back = load_detector(folder)
    assert isinstance(back, LbpDetector) and back.threshold == lbp.threshold
    np.testing.assert_array_equal(back.score(faces.crops[:10]), lbp.score(faces.crops[:10]))
    # a changed weights file is refused
    with np.load(folder / "lbp.npz") as arrays:
        changed = {k: arrays[k] for k in arrays.files}
    changed["intercept"] = changed["intercept"] + 1
    np.savez(folder / "lbp.npz", **changed)
    with pytest.raises(ValueError, match="SHA-256"):
        load_detector(folder)
    with pytest.raises(FileNotFoundError, match="pad train"):
        load_detector(tmp_path / "nowhere")


def test_cnn_detector_trains_saves_and_reloads(faces, tmp_path):
    train = faces.subset(np.isin(faces.subjects, TRAIN))
    config = CnnConfig(input_size=64, widths=(8, 16), epochs=1, batch_size=16, val_subjects=2)
    det = train_cnn(train.crops, train.is_attack, train.subjects.tolist(), config)
    val = det.info["validation_subjects"]
    assert len(val) == 2 and set(val) <= set(TRAIN)
    assert set(det.info["training_subjects"]) == set(TRAIN) - set(val)
    # the threshold's errors were counted on the held-out training subjects only
    held = train.subset(np.isin(train.subjects, val))
    recount = pad_errors(det.score(held.crops), held.is_attack, det.threshold)
    assert det.info["training_subject_errors"]["attacks"] == int(held.is_attack.sum())
    assert det.info["training_subject_errors"]["apcer"] == pytest.approx(recount.apcer)
    folder = det.save(tmp_path / "cnn")
    state = torch.load(folder / "cnn.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = load_detector(folder)
    np.testing.assert_allclose(back.score(faces.crops[:8]), det.score(faces.crops[:8]),
                               rtol=0, atol=1e-6)
    assert back.config == config
    assert time_per_face(back, faces.crops[:3]) > 0


def test_leave_subjects_out_counts_add_up(faces):
    ev = leave_subjects_out(faces, "lbp", folds=3, timed_faces=5)
    assert [list(f.test_subjects) for f in ev.folds] == subject_folds(faces.subjects, 3)
    for f in ev.folds:
        assert not set(f.test_subjects) & set(f.info["training_subjects"])
        assert f.threshold == f.info["training_subject_errors"]["threshold"]
    paths = [p for f in ev.folds for p in f.paths]
    assert sorted(paths) == sorted(str(p) for p in faces.paths)  # each photo scored once
    accepted = sum(np.sum(f.scores[f.is_attack] < f.threshold) for f in ev.folds)
    rejected = sum(np.sum(f.scores[~f.is_attack] >= f.threshold) for f in ev.folds)
    assert ev.pooled.apcer == accepted / faces.is_attack.sum()
    assert ev.pooled.bpcer == rejected / (~faces.is_attack).sum()
    assert ev.pooled.attacks + ev.pooled.bona_fide == len(faces)
    assert ev.ms_per_face > 0 and ev.faces_timed == 5


def _small_folder(nuaa_root: Path, dst: Path, subjects: list[str], per_class: int) -> Path:
    for cls in ("live", "spoof"):
        for s in subjects:
            photos = sorted((nuaa_root / cls / s).glob("*.jpg"))
            (dst / cls / s).mkdir(parents=True)
            for p in photos[:: max(1, len(photos) // per_class)][:per_class]:
                (dst / cls / s / p.name).symlink_to(p)
    return dst


def test_pad_commands_end_to_end(nuaa_root, tmp_path, capsys):
    data = _small_folder(nuaa_root, tmp_path / "nuaa", ["0001", "0002", "0003"], 4)
    out = tmp_path / "det"
    cache = tmp_path / "faces.json"
    assert main(["pad", "train", "--data", str(data), "--detector", "lbp", "--out", str(out),
                 "--cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "lbp PAD detector" in printed and str(out) in printed
    assert cache.is_file()
    det = load_detector(out)
    assert det.info["training_subjects"] == ["0001", "0002", "0003"]

    photo = sorted((data / "spoof" / "0002").iterdir())[0]
    assert main(["pad", "score", "--model", str(out), str(photo), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    faces = load_pad_faces(data, cache=cache)
    want = float(det.score([faces.crops[[str(p) for p in faces.paths].index(str(photo))]])[0])
    assert answer["images"][0]["score"] == pytest.approx(want, abs=1e-12)
    assert answer["images"][0]["attack"] == (want >= det.threshold)

    report = tmp_path / "eval"
    assert main(["pad", "evaluate", "--data", str(data), "--detector", "lbp", "--folds", "3",
                 "--out", str(report), "--cache", str(cache)]) == 0
    saved = json.loads((report / "pad_lbp.json").read_text())
    assert len(saved["folds"]) == 3 and saved["pooled"]["attacks"] == 12
    assert (report / "det_lbp.png").stat().st_size > 0

    assert main(["pad", "evaluate", "--data", str(data), "--detector", "cnn", "--folds", "3",
                 "--epochs", "1", "--val-subjects", "1", "--out", str(report),
                 "--cache", str(cache)]) == 0
    saved = json.loads((report / "pad_cnn.json").read_text())
    assert [f["detector_info"]["validation_subjects"] != [] for f in saved["folds"]] == [True] * 3
    capsys.readouterr()

    assert main(["pad", "train", "--data", str(data), "--detector", "lbp", "--out",
                 str(out), "--rule", "apcer", "--cache", str(cache)]) == 2
    assert "--target-apcer" in capsys.readouterr().err
    assert main(["pad", "train", "--data", str(tmp_path), "--detector", "lbp", "--out",
                 str(out)]) == 2
    assert "live/<subject>" in capsys.readouterr().err


def test_pad_input_contract_is_checked():
    with pytest.raises(ValueError, match="margin"):
        PadInput(margin=-1)
    assert PadInput().face_fraction == 0.5
