"""``facemetric robustness`` end to end on real LFW pairs, with a pixel encoder whose
embeddings the test recomputes by hand (float64) from the standard aligner's crops."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from facemetric.align import FaceAligner
from facemetric.align.warp import ARCFACE_TEMPLATE
from facemetric.cli import main
from facemetric.data.degradations import FaceGeometry, make_degradation
from facemetric.data.images import load_image
from facemetric.evaluation.protocols import read_lfw_pairs
from facemetric.experiments.robustness import (
    NamedModel,
    degraded_photo,
    face_geometry,
    model_label,
    run_robustness,
    select_pairs,
)
from facemetric.inference import Encoder, ModelContract

PAIRS = 20


def _pixels64(face: np.ndarray) -> np.ndarray:
    """float64 reference: grey 8×8 block means of a 112 px crop (14×14 blocks), centred."""
    grey = face.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    blocks = grey.reshape(8, 14, 8, 14).mean(axis=(1, 3)).ravel()
    v = blocks - blocks.mean()
    return v / np.linalg.norm(v)


class PixelEncoder(Encoder):
    """A model-free encoder: :func:`_pixels64` in float32 (an independent, known embedding)."""

    def __init__(self, template: str = "arcface112") -> None:
        self.contract = ModelContract(backbone="pixels", input_size=112, template=template,
                                      embedding_size=64, weights_sha256="0" * 64,
                                      flip_test=False, source="test")

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        return np.stack([_pixels64(f) for f in faces]).astype(np.float32)


@pytest.fixture(scope="module")
def report(lfw_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("robustness")
    severities = {"brightness": (1.0,), "sunglasses": (1.0,), "downscale": (14,)}
    result = run_robustness(
        [NamedModel("pixels", PixelEncoder()), NamedModel("pixels", PixelEncoder())],
        protocol="lfw-devtest", data_root=lfw_root.parent, out_dir=out, pairs=PAIRS, seed=3,
        fars=(0.1,), severities=severities, progress=False,
    )
    return result, out, severities


def _rows(result, model: str, degradation: str):
    return [r for r in result.rows if r.model == model and r.degradation == degradation]


def test_clean_scores_match_the_standard_aligner_and_a_float64_embedding(report, lfw_root):
    result, _, _ = report
    listed = read_lfw_pairs(lfw_root / "pairsDevTest.txt", lfw_root / "lfw-deepfunneled")
    chosen = select_pairs(np.asarray(listed.is_same), PAIRS, 3)
    aligner = FaceAligner()
    scores, same = [], []
    for i in chosen:
        a = aligner.align(load_image(listed.path_a[i])).face
        b = aligner.align(load_image(listed.path_b[i])).face
        assert a is not None and b is not None  # these LFW faces are all detected
        scores.append(float(_pixels64(a) @ _pixels64(b)))
        same.append(bool(listed.is_same[i]))
    (clean,) = _rows(result, "pixels", "clean")
    assert clean.pairs == PAIRS and sum(same) == PAIRS // 2
    assert clean.auc == pytest.approx(roc_auc_score(same, scores), abs=1e-9)


def test_identity_degradation_reproduces_the_clean_row_and_others_move(report):
    result, _, _ = report
    (clean,) = _rows(result, "pixels", "clean")
    (same,) = _rows(result, "pixels", "brightness")  # factor 1: the photo unchanged
    assert (same.accuracy, same.auc, same.tar) == (clean.accuracy, clean.auc, clean.tar)
    assert same.detection_failures == 0 and same.detection_checked == PAIRS
    (band,) = _rows(result, "pixels", "sunglasses")
    (tiny,) = _rows(result, "pixels", "downscale")
    assert band.auc != clean.auc
    # a band as tall as the eye distance hides the eyes from HOG on some photos at least
    assert band.detection_failures is not None and band.detection_failures >= 1
    assert 0 <= tiny.detection_failures <= PAIRS


def test_two_models_share_every_file_and_table(report):
    result, out, severities = report
    labels = {r.model for r in result.rows}
    assert labels == {"pixels", "pixels (2)"}
    # identical encoders on identical degraded photos: identical rows
    for a, b in zip(_rows(result, "pixels", "sunglasses"), _rows(result, "pixels (2)",
                                                                  "sunglasses"), strict=True):
        assert (a.accuracy, a.auc) == (b.accuracy, b.auc)
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (1 + len(severities))
    assert {"model", "degradation", "severity", "accuracy", "accuracy_std", "auc",
            "tar@far=0.1", "pairs", "detection_failures"} <= set(rows[0])
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["pairs"] == PAIRS and meta["seed"] == 3 and len(meta["rows"]) == len(rows)
    for name in [*severities, "examples"]:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "pixels (2)" in text and "sunglasses" in text and "det. fail" in text


def test_degraded_photos_are_a_function_of_the_seed_and_positions(lfw_root):
    photo = load_image(lfw_root / "lfw-deepfunneled" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    face = FaceGeometry(ARCFACE_TEMPLATE * 1.3 + 50, 112 * 1.3)
    patches = make_degradation("patches", 0.2)
    a = degraded_photo(patches, photo, face, seed=1, pair=4, deg_index=0, sev_index=1)
    np.testing.assert_array_equal(a, degraded_photo(patches, photo, face, 1, 4, 0, 1))
    assert not np.array_equal(a, degraded_photo(patches, photo, face, 2, 4, 0, 1))
    assert not np.array_equal(a, degraded_photo(patches, photo, face, 1, 5, 0, 1))


def test_select_pairs_is_balanced_seeded_and_complete_without_a_count():
    same = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    a = select_pairs(same, 20, 0)
    assert len(a) == 20 and same[a].sum() == 10 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, select_pairs(same, 20, 0))
    assert not np.array_equal(a, select_pairs(same, 20, 1))
    np.testing.assert_array_equal(select_pairs(same, None, 0), np.arange(100))
    with pytest.raises(ValueError, match="at least 4"):
        select_pairs(same, 2, 0)


def test_face_geometry_recovers_a_scaled_rotated_template():
    theta = np.radians(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = (ARCFACE_TEMPLATE - 56) @ rot.T * 2.5 + np.array([300.0, 200.0])
    geo = face_geometry(pts, "arcface5")
    np.testing.assert_allclose(geo.points, pts, atol=1e-9)
    assert geo.width == pytest.approx(112 * 2.5)
    assert geo.interocular == pytest.approx(2.5 * np.linalg.norm(ARCFACE_TEMPLATE[1] -
                                                                 ARCFACE_TEMPLATE[0]))


def test_bad_requests_are_refused(lfw_root, cfp_root, tmp_path):
    with pytest.raises(ValueError, match="unknown protocol 'lfw-view3'"):
        run_robustness([NamedModel("p", PixelEncoder())], protocol="lfw-view3",
                       data_root=lfw_root.parent, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="FARs must lie in"):
        run_robustness([NamedModel("p", PixelEncoder())], data_root=lfw_root.parent,
                       out_dir=tmp_path, fars=(0.0,), progress=False)
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        run_robustness([NamedModel("p", PixelEncoder())], data_root=lfw_root.parent,
                       out_dir=tmp_path, severities={"fog": (1,)}, progress=False)
    with pytest.raises(ValueError, match="needs dlib's own face chip"):
        run_robustness([NamedModel("d", PixelEncoder("dlib150"))], protocol="cfp-fp",
                       data_root=cfp_root.parent, out_dir=tmp_path, pairs=4, progress=False)


def test_model_labels():
    assert model_label("dlib") == "dlib"
    assert model_label("/x/cache/demo.onnx") == "demo.onnx"
    assert model_label("/work/main/runs/demo/train") == "demo/train"
    assert model_label("/work/main/runs/demo/train/checkpoint_000000680.pt") == "demo/train"
    assert model_label("/elsewhere/mymodel") == "mymodel"


def _small_checkpoint(tmp: Path) -> Path:
    from facemetric.training import config_from_dict, save_checkpoint
    from facemetric.training.builders import build_model

    config = config_from_dict({
        "seed": 0, "output_dir": str(tmp / "run"), "data": {"root": str(tmp), "image_size": 32},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 4}},
        "loss": {"name": "arcface"},
    })
    torch.manual_seed(1)
    model: nn.Module = build_model(config.model)
    state = {"step": 0, "model": model.state_dict(), "config": config.to_dict()}
    save_checkpoint(state, tmp / "run", 0)
    return tmp / "run"


def test_cli_end_to_end_on_an_untrained_small_cnn(lfw_root, tmp_path, capsys):
    run = _small_checkpoint(tmp_path)
    out = tmp_path / "report"
    code = main(["robustness", str(run), "--pairs", "12", "--degradations", "jpeg",
                 "--far", "0.2", "--no-detect", "--quiet", "--data", str(lfw_root.parent),
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "jpeg" in printed
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["degradation"] for r in rows] == ["clean", "jpeg", "jpeg", "jpeg", "jpeg"]
    assert all(r["detection_failures"] == "" for r in rows)  # --no-detect
    assert (out / "jpeg.png").is_file() and (out / "report.md").is_file()
    assert main(["robustness", str(run), "--degradations", "fog", "--data",
                 str(lfw_root.parent), "--out", str(out)]) == 2
    assert "unknown degradation(s) ['fog']" in capsys.readouterr().err


def test_merge_puts_runs_on_the_same_pairs_on_shared_plots(report, tmp_path):
    from facemetric.experiments.robustness import merge_reports

    result, out, severities = report
    meta = json.loads((out / "metrics.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    slow = dict(meta, models={"slow": "another model"},
                severities={"sunglasses": meta["severities"]["sunglasses"]},
                rows=[dict(r, model="slow", accuracy=0.5) for r in meta["rows"]
                      if r["model"] == "pixels" and r["degradation"] in ("clean", "sunglasses")])
    (other / "metrics.json").write_text(json.dumps(slow))
    merged = merge_reports([out, other], tmp_path / "merged")
    assert {r.model for r in merged.rows} == {"pixels", "pixels (2)", "slow"}
    assert len(merged.rows) == len(result.rows) + 2
    assert [r.accuracy for r in merged.rows if r.model == "slow"] == [0.5, 0.5]
    for name in severities:
        assert (tmp_path / "merged" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "slow" in (tmp_path / "merged" / "report.md").read_text()
    (other / "metrics.json").write_text(json.dumps(dict(slow, seed=4)))
    with pytest.raises(ValueError, match="measured different pairs"):
        merge_reports([out, other], tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match=r"no .*metrics\.json"):
        merge_reports([tmp_path / "nowhere"], tmp_path / "bad")
