"""TOML → TrainConfig: values, path resolution, unknown keys, type and range errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from facemetric.training.builders import loss_entry
from facemetric.training.config import TrainConfig, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

FULL = """
seed = 7
output_dir = "runs/exp"

[data]
root = "faces"
people_file = "lists/peopleDevTrain.txt"
image_size = 96
min_images = 3
num_workers = 2

[augment]
crop_scale = [0.8, 1]
brightness = 0.25

[model]
name = "iresnet18"
embedding_size = 256
options = { dropout = 0.1 }

[loss]
name = "triplet"
margin = 0.3
miner = "semi_hard"
distance = "cosine"

[loss.miner_params]
margin = 0.3

[optimizer]
name = "adamw"
lr = 1e-3
betas = [0.9, 0.99]

[schedule]
name = "step"
warmup_steps = 10
milestones = [100, 200]

[batch]
p = 8
k = 4

[train]
max_steps = 300
amp = true
amp_dtype = "fp16"
grad_clip = 5
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_full_config_is_parsed_with_types_and_resolved_paths(tmp_path):
    cfg = load_config(_write(tmp_path, FULL))
    assert isinstance(cfg, TrainConfig)
    assert cfg.seed == 7
    assert cfg.output_dir == tmp_path / "runs/exp"
    assert cfg.data.root == tmp_path / "faces"
    assert cfg.data.people_file == tmp_path / "lists/peopleDevTrain.txt"
    assert (cfg.data.image_size, cfg.data.min_images, cfg.data.num_workers) == (96, 3, 2)
    assert cfg.augment.crop_scale == [0.8, 1.0] and isinstance(cfg.augment.crop_scale[1], float)
    assert cfg.model.options == {"dropout": 0.1}
    assert cfg.loss.name == "triplet" and cfg.loss.params == {"margin": 0.3}
    assert cfg.loss.miner == "semi_hard" and cfg.loss.miner_params == {"margin": 0.3}
    assert cfg.loss.distance == "cosine"
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.schedule.milestones == [100, 200]
    assert cfg.batch.uses_pk and cfg.batch.effective_size == 32
    assert cfg.train.grad_clip == 5.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.train.amp and cfg.train.amp_dtype == "fp16"
    # defaults for what is not given
    assert cfg.train.epochs == 1 and cfg.train.log_every == 50 and cfg.augment.flip


def test_round_trip_through_to_dict(tmp_path):
    cfg = load_config(_write(tmp_path, FULL))
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(("text", "pattern"), [
    ("sed = 1", r"unknown key 'sed'.*valid top-level keys.*'seed'"),
    ("[optimizer]\nlr = 0.1\nlrr = 2", r"unknown key 'lrr' in \[optimizer\]; valid keys: .*'lr'"),
    ("[batch]\nsize = 8\npk = 2",
     r"unknown key 'pk' in \[batch\]; valid keys: \['k', 'min_images', 'p',"),
    ("[train]\nsteps = 3", r"\[train\].*valid keys:.*'max_steps'"),
])
def test_unknown_keys_are_named_with_the_valid_ones(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(_write(tmp_path, text), check_loss=False)


@pytest.mark.parametrize(("text", "pattern"), [
    ('[optimizer]\nlr = "fast"', r"\[optimizer\] lr: expected a number, got 'fast' \(str\)"),
    ("[data]\nimage_size = 112.5", r"\[data\] image_size: expected an integer, got 112.5"),
    ("[train]\namp = 1", r"\[train\] amp: expected true or false, got 1 \(int\)"),
    ("[data]\nnum_workers = true", r"num_workers: expected an integer, got True \(bool\)"),
    ("[augment]\ncrop_scale = 0.9", r"crop_scale: expected a list of numbers"),
    ('[schedule]\nmilestones = [1, "x"]', r"milestones\[1\]: expected an integer"),
    ("data = 3", r"\[data\] must be a table"),
    ("[model]\noptions = 3", r"options: expected a table"),
])
def test_type_errors_are_explained(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(_write(tmp_path, text), check_loss=False)


@pytest.mark.parametrize(("text", "pattern"), [
    ("[batch]\np = 4", "give both p and k"),
    ("[batch]\np = 1\nk = 4", "p and k must be >= 2"),
    ("[batch]\np = 4\nk = 4\nmin_images = 0", r"\[batch\] min_images must be >= 1, got 0"),
    ("[batch]\nsize = 8\nmin_images = 1", r"min_images applies to P×K batches only"),
    ('[loss]\nname = "magnet"\n[batch]\np = 4\nk = 4\nmin_images = 1',
     r"with \[magnet\] the batches come from the magnet clusters"),
    ('[train]\namp_dtype = "fp8"', "amp_dtype must be one of"),
    ('[optimizer]\nname = "adam"', "name must be one of"),
    ("[optimizer]\nlr = -1", "lr must be > 0"),
    ("[schedule]\nmilestones = [5, 3]", "milestones must be increasing"),
    ("[augment]\ncrop_scale = [0.9, 0.5]", "crop_scale must be"),
    ("[augment]\npose_yaw = 90", r"pose_yaw must be in \[0, 90\) degrees, got 90"),
    ("[augment]\npose_prob = 1.5", r"pose_prob must be in \[0, 1\]"),
    ("[augment]\npose_scale = [1.1, 0.9]", "pose_scale must be"),
    ("[train]\ngrad_clip = 0", "grad_clip must be > 0"),
    ("[train]\nmax_steps = 0", "max_steps must be >= 1"),
    ('[optimizer]\nname = "adamw"\n[partial_fc]\nsample_rate = 0.1\nsparse_update = true',
     'sparse_update needs \\[optimizer\\] name = "sgd"'),
    ("x = [", "invalid TOML"),
])
def test_out_of_range_values_are_refused(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(_write(tmp_path, text), check_loss=False)


def test_loss_section_is_checked_against_the_loss(tmp_path):
    base = '[batch]\np = 2\nk = 2\n[loss]\nname = "triplet"\n'
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['margn'\]; valid: .*'margin'"):
        load_config(_write(tmp_path, base + "margn = 0.1\n"))
    with pytest.raises(ValueError, match=r"unknown loss 'tripletz'; available: .*'triplet'"):
        load_config(_write(tmp_path, '[loss]\nname = "tripletz"\n'))
    with pytest.raises(ValueError, match=r"unknown miner 'hardest'; available: .*'batchhard'"):
        load_config(_write(tmp_path, base + 'miner = "hardest"\n'))
    with pytest.raises(ValueError, match="not a table"):
        load_config(_write(tmp_path, base + "[loss.extra]\na = 1\n"))
    assert load_config(_write(tmp_path, base + "margin = 0.1\n")).loss.params == {"margin": 0.1}


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")),
                         ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_example_configs_parse(path):
    cfg = load_config(path, check_loss=False)
    assert cfg.output_dir.is_absolute() and cfg.data.root.is_absolute()
    loss_entry(cfg.loss.name)  # a name that does not resolve is a broken example: it fails
    load_config(path)  # the [loss] section fits the loss's constructor


def test_a_config_naming_an_unknown_loss_fails(tmp_path):
    path = _write(tmp_path, '[loss]\nname = "arcfase"\n')
    with pytest.raises(ValueError, match=r"unknown loss 'arcfase'; available: .*'arcface'"):
        load_config(path)


def test_example_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.toml")}
    assert {"arcface_mobilefacenet.toml", "triplet_iresnet50.toml"} <= names


AUX = """
[batch]
p = 4
k = 2

[loss]
name = "npair"
l2_reg = 0.02

[[aux_loss]]
name = "arcface"
weight = 0.5
scale = 32.0
margin = 0.3

[[aux_loss]]
name = "triplet"
miner = "semi_hard"
distance = "cosine"
margin = 0.2
"""


def test_aux_loss_sections_are_read_in_order_and_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, AUX))
    first, second = cfg.aux_loss
    assert (first.name, first.weight, first.params) == ("arcface", 0.5,
                                                        {"scale": 32.0, "margin": 0.3})
    assert (second.name, second.weight, second.miner, second.distance, second.params) == (
        "triplet", 1.0, "semi_hard", "cosine", {"margin": 0.2})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert load_config(_write(tmp_path, FULL)).aux_loss == []


@pytest.mark.parametrize(("extra", "pattern"), [
    ('[[aux_loss]]\nname = "arcface"\nweight = 0\n', r"\[\[aux_loss\]\] 1: weight must be a "
     r"finite number > 0, got 0.0 \(remove the section"),
    ('[[aux_loss]]\nname = "arcface"\nweight = "big"\n', r"\[\[aux_loss\]\] 1: \[aux_loss\] "
     r"weight: expected a number"),
    ('[[aux_loss]]\nweight = 1\n', r"\[\[aux_loss\]\] 1: name is required"),
    ('aux_loss = 3\n', "aux_loss must be an array of tables"),
    ('[[aux_loss]]\nname = "arcface"\n[partial_fc]\nsample_rate = 0.5\n',
     r"does not combine with \[partial_fc\]"),
    ('[[aux_loss]]\nname = "magnet"\n', "hierarchical triplet or magnet"),
])
def test_aux_loss_errors_name_the_section(tmp_path, extra, pattern):
    top, extra = (extra, "") if extra.startswith("aux_loss =") else ("", extra)
    text = top + '[batch]\np = 4\nk = 2\n[loss]\nname = "npair"\n' + extra
    with pytest.raises(ValueError, match=pattern):
        load_config(_write(tmp_path, text), check_loss=False)


def test_aux_loss_parameters_are_checked_against_its_loss(tmp_path):
    text = AUX.replace("margin = 0.3", "margn = 0.3")
    with pytest.raises(ValueError, match=r"\[\[aux_loss\]\] 1: .*unknown parameter\(s\) "
                                         r"\['margn'\]"):
        load_config(_write(tmp_path, text))
