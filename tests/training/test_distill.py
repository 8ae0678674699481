"""Distillation in the training loop: the items carry the teacher's own embeddings, the
objective has the configured terms, resume stays exact, ``facemetric distill`` runs, and
bad ``[distill]`` sections are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facemetric.cli import main
from facemetric.data.images import load_image
from facemetric.inference import load_model
from facemetric.losses.distillation import (
    DistillationObjective,
    EmbeddingDistillationLoss,
    RKDDistanceLoss,
)
from facemetric.training import config_from_dict, latest_checkpoint, save_checkpoint, train
from facemetric.training.builders import build_model
from facemetric.training.distill import TeacherTargets, attach_teacher

SIDE = 112  # the aligned (arcface112) images; the student reads them at 24 px


class _KilledError(Exception):
    pass


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """(aligned folder of 5 identities × 3 faces, a teacher run folder)."""
    base = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    faces = base / "faces"
    for i in range(5):
        (faces / f"P{i}").mkdir(parents=True)
        pattern = rng.integers(0, 256, (4, 4, 3))
        for k in range(3):
            img = np.kron(pattern, np.ones((SIDE // 4, SIDE // 4, 1)))
            img = img + rng.normal(0, 20, (SIDE, SIDE, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                faces / f"P{i}" / f"{k}.png")
    teacher_cfg = config_from_dict({
        "output_dir": str(base / "teacher"), "data": {"root": str(faces), "image_size": 24},
        "model": {"name": "small_cnn", "embedding_size": 6, "options": {"width": 4}},
        "loss": {"name": "arcface"}})
    torch.manual_seed(5)
    model = build_model(teacher_cfg.model)
    save_checkpoint({"step": 0, "model": model.state_dict(), "config": teacher_cfg.to_dict()},
                    base / "teacher", 0)
    return faces, base / "teacher"


def _config(faces: Path, teacher: Path, out: Path, **distill):
    return config_from_dict({
        "seed": 1, "output_dir": str(out),
        "data": {"root": str(faces), "image_size": 24},
        "augment": {"flip": True, "padding": 2, "crop_scale": [0.8, 1.0], "brightness": 0.2},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 4}},
        "loss": {"name": "arcface", "scale": 16.0, "margin": 0.2},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "batch": {"size": 6},
        "train": {"max_steps": 6, "checkpoint_every": 3, "log_every": 1, "device": "cpu"},
        "distill": {"teacher": str(teacher), **distill},
    })


def test_items_carry_the_teachers_embedding_of_their_image(tree, tmp_path):
    faces, teacher = tree
    from facemetric.training.loop import build_dataset

    config = _config(faces, teacher, tmp_path / "run")
    data = attach_teacher(config, build_dataset(config), progress=False)
    assert isinstance(data, TeacherTargets) and len(data) == 15
    encoder = load_model(teacher)
    want = encoder.embed_faces(np.stack([load_image(p) for p, _ in data.samples]))
    for i in range(len(data)):
        image, label, row = data[i]
        assert image.shape == (SIDE, SIDE, 3)  # the raw face: augmented later
        assert label == data.targets[i]
        np.testing.assert_allclose(row.numpy(), want[i], atol=1e-5)
    assert data.num_classes == 5


def test_objective_has_the_configured_terms_and_learns(tree, tmp_path):
    faces, teacher = tree
    torch.set_num_threads(1)
    config = _config(faces, teacher, tmp_path / "run", embedding=5.0, rkd_distance=1.0,
                     label=0.5)
    config.train.max_steps = 30
    config.train.checkpoint_every = 30
    result = train(config, progress=False)
    objective = result.loss
    assert isinstance(objective, DistillationObjective)
    assert objective.label_weight == 0.5
    assert isinstance(objective.terms["embedding"], EmbeddingDistillationLoss)
    assert objective.terms["embedding"].projection is not None  # student 8-d, teacher 6-d
    assert isinstance(objective.terms["rkd_distance"], RKDDistanceLoss)
    assert set(objective.last) == {"label", "embedding", "rkd_distance"}
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])


def test_resume_is_exact_with_a_teacher(tree, tmp_path):
    faces, teacher = tree
    torch.set_num_threads(1)
    kw = {"embedding": 2.0, "rkd_angle": 1.0, "similarity": 1.0}
    straight = train(_config(faces, teacher, tmp_path / "straight", **kw), progress=False)

    def kill(info):
        if info.step == 4:
            raise _KilledError

    out = tmp_path / "killed"
    with pytest.raises(_KilledError):
        train(_config(faces, teacher, out, **kw), progress=False, on_step=kill)
    assert latest_checkpoint(out).name == "checkpoint_000000003.pt"
    resumed = train(_config(faces, teacher, out, **kw), resume=True, progress=False)
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in straight.loss.state_dict().items():
        assert torch.equal(value, resumed.loss.state_dict()[name]), name


def test_distill_command(tree, tmp_path, capsys):
    faces, teacher = tree
    toml = tmp_path / "student.toml"
    toml.write_text(
        f'output_dir = "{tmp_path / "run"}"\n'
        f'[data]\nroot = "{faces}"\nimage_size = 24\n'
        '[model]\nname = "small_cnn"\nembedding_size = 6\noptions = { width = 4 }\n'
        '[loss]\nname = "arcface"\n[batch]\nsize = 6\n'
        '[train]\nmax_steps = 2\ncheckpoint_every = 2\ndevice = "cpu"\n'
        '[distill]\nembedding = 1.0\n')
    assert main(["distill", "--teacher", str(teacher), "--config", str(toml)]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    stored = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=False)
    assert stored["config"]["distill"]["teacher"] == str(teacher)
    assert "terms.embedding" not in str(stored["model"].keys())  # the backbone alone


@pytest.mark.parametrize(("distill", "message"), [
    ({"embedding": 0.0}, "needs a distillation term"),
    ({"embedding_kind": "kl"}, "embedding_kind"),
    ({"rkd_angle": -1.0}, "rkd_angle must be >= 0"),
    ({"workers": 0}, "workers and chunk"),
])
def test_bad_distill_sections_are_refused(tree, tmp_path, distill, message):
    faces, teacher = tree
    with pytest.raises(ValueError, match=message):
        _config(faces, teacher, tmp_path / "run", **distill)


def test_distill_refuses_global_mining(tree, tmp_path):
    faces, teacher = tree
    with pytest.raises(ValueError, match="does not combine"):
        config_from_dict({
            "data": {"root": str(faces)}, "loss": {"name": "triplet"},
            "batch": {"p": 4, "k": 2}, "mining": {"global_index": True, "neighbours": 1},
            "distill": {"teacher": str(teacher)}})


def test_a_teacher_initialised_dlib_student(tree, tmp_path):
    """``[model] name = "dlib_resnet", options = {weights = "dlib"}``: the student starts from
    dlib's weights (here at 112 px), trains, and its run loads as an arcface112 encoder."""
    pytest.importorskip("dlib")
    from facemetric.models.dlib_resnet import dlib_resnet

    faces, teacher = tree
    cfg = config_from_dict({
        "seed": 1, "output_dir": str(tmp_path / "dlib_student"),
        "data": {"root": str(faces), "image_size": SIDE},
        "model": {"name": "dlib_resnet", "embedding_size": 128,
                  "options": {"input_size": SIDE, "weights": "dlib"}},
        "loss": {"name": "arcface"},
        "optimizer": {"name": "adamw", "lr": 1e-5, "weight_decay": 0.0},
        "batch": {"size": 6},
        "train": {"max_steps": 2, "checkpoint_every": 2, "log_every": 1, "device": "cpu"},
        "distill": {"teacher": str(teacher), "label": 0.0, "embedding": 1.0},
    })
    result = train(cfg, progress=False)
    dlib_weights = dlib_resnet(weights="dlib", input_size=SIDE).state_dict()
    random_init = dlib_resnet(input_size=SIDE).state_dict()
    trained = result.model.state_dict()
    moved = max((trained[k] - dlib_weights[k]).abs().max().item() for k in dlib_weights)
    far = max((random_init[k] - dlib_weights[k]).abs().max().item() for k in dlib_weights)
    assert 0 < moved < 1e-3 < far  # trained, from dlib's weights, not from scratch
    encoder = load_model(tmp_path / "dlib_student", flip_test=False)
    assert encoder.contract.backbone == "dlib_resnet" and encoder.contract.input_size == SIDE
    image = load_image(next(faces.glob("P0/*.png")))
    x = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(result.model.eval()(x), dim=1).numpy()
    assert np.abs(encoder.embed_faces(image[None]) - expected).max() < 1e-5
