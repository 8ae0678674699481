"""The README's Python example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    loss = namespace["arcface"]
    assert tuple(loss.weight.shape) == (10_000, 512)
    assert namespace["embeddings"].grad is not None  # both losses reached the embeddings
    batches = list(namespace["sampler"])
    assert batches and all(len(b) == 4 for b in batches)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make demo" in text


def test_readme_recognition_example_runs(lfw_root, tmp_path, monkeypatch):
    """The recognition example, with its file names pointed at real LFW photos and a real
    (small, calibrated) checkpoint exported and installed as the default model in a
    throwaway ``FACEMETRIC_HOME``."""
    from facemetric.inference import CALIBRATION_FILE, ThresholdTable, load_model
    from facemetric.inference.calibration import CalibrationEntry
    from facemetric.inference.default import HOME_ENV, install_default_model
    from facemetric.inference.onnx import export_onnx
    from facemetric.models import build_model
    from facemetric.training import config_from_dict, save_checkpoint

    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    run = tmp_path / "runs" / "demo" / "train"
    config = config_from_dict({
        "output_dir": str(run), "data": {"root": str(tmp_path), "image_size": 32},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 4}},
        "loss": {"name": "arcface"}})
    save_checkpoint({"step": 1, "model": build_model("small_cnn", 8, width=4).state_dict(),
                     "config": config.to_dict()}, run, 1)
    fingerprint = load_model(run).contract.fingerprint()
    ThresholdTable(fingerprint, (CalibrationEntry(1e-3, 0.9, 1, 1000),), "test", 1000, 0).save(
        run / CALIBRATION_FILE)
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    installed = install_default_model(export_onnx(load_model(run), tmp_path / "model.onnx"))
    photos = sorted((lfw_root / "lfw-deepfunneled" / "Colin_Powell").glob("*.jpg"))[:5]
    names = ["ada1.jpg", "ada2.jpg", "a.jpg", "b.jpg", "who.jpg"]
    monkeypatch.chdir(tmp_path)
    for name, photo in zip(names, photos, strict=True):
        (tmp_path / name).write_bytes(photo.read_bytes())
    namespace: dict[str, object] = {}
    exec(compile(block, str(README), "exec"), namespace)
    rec = namespace["rec"]
    assert rec.contract.fingerprint() == fingerprint == installed.fingerprint
    assert rec.store.version("default") == 2  # enrolled, then removed
    assert "Ada Lovelace" not in rec.persons
