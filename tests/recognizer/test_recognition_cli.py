"""The recognition commands through ``facemetric`` itself: calibrate, export, verify, enroll,
identify, gallery — and a bulk enrollment killed with SIGKILL in a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facemetric.align import FaceAligner
from facemetric.cli import main
from facemetric.gallery import SQLiteGallery
from facemetric.models import build_model
from facemetric.training import config_from_dict, save_checkpoint

pytestmark = [pytest.mark.data]


@pytest.fixture(scope="module")
def setup(lfw_root: Path, tmp_path_factory) -> dict[str, Path]:
    """A small_cnn checkpoint, 8 DevTest people with 3 photos each (raw and aligned)."""
    tmp = tmp_path_factory.mktemp("reccli")
    config = config_from_dict({
        "seed": 0, "output_dir": str(tmp / "run"),
        "data": {"root": str(tmp), "image_size": 48},
        "model": {"name": "small_cnn", "embedding_size": 16, "options": {"width": 8}},
        "loss": {"name": "arcface"},
    })
    torch.manual_seed(0)
    model = build_model("small_cnn", 16, width=8)
    save_checkpoint({"step": 1, "model": model.state_dict(), "config": config.to_dict()},
                    tmp / "run", 1)
    aligner = FaceAligner(fallback=True)
    raw, aligned = tmp / "photos", tmp / "aligned"
    count = 0
    for line in (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]:
        if not line.strip():
            continue
        name, n = line.split()
        if int(n) < 3:
            continue
        for k in range(1, 4):
            src = lfw_root / "lfw-deepfunneled" / name / f"{name}_{k:04d}.jpg"
            (raw / name).mkdir(parents=True, exist_ok=True)
            (raw / name / src.name).write_bytes(src.read_bytes())
            res = aligner.align_file(src)
            (aligned / name).mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(res.face).save(aligned / name / f"{src.stem}.png")
        count += 1
        if count == 8:
            break
    return {"tmp": tmp, "run": tmp / "run", "raw": raw, "aligned": aligned}


def test_calibrate_export_verify_enroll_identify(setup, capsys):
    t = setup
    assert main(["calibrate", str(t["run"]), "--folder", str(t["aligned"]), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["impostors"] == 24 * 23 // 2 - 8 * 3 and table["genuines"] == 8 * 3
    assert [e["far"] for e in table["entries"]] == [0.01, 0.1]  # 252 impostors: no 1e-3
    assert (t["run"] / "calibration.json").is_file()

    onnx = t["tmp"] / "model.onnx"
    assert main(["export", str(t["run"]), "--out", str(onnx)]) == 0
    assert "thresholds at FARs" in capsys.readouterr().out

    people = sorted(p.name for p in t["raw"].iterdir())
    a, b = sorted((t["raw"] / people[0]).iterdir())[:2]
    for model in (str(t["run"]), str(onnx)):
        assert main(["verify", str(a), str(b), "--model", model, "--far", "0.01",
                     "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["threshold"]["far"] == 0.01 and out["same"] == (
            out["score"] >= out["threshold"]["value"])
    # a FAR the calibration cannot resolve is refused with what to do
    assert main(["verify", str(a), str(b), "--model", str(onnx), "--far", "1e-4"]) == 2
    assert "recalibrate" in capsys.readouterr().err

    gallery = t["tmp"] / "g.db"
    assert main(["enroll", str(gallery), "--folder", str(t["raw"]), "--model", str(onnx),
                 "--policy", "largest"]) in (0, 1)
    capsys.readouterr()
    assert main(["identify", str(gallery), str(a), "--model", str(onnx), "--far", "0.1",
                 "--json"]) == 0
    ident = json.loads(capsys.readouterr().out)[0]
    # its own enrolled photo: the top candidate, with a perfect score
    assert ident["faces"][0]["candidates"][0]["person"] == people[0]
    assert ident["faces"][0]["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert main(["gallery", "list", str(gallery), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing) == 8 and all(r["faces"] >= 1 for r in listing)
    assert main(["gallery", "remove", str(gallery), people[0]]) == 0
    capsys.readouterr()
    # another model on this collection is refused; reembed moves it over
    assert main(["identify", str(gallery), str(a), "--model", "dlib"]) == 2
    assert "reembed" in capsys.readouterr().err


def test_killed_bulk_enrollment_leaves_no_half_enrolled_person(setup, tmp_path):
    t = setup
    clean = tmp_path / "clean.db"
    subprocess.run([sys.executable, "-m", "facemetric", "enroll", str(clean), "--folder",
                    str(t["raw"]), "--model", str(t["run"]), "--policy", "largest"],
                   check=False, capture_output=True, timeout=600)
    with SQLiteGallery(clean) as g:
        expected = {p.name: p.face_count for p in g.list_persons("default", limit=100)[0]}
    assert len(expected) == 8

    killed = tmp_path / "killed.db"
    cmd = [sys.executable, "-m", "facemetric", "enroll", str(killed), "--folder", str(t["raw"]),
           "--model", str(t["run"]), "--policy", "largest"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # kill once some, not all, persons are in
            if killed.exists():
                try:
                    with sqlite3.connect(f"file:{killed}?mode=ro", uri=True, timeout=1) as c:
                        n = c.execute("SELECT COUNT(*) FROM persons").fetchone()[0]
                except sqlite3.Error:
                    n = 0
                if n >= 2:
                    break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    with SQLiteGallery(killed) as g:
        g.check()
        partial = {p.name: p.face_count for p in g.list_persons("default", limit=100)[0]}
    assert 0 < len(partial) <= 8
    assert all(partial[n] == expected[n] for n in partial), (partial, expected)
    # the re-run completes it: same persons, same faces, nothing twice
    subprocess.run(cmd, check=False, capture_output=True, timeout=600)
    with SQLiteGallery(killed) as g:
        final = {p.name: p.face_count for p in g.list_persons("default", limit=100)[0]}
        sha = [f.source_sha256 for n in final for f in g.faces("default", n)]
    assert final == expected and len(sha) == len(set(sha))
    np.testing.assert_equal(len(sha), sum(expected.values()))
