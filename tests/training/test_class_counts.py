"""The dynamic-margin ArcFace from a config: the loop and ``compare`` hand the loss the
training set's images per class, counted here independently from the files on disk."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facemetric.experiments.compare import compare
from facemetric.losses import DynamicMarginArcFaceLoss, WeightedLossSum
from facemetric.training import config_from_dict, load_checkpoint, train
from facemetric.training.builders import build_loss, class_counts_of
from facemetric.training.config import LossConfig, load_config

#: images per identity: unequal, so a margin per class is visible (and one below min_images)
SIZES = {"ann": 2, "bob": 7, "cy": 3, "dee": 5, "eve": 4}
SIDE = 32
A, B, LAM = 0.4, 0.1, 0.25


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unequal")
    rng = np.random.default_rng(0)
    for name, n in SIZES.items():
        (root / name).mkdir()
        base = rng.integers(0, 256, (4, 4, 3))
        for j in range(n):
            img = np.kron(base, np.ones((SIDE // 4, SIDE // 4, 1))) + rng.normal(0, 15,
                                                                                (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{j}.png")
    return root


def _expected_margins(root: Path, min_images: int) -> list[float]:
    """``a·n^(-λ) + b`` per kept identity, in sorted-name order, from a listing of the files."""
    margins = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        n = len([f for f in folder.iterdir() if f.suffix == ".png"])
        if n >= min_images:
            margins.append(A * n ** (-LAM) + B)
    return margins


def _raw(root: Path, out: Path, aux: bool, min_images: int = 3) -> dict:
    dynamic = {"name": "dynamic_margin_arcface", "a": A, "b": B, "lam": LAM, "scale": 16.0}
    raw = {
        "seed": 1,
        "output_dir": str(out),
        "data": {"root": str(root), "image_size": SIDE, "min_images": min_images},
        "augment": {"flip": True},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 8}},
        "loss": {"name": "npair", "l2_reg": 0.02} if aux else dynamic,
        "optimizer": {"name": "sgd", "lr": 0.05},
        "batch": {"p": 2, "k": 3} if aux else {"size": 6},
        "train": {"max_steps": 4, "checkpoint_every": 2, "log_every": 1},
    }
    if aux:
        raw["aux_loss"] = [{**dynamic, "weight": 0.25}]
    return raw


def test_a_dynamic_margin_loss_trains_with_the_margins_of_its_class_sizes(faces, tmp_path):
    torch.set_num_threads(1)
    result = train(config_from_dict(_raw(faces, tmp_path / "run", aux=False)), progress=False)
    assert isinstance(result.loss, DynamicMarginArcFaceLoss)
    # min_images = 3 leaves ann (2 images) out: bob 7, cy 3, dee 5, eve 4
    expected = _expected_margins(faces, min_images=3)
    assert len(expected) == 4
    assert result.loss.margin.margins.tolist() == pytest.approx(expected, rel=1e-12)
    assert result.steps == 4 and all(math.isfinite(v) for v in result.losses)


def test_a_dynamic_margin_aux_term_beside_a_pair_loss_gets_the_counts_too(faces, tmp_path):
    torch.set_num_threads(1)
    result = train(config_from_dict(_raw(faces, tmp_path / "run", aux=True, min_images=2)),
                   progress=False)
    assert isinstance(result.loss, WeightedLossSum) and result.loss.weights == [1.0, 0.25]
    term = result.loss.terms[1]
    assert isinstance(term, DynamicMarginArcFaceLoss)
    assert term.margin.margins.tolist() == pytest.approx(
        _expected_margins(faces, min_images=2), rel=1e-12)
    # the margins are a buffer: the checkpoint holds them
    state = load_checkpoint(result.checkpoint)["loss"]
    assert torch.equal(state["terms.1.margin.margins"], term.margin.margins)


def test_compare_builds_the_same_dynamic_margins(faces, tmp_path):
    torch.set_num_threads(1)
    toml = tmp_path / "dyn.toml"
    raw = _raw(faces, tmp_path / "unused", aux=True)
    lines = ["seed = 1", f'output_dir = "{(tmp_path / "unused").as_posix()}"']
    for section in ("data", "augment", "model", "loss", "optimizer", "batch", "train"):
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in raw[section].items()]
    lines.append("[[aux_loss]]")
    lines += [f"{key} = {_toml(value)}" for key, value in raw["aux_loss"][0].items()]
    toml.write_text("\n".join(lines) + "\n")
    load_config(toml)  # the config check builds the term on dummy counts
    result = compare([toml], out_dir=tmp_path / "cmp", budget_steps=2, eval_every=100,
                     seed=1, progress=False)
    margins = load_checkpoint(result.runs[0].checkpoint)["loss"]["terms.1.margin.margins"]
    assert margins.tolist() == pytest.approx(_expected_margins(faces, min_images=3), rel=1e-12)


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)


def test_class_counts_are_data_not_settings():
    config = LossConfig(name="dynamic_margin_arcface",
                        params={"a": A, "b": B, "lam": LAM, "class_counts": [1, 2]})
    with pytest.raises(ValueError, match=r"\['class_counts'\] are set from the data"):
        build_loss(config, 2, 8, torch.tensor([1, 2]))
    bare = LossConfig(name="dynamic_margin_arcface", params={"a": A, "b": B, "lam": LAM})
    with pytest.raises(ValueError, match="needs the training set's images per class"):
        build_loss(bare, 2, 8)
    with pytest.raises(ValueError, match=r"class_counts has shape \(3,\), expected \(2,\)"):
        build_loss(bare, 2, 8, torch.tensor([1, 2, 3]))
    # a loss that takes no counts ignores them: existing configs build as before
    plain = build_loss(LossConfig(name="arcface"), 2, 8, torch.tensor([1, 2]))
    assert type(plain).__name__ == "ArcFaceLoss"


def test_class_counts_of_counts_and_floors_empty_classes_at_one():
    counts = class_counts_of(np.array([0, 0, 2, 2, 2]), 4)
    assert counts.tolist() == [2, 1, 3, 1] and counts.dtype == torch.int64
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[0, 2\]"):
        class_counts_of([0, 2], 2)
