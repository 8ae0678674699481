"""The installed default model: ``load_model("default")``, ``Recognizer()`` and the CLI find
the export installed last; installing copies it under a name of its fingerprint and never
changes a copy, so a model in use stays the same; damaged or foreign files are refused
with a message that says how to get a default."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facemetric.cli import main
from facemetric.inference import load_model
from facemetric.inference.default import (
    HOME_ENV,
    POINTER_FILE,
    install_default_model,
    installed_default,
    models_dir,
    resolve_default_model,
)
from facemetric.inference.onnx import OnnxEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from service_helpers import make_model  # the service tests' fast real model


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def exports(tmp_path: Path) -> tuple[Path, Path]:
    """Two exports of different weights (with threshold tables)."""
    return (make_model(tmp_path / "a.onnx", seed=1), make_model(tmp_path / "b.onnx", seed=2))


def _faces(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_no_default_installed_says_how_to_get_one(home: Path):
    assert installed_default() is None
    with pytest.raises(FileNotFoundError) as err:
        load_model("default")
    text = str(err.value)
    assert "make demo" in text and "facemetric default-model" in text and HOME_ENV in text
    assert str(home) in text


def test_load_default_is_the_installed_export(home: Path, exports: tuple[Path, Path]):
    a, _ = exports
    model = install_default_model(a)
    assert model.path.parent == home / "models"
    assert model.path.read_bytes() == a.read_bytes()
    direct = OnnxEncoder(a)
    assert model.fingerprint == direct.contract.fingerprint()
    assert model.path.name == f"{model.fingerprint[:16]}.onnx"
    assert model.calibrated and model.source == str(a.resolve())
    default = load_model("default")
    assert isinstance(default, OnnxEncoder) and default.path == model.path
    assert default.contract.fingerprint() == direct.contract.fingerprint()
    assert default.thresholds is not None
    assert default.thresholds.to_dict() == direct.thresholds.to_dict()
    faces = _faces()
    np.testing.assert_array_equal(default.embed_faces(faces), direct.embed_faces(faces))
    assert resolve_default_model() == model.path


def test_a_new_default_never_changes_the_copy_in_use(home: Path, exports: tuple[Path, Path]):
    a, b = exports
    first = install_default_model(a)
    before = first.path.read_bytes()
    in_use = load_model("default")
    second = install_default_model(b)
    assert second.path != first.path and second.fingerprint != first.fingerprint
    assert first.path.read_bytes() == before  # a running service's file is untouched
    assert resolve_default_model() == second.path
    faces = _faces()
    np.testing.assert_array_equal(in_use.embed_faces(faces), OnnxEncoder(a).embed_faces(faces))
    np.testing.assert_array_equal(load_model("default").embed_faces(faces),
                                  OnnxEncoder(b).embed_faces(faces))
    # installing the same file again reuses its copy; the pointer follows
    again = install_default_model(a)
    assert again.path == first.path
    assert sorted(p.name for p in models_dir().glob("*.onnx")) == sorted(
        [first.path.name, second.path.name])
    assert resolve_default_model() == first.path


def test_same_weights_with_another_table_get_their_own_copy(
    home: Path, exports: tuple[Path, Path], tmp_path: Path
):
    a, _ = exports
    first = install_default_model(a)
    from facemetric.inference.onnx import write_thresholds

    table = OnnxEncoder(a).thresholds
    assert table is not None
    recalibrated = tmp_path / "a_recalibrated.onnx"
    recalibrated.write_bytes(a.read_bytes())
    changed = dataclasses.replace(table, entries=table.entries[:1], source="recalibrated")
    write_thresholds(recalibrated, changed)
    second = install_default_model(recalibrated)
    assert second.fingerprint == first.fingerprint and second.path != first.path
    assert second.path.name == f"{first.fingerprint[:16]}-2.onnx"
    assert first.path.read_bytes() == a.read_bytes()
    assert load_model("default").thresholds.fars == changed.fars


def test_refuses_what_is_not_an_export_and_keeps_the_default(
    home: Path, exports: tuple[Path, Path], tmp_path: Path
):
    a, _ = exports
    install_default_model(a)
    pointer = (home / "models" / POINTER_FILE).read_bytes()
    with pytest.raises(ValueError, match=r"exported \.onnx"):
        install_default_model(tmp_path / "run" / "checkpoint_000000010.pt")
    with pytest.raises(FileNotFoundError):
        install_default_model(tmp_path / "missing.onnx")
    node = helper.make_node("Identity", ["faces"], ["embeddings"])
    graph = helper.make_graph(
        [node], "foreign",
        [helper.make_tensor_value_info("faces", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, [1, 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(ValueError, match="facemetric"):
        install_default_model(foreign)
    assert (home / "models" / POINTER_FILE).read_bytes() == pointer
    assert len(list(models_dir().glob("*.onnx"))) == 1


@pytest.mark.parametrize("damage", ["garbage", "missing_file", "path_escape"])
def test_a_damaged_pointer_is_an_error_that_says_to_reinstall(
    home: Path, exports: tuple[Path, Path], damage: str
):
    model = install_default_model(exports[0])
    pointer = home / "models" / POINTER_FILE
    if damage == "garbage":
        pointer.write_text("{not json")
    elif damage == "missing_file":
        model.path.unlink()
    else:
        record = json.loads(pointer.read_text())
        record["file"] = "../a.onnx"
        pointer.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="install the default model again"):
        load_model("default")


def test_recognizer_without_a_model_uses_the_default(home: Path, exports: tuple[Path, Path]):
    from facemetric.recognizer import Recognizer

    with pytest.raises(FileNotFoundError, match="no default model"):
        Recognizer()
    model = install_default_model(exports[1])
    rec = Recognizer()
    assert rec.contract.fingerprint() == model.fingerprint
    assert rec.thresholds is not None


def test_cli_shows_installs_and_protects_the_default(
    home: Path, exports: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
):
    assert main(["default-model"]) == 1
    assert "no default model is installed" in capsys.readouterr().out
    assert main(["default-model", str(exports[0])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("installed default model") and "with its threshold table" in out
    assert main(["default-model"]) == 0
    assert str(resolve_default_model()) in capsys.readouterr().out
    # calibrating "default" in place is refused before any face is embedded
    assert main(["calibrate", "default", "--folder", str(home / "nowhere")]) == 2
    assert "never changed in place" in capsys.readouterr().err
    assert main(["default-model", str(home / "nowhere.onnx")]) == 2
    assert "no ONNX file" in capsys.readouterr().err
