"""``Recognizer(liveness=...)`` with an LBP PAD detector trained on NUAA subjects and checked
on photos of a subject it never saw: every score equals the detector run directly on the
recognizer's context crop (found by dlib independently), attacks are refused with their own
reason and score, and without the check nothing changes."""

from __future__ import annotations

import pytest
import torch

from facemetric.inference import ModelContract, ThresholdTable, TorchEncoder
from facemetric.inference.calibration import CalibrationEntry
from facemetric.pad import PadInput, load_pad_faces, train_lbp
from facemetric.recognizer import Problem, Recognizer

pytestmark = [pytest.mark.data]

TRAIN = ["0002", "0003", "0005", "0006", "0008", "0009"]
HELD_OUT = "0001"


class _MeanPatches(torch.nn.Module):
    """A fixed encoder: mean-centred 4×4 patch means through a seeded random matrix."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.randn(3 * 36, dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        return (x - x.mean(1, keepdim=True)) @ self.w


def _encoder() -> TorchEncoder:
    contract = ModelContract(backbone="mean_patches", input_size=24, template="arcface112",
                             embedding_size=16, weights_sha256="liveness-test")
    return TorchEncoder(_MeanPatches().eval(), contract, channels_last=False)


def _thresholds(enc: TorchEncoder) -> ThresholdTable:
    return ThresholdTable(enc.contract.fingerprint(), (CalibrationEntry(1e-3, 0.5, 0, 1000),),
                          "test", 1000, 0)


@pytest.fixture(scope="module")
def detector(nuaa_root):
    faces = load_pad_faces(nuaa_root, subjects=TRAIN, per_class=6)
    return train_lbp(faces.crops, faces.is_attack, faces.subjects.tolist())


@pytest.fixture(scope="module")
def photos(nuaa_root, detector):
    """Held-out live and spoof photos with the detector's score of each, computed without
    the recognizer: dlib → largest face → context crop → score."""
    from facemetric.align.detect import FaceDetector
    from facemetric.data.images import load_image
    from facemetric.recognizer.faces import context_crop

    finder = FaceDetector(upsample=1)
    out: dict[str, list[tuple[object, float]]] = {"live": [], "spoof": []}
    for cls in out:
        paths = sorted((nuaa_root / cls / HELD_OUT).glob("*.jpg"))
        for path in paths[::8]:
            rgb = load_image(path)
            found = finder.detect(rgb)
            if not found:
                continue
            face = max(found, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            crop, _ = context_crop(rgb, face.box, face.landmarks)
            out[cls].append((path, float(detector.score([crop])[0])))
    live = [(p, s) for p, s in out["live"] if s < detector.threshold]
    spoof = [(p, s) for p, s in out["spoof"] if s >= detector.threshold]
    # the detector never saw subject 0001; most of its photos must land on the right side
    assert len(live) >= 4 and len(spoof) >= 4, (out, detector.threshold)
    return {"live": live, "spoof": spoof}


def test_verify_scores_faces_and_refuses_an_attack(detector, photos):
    enc = _encoder()
    rec = Recognizer(enc, thresholds=_thresholds(enc), liveness=detector)
    (live_a, sa), (live_b, sb) = photos["live"][:2]
    spoof, ss = photos["spoof"][0]

    ok = rec.verify(live_a, live_b)
    assert ok.score is not None and ok.a.ok and ok.b.ok
    assert ok.a.faces[0].liveness == pytest.approx(sa, abs=1e-12)
    assert ok.b.faces[0].liveness == pytest.approx(sb, abs=1e-12)
    assert ok.to_dict()["images"][0]["liveness"] == [ok.a.faces[0].liveness]

    bad = rec.verify(live_a, spoof)
    assert bad.score is None and bad.same is None
    assert bad.a.ok and bad.b.problem == Problem.PRESENTATION_ATTACK
    assert bad.b.faces[0].liveness == pytest.approx(ss, abs=1e-12)
    assert f"{ss:.4f}" in bad.b.detail and f"{detector.threshold:.4f}" in bad.b.detail
    assert bad.to_dict()["images"][1]["problem"] == "presentation_attack"

    # per call: skip the check, and the same pair is compared, with no liveness scores
    skipped = rec.verify(live_a, spoof, liveness=False)
    assert skipped.score is not None and skipped.b.faces[0].liveness is None
    plain = Recognizer(enc, thresholds=_thresholds(enc)).verify(live_a, spoof)
    assert plain.score == pytest.approx(skipped.score, abs=1e-7)


def test_enroll_and_identify_refuse_attacks(detector, photos, tmp_path):
    enc = _encoder()
    rec = Recognizer(enc, tmp_path / "g.db", thresholds=_thresholds(enc), liveness=detector,
                     duplicate_threshold=1.5)  # NUAA frames are near-identical on purpose
    (l1, s1), (l2, _), (l3, s3) = photos["live"][:3]
    spoof, ss = photos["spoof"][1]

    res = rec.enroll("subject-0001", [l1, spoof, l2])
    assert [o.accepted for o in res.outcomes] == [True, False, True]
    refused = res.outcomes[1]
    assert refused.problem == Problem.PRESENTATION_ATTACK
    assert refused.liveness == pytest.approx(ss, abs=1e-12)
    assert res.outcomes[0].liveness == pytest.approx(s1, abs=1e-12)
    assert res.to_dict()["images"][1]["liveness"] == refused.liveness
    assert rec.persons_records()[0].face_count == 2

    attack = rec.identify(spoof)
    assert attack.image.problem == Problem.PRESENTATION_ATTACK
    assert attack.faces == () and attack.best is None  # never searched
    live = rec.identify(l3)
    assert live.image.ok and live.faces[0].face.liveness == pytest.approx(s3, abs=1e-12)
    assert live.faces[0].candidates[0].person == "subject-0001"
    assert live.to_dict()["faces"][0]["liveness"] == live.faces[0].face.liveness

    # liveness=False enrolls the print: the check is skipped only when asked
    forced = rec.enroll("subject-0001", [spoof], liveness=False)
    assert forced.accepted == 1 and forced.outcomes[0].liveness is None
    rec.close()


def test_threshold_override_and_saved_folder(detector, photos, tmp_path):
    enc = _encoder()
    (live, _), (spoof, ss) = photos["live"][0], photos["spoof"][0]
    folder = detector.save(tmp_path / "pad")
    strict = Recognizer(enc, thresholds=_thresholds(enc), liveness=folder,
                        liveness_threshold=0.0)  # everything is an attack
    assert strict.verify(live, live).a.problem == Problem.PRESENTATION_ATTACK
    lax = Recognizer(enc, thresholds=_thresholds(enc), liveness=str(folder),
                     liveness_threshold=ss + 1e-6)  # just above the print's score
    got = lax.verify(live, spoof)
    assert got.score is not None and got.b.faces[0].liveness == pytest.approx(ss, abs=1e-12)


def test_without_a_detector_nothing_changes_and_misuse_is_explained(detector, photos):
    enc = _encoder()
    rec = Recognizer(enc, thresholds=_thresholds(enc))
    live, _ = photos["live"][0]
    assert rec.verify(live, live).a.faces[0].liveness is None
    with pytest.raises(ValueError, match="no PAD detector"):
        rec.verify(live, live, liveness=True)
    with pytest.raises(ValueError, match="needs a liveness detector"):
        Recognizer(enc, liveness_threshold=0.5)
    with pytest.raises(ValueError, match=r"margin 0\.3"):
        Recognizer(enc, liveness=type(detector)(detector.model, detector.config,
                                                detector.threshold, PadInput(margin=0.3)))
    with pytest.raises(ValueError, match="score\\(crops\\)"):
        Recognizer(enc, liveness=object())


def test_cli_verify_enroll_identify_take_a_liveness_detector(detector, photos, tmp_path,
                                                              capsys):
    """The same check through ``facemetric verify/enroll/identify --liveness FOLDER`` with
    dlib's descriptor: the print is refused with its own reason and the detector's score."""
    import json

    from facemetric.cli import main
    from facemetric.inference import load_model

    folder = detector.save(tmp_path / "pad")
    dlib = load_model("dlib")
    table = tmp_path / "dlib_thresholds.json"
    ThresholdTable(dlib.contract.fingerprint(), (CalibrationEntry(1e-3, 0.9, 0, 1000),),
                   "test", 1000, 0).save(table)
    (live, sl), (live2, _) = photos["live"][0], photos["live"][1]
    spoof, ss = photos["spoof"][0]
    common = ["--model", "dlib", "--thresholds", str(table), "--liveness", str(folder)]

    assert main(["verify", str(live), str(spoof), *common, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["same"] is None
    refused = out["images"][1]
    assert refused["problem"] == Problem.PRESENTATION_ATTACK
    assert refused["liveness"] == [pytest.approx(ss, abs=1e-9)]
    assert out["images"][0]["liveness"] == [pytest.approx(sl, abs=1e-9)]

    assert main(["verify", str(live), str(live2), *common]) == 0
    text = capsys.readouterr().out
    assert "SAME person" in text and f"liveness {sl:.3f}" in text

    gallery = tmp_path / "g.db"
    assert main(["enroll", str(gallery), "subject-0001", str(live), str(spoof), *common]) == 1
    text = capsys.readouterr().out
    assert f"rejected {spoof}: {Problem.PRESENTATION_ATTACK}" in text
    assert "enrolled 1 face(s) of 1 person(s); 1 rejected" in text

    assert main(["identify", str(gallery), str(live2), str(spoof), *common, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got[0]["faces"][0]["best"] == "subject-0001"
    assert got[1]["problem"] == Problem.PRESENTATION_ATTACK and got[1]["faces"] == []

    # a threshold above the print's score lets it through, still scored
    assert main(["verify", str(live), str(spoof), *common, "--json",
                 "--liveness-threshold", str(ss + 1e-6)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same"] is not None and out["images"][1]["liveness"] == [
        pytest.approx(ss, abs=1e-9)]
