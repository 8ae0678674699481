"""The main job's pieces that can be checked without a 15-minute run."""

from __future__ import annotations

from pathlib import Path

from facemetric.cli import main
from facemetric.experiments.lfw_demo import demo_config, has_lfw, load_demo_config
from facemetric.training import config_from_dict


def test_demo_config_is_a_valid_consistent_training_config(tmp_path):
    default_steps = load_demo_config()["train"]["max_steps"]
    raw = demo_config(tmp_path / "aligned", tmp_path / "people.txt", tmp_path / "out", 7)
    config = config_from_dict(raw)
    assert config.train.max_steps == 7
    assert config.data.root == tmp_path / "aligned"
    assert config.data.people_file == tmp_path / "people.txt"
    assert config.output_dir == tmp_path / "out" / "train"
    # the model's input side must be the size the data pipeline produces
    assert config.model.options["input_size"] == config.data.image_size
    assert config.data.min_images == 1  # one-image identities are extra negatives
    assert config.loss.name == "arcface"
    # the file's default is left untouched by the override
    assert load_demo_config()["train"]["max_steps"] == default_steps != 7
    assert "output_dir" not in load_demo_config()


def test_has_lfw_needs_images_and_both_protocol_files(tmp_path):
    lfw = tmp_path / "lfw"
    (lfw / "lfw-deepfunneled").mkdir(parents=True)
    assert not has_lfw(tmp_path)
    (lfw / "peopleDevTrain.txt").write_text("0\n")
    assert not has_lfw(tmp_path)
    (lfw / "pairsDevTest.txt").write_text("0\n")
    assert has_lfw(tmp_path)


def test_demo_without_any_data_says_where_to_get_it(tmp_path: Path, capsys):
    code = main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert "no LFW under" in captured.out  # it falls back to ORL first
    assert "orl" in captured.err and "s1..s40" in captured.err
