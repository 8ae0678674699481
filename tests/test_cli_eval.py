"""``facemetric eval``, ``compare`` and ``visualize``: parsing, exit codes, what they print."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facemetric.cli import main
from facemetric.training import config_from_dict, save_checkpoint
from facemetric.training.builders import build_model

SIDE = 16


def _tree(root: Path, people: int = 4, per: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    names = [f"Person_{i}" for i in range(people)]
    for name in names:
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (4, 4, 3))
        for k in range(1, per + 1):
            img = np.kron(base, np.ones((SIDE // 4, SIDE // 4, 1))) + rng.normal(0, 20,
                                                                                (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / name / f"{name}_{k:04d}.jpg", quality=95)
    return names


def _checkpoint(tmp: Path) -> Path:
    config = config_from_dict({
        "output_dir": str(tmp / "run"), "data": {"root": str(tmp), "image_size": SIDE},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 4}},
        "loss": {"name": "arcface"},
    })
    torch.manual_seed(0)
    state = {"step": 3, "model": build_model(config.model).state_dict(),
             "config": config.to_dict()}
    return save_checkpoint(state, tmp / "run", 3)


@pytest.fixture
def lfw_like(tmp_path) -> Path:
    names = _tree(tmp_path / "aligned")
    matched = [f"{n} 1 2" for n in names] + [f"{n} 2 3" for n in names]
    mismatched = [f"{names[i]} 1 {names[(i + 1) % 4]} 3" for i in range(4)]
    mismatched += [f"{names[i]} 2 {names[(i + 2) % 4]} 1" for i in range(4)]
    (tmp_path / "pairsDevTest.txt").write_text("8\n" + "\n".join(matched + mismatched) + "\n")
    _checkpoint(tmp_path)
    return tmp_path


def test_eval_pairs_writes_the_report_and_prints_a_table(lfw_like, capsys):
    t = lfw_like
    code = main(["eval", "--model", str(t / "run"), "--data", str(t / "aligned"),
                 "--pairs", str(t / "pairsDevTest.txt"), "--out", str(t / "out"),
                 "--folds", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| pairs | accuracy | AUC | EER |" in out and "| 8 + 8 |" in out
    assert "LFW pairsDevTest" in out and "small_cnn step 3" in out
    assert "12 images embedded" in out
    metrics = json.loads((t / "out" / "metrics.json").read_text())
    assert metrics["num_pairs"] == 16 and metrics["num_folds"] == 4
    assert metrics["extra"]["flip_test"] is True
    for f in ("report.md", "roc.png", "scores.png"):
        assert (t / "out" / f).is_file()


def test_eval_no_flip_and_broken_image_exit_code(lfw_like, capsys):
    t = lfw_like
    (t / "aligned" / "Person_0" / "Person_0_0001.jpg").write_bytes(b"\xff\xd8\xff broken")
    code = main(["eval", "--model", str(t / "run"), "--data", str(t / "aligned"),
                 "--pairs", str(t / "pairsDevTest.txt"), "--out", str(t / "out"),
                 "--folds", "2", "--no-flip"])
    out = capsys.readouterr().out
    assert code == 1  # finished, but not on the whole protocol
    assert "WARNING: 1 image(s) could not be loaded; 3 of 16 pairs were dropped" in out
    assert json.loads((t / "out" / "metrics.json").read_text())["extra"]["flip_test"] is False


def test_eval_usage_errors(lfw_like, capsys):
    t = lfw_like
    with pytest.raises(SystemExit) as info:  # no source
        main(["eval", "--model", str(t / "run"), "--data", str(t / "aligned")])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:  # two sources
        main(["eval", "--model", "m", "--pairs", "p", "--bin", "b"])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "m", "--cfp", "c", "--protocol", "XX"])
    assert info.value.code == 2

    code = main(["eval", "--model", str(t / "nothing.pt"), "--data", str(t / "aligned"),
                 "--pairs", str(t / "pairsDevTest.txt")])
    assert code == 2 and "no model file" in capsys.readouterr().err
    code = main(["eval", "--model", str(t / "run"), "--gallery", str(t / "aligned")])
    assert code == 2 and "--probe" in capsys.readouterr().err
    code = main(["eval", "--model", str(t / "run"), "--pairs", str(t / "pairsDevTest.txt")])
    assert code == 2 and "data_root" in capsys.readouterr().err


def test_eval_gallery_probe(lfw_like, capsys):
    t = lfw_like
    code = main(["eval", "--model", str(t / "run"), "--gallery", str(t / "aligned"),
                 "--probe", str(t / "aligned"), "--out", str(t / "gp"), "--folds", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "CMC: rank-1 100.00%" in out  # every probe is in the gallery
    assert (t / "gp" / "cmc.png").is_file()


def test_visualize_writes_the_map(lfw_like, capsys):
    t = lfw_like
    png = t / "vis" / "map.png"
    code = main(["visualize", "--model", str(t / "run"), "--data", str(t / "aligned"),
                 "--max-identities", "2", "--out", str(png)])
    assert code == 0 and png.is_file()
    assert str(png) in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["visualize", "--model", "m"])  # --data is required
    assert info.value.code == 2


def test_compare_command(lfw_like, capsys):
    t = lfw_like
    config = t / "cosface.toml"
    config.write_text(f"""
[data]
root = "{(t / 'aligned').as_posix()}"
image_size = {SIDE}
num_workers = 0
[model]
name = "small_cnn"
embedding_size = 8
options = {{ width = 4 }}
[loss]
name = "cosface"
scale = 16.0
[optimizer]
name = "sgd"
lr = 0.01
[batch]
p = 2
k = 2
[train]
device = "cpu"
""")
    code = main(["compare", "--configs", str(config), "--steps", "2", "--out", str(t / "cmp"),
                 "--eval-pairs", str(t / "pairsDevTest.txt"), "--eval-root",
                 str(t / "aligned"), "--eval-every", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "| cosface | cosface | 2 | steps |" in out
    assert (t / "cmp" / "convergence.png").is_file()
    assert main(["compare", "--configs", str(config), "--out", str(t / "cmp2")]) == 2
    assert "budget" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["compare", "--steps", "3"])  # --configs is required
    assert info.value.code == 2
