"""dlib's ResNet in torch: the port reproduces dlib's own descriptors, the file reader
refuses what it does not understand, the zero-padded addition is dlib's."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facemetric.models import build_model
from facemetric.models.dlib_file import DlibFormatError, read_dlib_descriptor
from facemetric.models.dlib_resnet import (
    MIN_INPUT_SIZE,
    DlibResidualUnit,
    DlibResNet,
    dlib_model_path,
    dlib_resnet,
    final_map_size,
)

dlib = pytest.importorskip("dlib")


@pytest.fixture(scope="module")
def model_file() -> Path:
    return dlib_model_path()


@pytest.fixture(scope="module")
def port(model_file: Path) -> DlibResNet:
    return dlib_resnet(weights=str(model_file)).eval()


def to_input(chips: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, H, W, 3)`` → facemetric's ``x / 127.5 − 1`` NCHW float batch."""
    return torch.from_numpy(chips.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


def dlib_descriptors(model_file: Path, chips: np.ndarray) -> np.ndarray:
    net = dlib.face_recognition_model_v1(str(model_file))
    out = net.compute_face_descriptor([np.ascontiguousarray(c) for c in chips])
    return np.asarray([np.asarray(d) for d in out], dtype=np.float64)


def test_reader_finds_dlib_resnet_shapes(model_file: Path) -> None:
    w = read_dlib_descriptor(model_file)
    assert w.input_size == 150
    assert w.pixel_mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    assert len(w.convs) == len(w.affines) == 29
    assert w.convs[0].weight.shape == (32, 3, 7, 7) and w.convs[0].stride == 2
    assert w.convs[0].padding == 0
    strides = [c.stride for c in w.convs]
    assert strides.count(2) == 5  # the stem and the first unit of four groups
    assert w.fc.shape == (128, 256)
    # every convolution has weights of ordinary magnitude (not misread bytes)
    for conv in w.convs:
        assert np.isfinite(conv.weight).all() and 1e-4 < np.abs(conv.weight).mean() < 1.0


def test_port_reproduces_dlib_on_synthetic_chips(model_file: Path, port: DlibResNet) -> None:
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, size=(4, 10, 10, 3), dtype=np.uint8)
    chips = np.stack(
        [np.asarray(Image.fromarray(c).resize((150, 150), Image.BICUBIC)) for c in low]
    )
    expected = dlib_descriptors(model_file, chips)
    with torch.no_grad():
        got = port(to_input(chips)).double().numpy()
    assert np.abs(got - expected).max() < 5e-6


def test_port_reproduces_dlib_on_real_faces(
    model_file: Path, port: DlibResNet, lfw_root: Path
) -> None:
    photos = sorted((lfw_root / "lfw-deepfunneled").glob("*/*.jpg"))[:2400:200]
    chips = np.stack(
        [np.asarray(Image.open(p).convert("RGB").crop((50, 50, 200, 200))) for p in photos]
    )
    expected = dlib_descriptors(model_file, chips)
    with torch.no_grad():
        got = port(to_input(chips)).double().numpy()
    assert np.abs(got - expected).max() < 5e-6
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 1 - 1e-6
    # and distinct faces give distinct descriptors (the comparison is not vacuous)
    assert np.linalg.norm(expected[0] - expected[1]) > 0.2


def test_unequal_branches_add_as_dlib_does() -> None:
    """A stride-2 unit fed an 8×8 map: convolution branch 3×3, pool 4×4, 4 → 6 channels;
    the sum is the zero-padded one, computed here by loops in float64."""
    unit = DlibResidualUnit(4, 6, 2, in_side=8).double().eval()
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = unit.affine2(unit.conv2(torch.relu(unit.affine1(unit.conv1(x)))))
        out = unit(x)
    assert y.shape == (2, 6, 3, 3) and out.shape == (2, 6, 4, 4)
    ref = torch.zeros(2, 6, 4, 4, dtype=torch.float64)
    for n, c, i, j in itertools.product(range(2), range(6), range(4), range(4)):
        branch = y[n, c, i, j].item() if i < 3 and j < 3 else 0.0
        pool = x[n, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean().item() if c < 4 else 0.0
        ref[n, c, i, j] = max(branch + pool, 0.0)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("size", [MIN_INPUT_SIZE, 112, 128, 150])
def test_final_map_size_is_the_real_one(size: int) -> None:
    model = DlibResNet(input_size=size).eval()
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        maps = model.units(model.pool(model.stem(x)))
    assert maps.shape[-1] == maps.shape[-2] == final_map_size(size)
    assert model(x).shape == (1, 128)


def test_too_small_input_refused() -> None:
    assert final_map_size(MIN_INPUT_SIZE - 1) == 0
    with pytest.raises(ValueError, match=f"≥ {MIN_INPUT_SIZE}"):
        DlibResNet(input_size=MIN_INPUT_SIZE - 1)
    with pytest.raises(ValueError, match=r"must be 112×112"):
        DlibResNet(input_size=112)(torch.zeros(1, 3, 150, 150))


def test_registry_builds_it_and_another_size_refuses_dlib_fc(model_file: Path) -> None:
    model = build_model("dlib_resnet", 128, input_size=112, weights=str(model_file))
    assert isinstance(model, DlibResNet) and model.input_size == 112
    with pytest.raises(ValueError, match="embedding_size=128"):
        dlib_resnet(embedding_size=64, weights=str(model_file))


def test_damaged_files_are_refused(model_file: Path, tmp_path: Path) -> None:
    data = model_file.read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibFormatError):
        read_dlib_descriptor(truncated)
    other = tmp_path / "other.dat"
    other.write_bytes(b"\x01\x01\x01\x0bloss_mmod_2" + data[17:])
    with pytest.raises(DlibFormatError, match="not a dlib loss_metric"):
        read_dlib_descriptor(other)
    # one convolution's declared filter count changed: the reader's shape checks catch it
    start = data.index(b"\x01\x05con_4", 1000) + 7  # the first 32 → 32 convolution
    # tensor version 2, sizes (9248, 1, 1, 1) as dlib's integers, then 9,248 float32
    assert data[start : start + 11] == b"\x01\x02\x02\x20\x24\x01\x01\x01\x01\x01\x01"
    broken = bytearray(data)
    pos = start + 11 + 4 * 9248
    assert broken[pos : pos + 2] == b"\x01\x20"  # num_filters = 32
    broken[pos + 1] = 0x21
    bad = tmp_path / "bad.dat"
    bad.write_bytes(bytes(broken))
    with pytest.raises(DlibFormatError, match="inconsistent con_"):
        read_dlib_descriptor(bad)
    with pytest.raises(FileNotFoundError):
        read_dlib_descriptor(tmp_path / "missing.dat")


def test_onnx_export_of_a_smaller_input_matches_torch(port: DlibResNet, tmp_path: Path) -> None:
    from facemetric.inference.contract import ModelContract
    from facemetric.inference.encoder import TorchEncoder
    from facemetric.inference.onnx import OnnxEncoder, export_onnx

    model = DlibResNet(input_size=112)
    model.load_state_dict(port.state_dict())  # the weights do not depend on the input size
    contract = ModelContract(
        backbone="dlib_resnet",
        input_size=112,
        template="arcface112",
        embedding_size=128,
        weights_sha256="0" * 64,
        flip_test=False,
        source="checkpoint",
    )
    encoder = TorchEncoder(model.eval(), contract)
    path = export_onnx(encoder, tmp_path / "dlib112.onnx")  # verify=True checks 3 inputs
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    got = OnnxEncoder(path, threads=1).embed_faces(faces)
    expected = encoder.embed_faces(faces)
    assert np.abs(got - expected).max() < 1e-5
