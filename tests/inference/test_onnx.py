"""ONNX export and OnnxEncoder: same embeddings as torch on real aligned LFW faces, the
contract and thresholds travel inside the file, foreign or tampered files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from facemetric.align import FaceAligner
from facemetric.data.images import load_image
from facemetric.evaluation import PairList, read_lfw_pairs, verification_report
from facemetric.inference import (
    CALIBRATION_FILE,
    Encoder,
    ModelContract,
    TorchEncoder,
    calibrate,
    embed_pairs,
    input_tensor,
    load_model,
    sha256_of_tensors,
)
from facemetric.inference.checkpoint import load_checkpoint_encoder
from facemetric.inference.onnx import (
    CONTRACT_KEY,
    THRESHOLDS_KEY,
    OnnxEncoder,
    export_onnx,
)
from facemetric.models import build_model

pytestmark = pytest.mark.data

NUM_FACES = 20
PAIRS_PER_CLASS = 50  # first 50 matched + first 50 mismatched pairs of pairsDevTest


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def aligned_pairs(lfw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> PairList:
    """The first 50 matched and 50 mismatched pairs of View 1's DevTest, interleaved (so
    five interleaved folds each hold both kinds), as 112×112 aligned PNG files."""
    pairs = read_lfw_pairs(lfw_root / "pairsDevTest.txt", lfw_root / "lfw-deepfunneled")
    n_same = int(pairs.is_same.sum())
    order = np.ravel(np.column_stack([np.arange(PAIRS_PER_CLASS),
                                      n_same + np.arange(PAIRS_PER_CLASS)]))
    out = tmp_path_factory.mktemp("aligned")
    aligner = FaceAligner(fallback=True, fallback_crop=0.53)
    mapping: dict[Path, Path] = {}
    for path in sorted({pairs.path_a[i] for i in order} | {pairs.path_b[i] for i in order}):
        result = aligner.align_file(path)
        assert result.face is not None, f"{path}: {result.reason}"
        target = out / f"{path.stem}.png"
        Image.fromarray(result.face).save(target)
        mapping[path] = target
    return PairList(
        tuple(mapping[pairs.path_a[i]] for i in order),
        tuple(mapping[pairs.path_b[i]] for i in order),
        pairs.is_same[order],
        np.arange(len(order)) % 5,
    )


@pytest.fixture(scope="module")
def faces(aligned_pairs: PairList) -> np.ndarray:
    """``(20, 112, 112, 3)`` uint8 aligned LFW faces of different images."""
    images = aligned_pairs.unique_images()[0][:NUM_FACES]
    return np.stack([load_image(p) for p in images])


def _calibrate_batchnorm(model: nn.Module, faces: np.ndarray, size: int) -> nn.Module:
    """Give a randomly initialised network batch-norm statistics of real faces (cumulative
    averages over one pass), so that its eval-mode embeddings depend on the face."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    contract = ModelContract("x", size, "arcface112", 1, "0" * 64)
    x = torch.from_numpy(input_tensor(faces, contract))
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _torch_encoder(name: str, dim: int, size: int, faces: np.ndarray, flip: bool,
                   **options: int | str) -> TorchEncoder:
    model = _calibrate_batchnorm(build_model(name, dim, **options), faces, size)
    contract = ModelContract(
        backbone=name, input_size=size, template="arcface112", embedding_size=dim,
        weights_sha256=sha256_of_tensors(model.state_dict()), flip_test=flip,
    )
    return TorchEncoder(model, contract)


@pytest.fixture(scope="module")
def run_dir(faces: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training-style run folder: MobileFaceNet at 64 px, D=256 (the demo model's shape),
    checkpoint at step 7, and a calibration.json for its weights with flip test on."""
    folder = tmp_path_factory.mktemp("run")
    model = _calibrate_batchnorm(build_model("mobilefacenet", 256, input_size=64), faces, 64)
    torch.save(
        {
            "format_version": 1,
            "model": model.state_dict(),
            "config": {
                "model": {"name": "mobilefacenet", "embedding_size": 256,
                          "options": {"input_size": 64}},
                "data": {"image_size": 64},
                "loss": {"name": "arcface"},
            },
            "step": 7,
        },
        folder / "checkpoint_7.pt",
    )
    fingerprint = load_checkpoint_encoder(folder).contract.fingerprint()
    rng = np.random.default_rng(1)
    table = calibrate(rng.uniform(-0.3, 0.5, 5000), fingerprint,
                      genuine_scores=rng.uniform(0.2, 0.9, 500), source="test scores")
    table.save(folder / CALIBRATION_FILE)
    return folder


@pytest.fixture(scope="module")
def checkpoint_encoder(run_dir: Path) -> TorchEncoder:
    return load_checkpoint_encoder(run_dir)


@pytest.fixture(scope="module")
def exported(checkpoint_encoder: TorchEncoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(checkpoint_encoder, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)


def _rewrite_metadata(src: Path, dst: Path, changes: dict[str, str | None]) -> Path:
    """Copy an ONNX file with metadata entries replaced (``None``: removed)."""
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst))
    return dst


# ---------------------------------------------------------------------- agreement with torch


@pytest.mark.parametrize(
    ("name", "dim", "size", "options"),
    [
        ("mobilefacenet", 128, 112, {}),
        ("mobilefacenet", 128, 64, {"input_size": 64, "pool": "gem"}),
        ("iresnet18", 64, 64, {"input_size": 64}),
        ("small_cnn", 128, 112, {}),
    ],
)
def test_onnx_embeddings_match_torch_at_every_batch_size(faces, tmp_path, name, dim, size,
                                                          options):
    enc = _torch_encoder(name, dim, size, faces, flip=False, **options)
    path = export_onnx(enc, tmp_path / f"{name}.onnx")
    onx = OnnxEncoder(path, threads=2)
    many = faces[np.arange(17) % len(faces)]
    for batch in (1, 3, 17):
        ref = enc.embed_faces(many[:batch], batch_size=batch)
        got = onx.embed_faces(many[:batch], batch_size=batch)
        assert got.shape == (batch, dim)
        assert _cosines(got, ref).min() > 0.9999
        # the raw outputs agree too, not only their directions
        raw_ref = enc._forward(many[:batch])
        raw = onx._forward(many[:batch])
        assert np.abs(raw - raw_ref).max() <= 1e-4 * np.abs(raw_ref).max()
    # 17 different faces get different embeddings: the agreement is not a constant output's
    sims = ref @ ref.T
    assert sims[~np.eye(17, dtype=bool)].max() < 0.999


def test_exported_graph_has_a_dynamic_batch_axis_and_named_io(faces, tmp_path):
    enc = _torch_encoder("small_cnn", 64, 112, faces, flip=True)
    proto = onnx.load(str(export_onnx(enc, tmp_path / "m.onnx")))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "faces" and out.name == "embeddings"
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].HasField("dim_value")
    assert [d.dim_value for d in in_dims[1:]] == [3, 112, 112]
    assert inp.type.tensor_type.elem_type == TensorProto.FLOAT
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == 64


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_embeddings(faces, tmp_path):
    enc = _torch_encoder("small_cnn", 32, 112, faces, flip=True)
    path = export_onnx(enc, tmp_path / "dynamo.onnx", exporter="dynamo")
    onx = OnnxEncoder(path, threads=2)
    assert onx.contract.extra["exporter"] == "dynamo"
    assert onx.contract.extra["opset"] >= 18
    assert _cosines(onx.embed_faces(faces, batch_size=7), enc.embed_faces(faces)).min() > 0.9999


def test_checkpoint_and_onnx_agree_on_real_faces(checkpoint_encoder, exported, faces):
    onx = OnnxEncoder(exported, threads=2)
    ref = checkpoint_encoder.embed_faces(faces)
    got = onx.embed_faces(faces, batch_size=3)
    assert _cosines(got, ref).min() > 0.9999
    # unit rows (the base class normalises): ‖e‖ = 1
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------ contract and thresholds


def test_contract_and_thresholds_survive_the_round_trip(run_dir, checkpoint_encoder, exported):
    onx = load_model(exported)
    assert isinstance(onx, OnnxEncoder)
    tc, oc = checkpoint_encoder.contract, onx.contract
    assert oc.fingerprint() == tc.fingerprint()
    assert oc.source == "onnx"
    assert (oc.backbone, oc.input_size, oc.embedding_size, oc.template, oc.flip_test) == (
        "mobilefacenet", 64, 256, "arcface112", True)
    assert oc.weights_sha256 == tc.weights_sha256
    assert oc.extra["step"] == 7 and oc.extra["exported_from"] == "checkpoint"
    assert oc.extra["model_options"] == {"input_size": 64}
    # the table written beside the checkpoint, unchanged
    stored = json.loads((run_dir / CALIBRATION_FILE).read_text())
    assert onx.thresholds is not None
    assert onx.thresholds.to_dict() == stored
    assert onx.thresholds == checkpoint_encoder.thresholds
    assert onx.thresholds.threshold(1e-2).value == checkpoint_encoder.thresholds.threshold(
        1e-2).value


def test_explicit_thresholds_are_stored_and_none_when_uncalibrated(faces, tmp_path):
    enc = _torch_encoder("small_cnn", 16, 112, faces, flip=False)
    assert OnnxEncoder(export_onnx(enc, tmp_path / "plain.onnx")).thresholds is None
    table = calibrate(np.linspace(-1, 1, 1000), enc.contract.fingerprint(), fars=[0.01])
    onx = OnnxEncoder(export_onnx(enc, tmp_path / "cal.onnx", thresholds=table))
    assert onx.thresholds == table
    # 1000 evenly spaced impostor scores, FAR 1%: 10 of them (the 10 highest) above it
    scores = np.linspace(-1, 1, 1000)
    assert (scores >= onx.thresholds.threshold(0.01).value).sum() == 10


def test_flip_test_override(run_dir, exported, faces):
    onx = OnnxEncoder(exported, flip_test=False)
    ref = load_checkpoint_encoder(run_dir, flip_test=False)
    assert not onx.contract.flip_test
    assert onx.contract.fingerprint() == ref.contract.fingerprint()
    assert onx.thresholds is None  # the table was calibrated with flip test on
    assert _cosines(onx.embed_faces(faces), ref.embed_faces(faces)).min() > 0.9999
    # keeping the stored setting keeps the table
    assert OnnxEncoder(exported, flip_test=True).thresholds is not None


def test_export_leaves_the_encoder_usable(checkpoint_encoder, exported, faces):
    before = checkpoint_encoder.embed_faces(faces[:4])
    model = checkpoint_encoder.model
    export_onnx(checkpoint_encoder, exported.with_name("again.onnx"))
    assert checkpoint_encoder.model is model
    np.testing.assert_array_equal(checkpoint_encoder.embed_faces(faces[:4]), before)


# ---------------------------------------------------------------------------- refusals


def test_thresholds_for_another_model_are_refused_on_export(faces, tmp_path):
    enc = _torch_encoder("small_cnn", 16, 112, faces, flip=False)
    other = calibrate(np.linspace(-1, 1, 1000), "f" * 64, fars=[0.01])
    out = tmp_path / "refused.onnx"
    with pytest.raises(ValueError, match="calibrated for model ffffffffffff"):
        export_onnx(enc, out, thresholds=other)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_thresholds_for_another_model_are_refused_on_load(exported, tmp_path):
    other = calibrate(np.linspace(-1, 1, 1000), "e" * 64, fars=[0.01])
    bad = _rewrite_metadata(exported, tmp_path / "bad.onnx", {THRESHOLDS_KEY: other.to_json()})
    with pytest.raises(ValueError, match="calibrated for model eeeeeeeeeeee"):
        OnnxEncoder(bad)


def test_edited_contract_is_refused(exported, tmp_path):
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    raw = json.loads(meta[CONTRACT_KEY])
    raw["embedding_size"] = 128  # fingerprint no longer matches
    edited = _rewrite_metadata(exported, tmp_path / "e1.onnx", {CONTRACT_KEY: json.dumps(raw)})
    with pytest.raises(ValueError, match="fingerprint does not match"):
        OnnxEncoder(edited)
    # a consistent contract that disagrees with the graph (no stored fingerprint to catch it)
    raw.pop("fingerprint")
    raw["embedding_size"] = 256
    raw["input_size"] = 112
    edited = _rewrite_metadata(
        exported, tmp_path / "e2.onnx", {CONTRACT_KEY: json.dumps(raw), THRESHOLDS_KEY: None}
    )
    with pytest.raises(ValueError, match="do not match its contract"):
        OnnxEncoder(edited)


def test_foreign_onnx_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["faces"], ["embeddings"])],
        "foreign",
        [helper.make_tensor_value_info("faces", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="no facemetric model contract"):
        OnnxEncoder(path)
    with pytest.raises(ValueError, match="no facemetric model contract"):
        load_model(path)


def test_corrupt_files_are_refused(exported, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 50)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxEncoder(garbage)
    truncated = tmp_path / "truncated.onnx"
    data = exported.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        OnnxEncoder(truncated)
    with pytest.raises(FileNotFoundError):
        OnnxEncoder(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.onnx")


def test_export_argument_errors(checkpoint_encoder, tmp_path):
    class Other(Encoder):
        contract = checkpoint_encoder.contract

        def _forward(self, faces: np.ndarray) -> np.ndarray:
            raise AssertionError

    with pytest.raises(ValueError, match="needs a TorchEncoder"):
        export_onnx(Other(), tmp_path / "x.onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="opset must be at least 17"):
        export_onnx(checkpoint_encoder, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(checkpoint_encoder, tmp_path / "x.onnx", exporter="tf")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- same verification report


def test_onnx_gives_the_checkpoint_verification_report(aligned_pairs, checkpoint_encoder,
                                                       exported):
    onx = OnnxEncoder(exported, threads=2)
    ref = embed_pairs(checkpoint_encoder, aligned_pairs, batch_size=32, progress=False)
    got = embed_pairs(onx, aligned_pairs, batch_size=32, progress=False)
    assert not ref.failures and not got.failures
    assert len(ref.images) > 150  # about 190 distinct images
    s_ref, s_got = ref.scores(), got.scores()
    assert np.abs(s_ref - s_got).max() < 1e-4
    assert s_ref.std() > 0.01  # scores spread out: the comparison below is not vacuous
    r_ref = verification_report(s_ref, aligned_pairs.is_same, folds=aligned_pairs.fold)
    r_got = verification_report(s_got, aligned_pairs.is_same, folds=aligned_pairs.fold)
    assert r_ref.num_positives == r_got.num_positives == PAIRS_PER_CLASS
    assert r_ref.num_negatives == r_got.num_negatives == PAIRS_PER_CLASS
    assert r_got.accuracy == r_ref.accuracy
    np.testing.assert_array_equal(r_got.fold_accuracies, r_ref.fold_accuracies)
    assert abs(r_got.auc - r_ref.auc) <= 1e-6
    # the scores themselves: cosine of unit rows, recomputed here
    e = got.embeddings.astype(np.float64)
    np.testing.assert_allclose(
        s_got, (e[got.index_a] * e[got.index_b]).sum(1), atol=1e-12
    )
