"""``summarize_seeds``: mean ± std over seeds, paired differences and seed bands, from
hand-made ``compare`` metrics files whose answers are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemetric.experiments.seeds import read_seed_runs, seed_bands, summarize_seeds


def _run(name: str, accuracy: float, loss_level: float, order: str | None,
         steps: int = 10, evals: tuple[int, ...] = (0, 5, 10)) -> dict:
    return {
        "name": name, "loss": name, "wall_seconds": 10.0 * steps,
        "losses": [loss_level] * steps, "step_wall": [float(i + 1) for i in range(steps)],
        "data_order": order,
        "eval": {"steps": list(evals), "wall": [float(s) for s in evals],
                 "accuracy": [accuracy * s / max(evals) for s in evals]},
        "final": {"accuracy": accuracy, "accuracy_std": 0.03, "auc": accuracy + 0.1,
                  "eer": 1.0 - accuracy, "tar_at_far": {"0.001": 0.9, "0.01": accuracy / 2},
                  "num_pairs": 1000},
    }


def _write(out: Path, seed: int, runs: list[dict]) -> None:
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"settings": {"seed": seed}, "runs": runs}))


@pytest.fixture
def three_seeds(tmp_path) -> Path:
    # softmax 0.80/0.82/0.84 (mean 0.82, std 0.02); arcface 0.81/0.86/0.85: differences
    # +0.01/+0.04/+0.01 (mean 0.02, std √(0.0003/... ) computed below by hand)
    for seed, (soft, arc) in enumerate([(0.80, 0.81), (0.82, 0.86), (0.84, 0.85)]):
        order = f"digest{seed}"
        _write(tmp_path, seed, [_run("softmax", soft, 1.0 + seed, order),
                                _run("arcface", arc, 2.0, order),
                                _run("npair", 0.70, 3.0, None if seed == 1 else order)])
    return tmp_path


def test_mean_std_and_paired_difference_known_by_hand(three_seeds):
    result = summarize_seeds(three_seeds, [0, 1, 2])
    soft, arc, npair = result.summaries
    assert result.reference == "softmax"
    assert soft.final["accuracy"].mean == pytest.approx(0.82)
    assert soft.final["accuracy"].std == pytest.approx(0.02)  # (-.02, 0, .02): √(8e-4/2)
    assert soft.final["auc"].mean == pytest.approx(0.92)
    assert soft.final["tar"].values == pytest.approx((0.40, 0.41, 0.42))  # FAR 1e-2 only
    assert soft.difference is None
    # differences .01, .04, .01: mean .02; deviations -.01, .02, -.01 → var 6e-4/2 = 3e-4
    assert arc.difference is not None
    assert arc.difference.mean == pytest.approx(0.02)
    assert arc.difference.std == pytest.approx(math.sqrt(3e-4))
    assert arc.ahead == 3 and arc.paired
    # npair: 0.70 each time, behind at every seed; seed 1 recorded no digest → unpaired
    assert npair.final["accuracy"].std == pytest.approx(0.0)
    assert npair.ahead == 0 and not npair.paired
    text = result.table.read_text()
    assert "| arcface | arcface | 3 | 84.00 ± 2.65% | 81.00 / 86.00 / 85.00 |" in text
    assert "2.00 ± 1.73 pts" in text and "3/3" in text and "(unpaired)" in text
    saved = json.loads(result.metrics_json.read_text())
    assert saved["runs"][1]["difference"]["values"] == pytest.approx([0.01, 0.04, 0.01])
    with Image.open(result.plot) as im:
        assert im.size[0] > im.size[1] > 400


def test_bands_are_the_mean_and_std_over_seeds(three_seeds):
    runs = [r for r in read_seed_runs(three_seeds, [0, 1, 2]) if r.name == "softmax"]
    b = seed_bands(runs)
    # constant losses 1, 2, 3 per seed: mean 2, std 1 at every step
    assert np.allclose(b["loss"], 2.0) and np.allclose(b["loss_std"], 1.0)
    assert b["eval_steps"].tolist() == [0, 5, 10]
    assert np.allclose(b["eval_acc"], [0.0, 0.41, 0.82])
    assert np.allclose(b["eval_acc_std"], [0.0, 0.01, 0.02])
    assert np.allclose(b["wall"], np.arange(1, 11))


def test_seeds_cut_to_the_steps_all_reached(tmp_path):
    _write(tmp_path, 0, [_run("a", 0.8, 1.0, "x", steps=10)])
    _write(tmp_path, 1, [_run("a", 0.8, 3.0, "x", steps=6, evals=(0, 5))])
    b = seed_bands(read_seed_runs(tmp_path, [0, 1]))
    assert b["steps"].tolist() == [1, 2, 3, 4, 5, 6] and np.allclose(b["loss"], 2.0)
    assert b["eval_steps"].tolist() == [0, 5]


def test_a_subset_against_another_reference(three_seeds):
    result = summarize_seeds(three_seeds, [0, 2], runs=["arcface"], reference="softmax",
                             name="arc_only")
    (arc,) = result.summaries
    assert arc.difference is not None
    assert arc.difference.values == pytest.approx((0.01, 0.01))
    assert result.table.name == "arc_only.md" and result.plot.name == "arc_only.png"


def test_clear_errors(three_seeds):
    with pytest.raises(FileNotFoundError, match="seed 5's compare has not finished"):
        summarize_seeds(three_seeds, [0, 5])
    with pytest.raises(ValueError, match="unknown run"):
        summarize_seeds(three_seeds, [0, 1], runs=["cosface"])
    with pytest.raises(ValueError, match="unknown reference"):
        summarize_seeds(three_seeds, [0, 1], reference="cosface")
    with pytest.raises(ValueError, match="distinct"):
        summarize_seeds(three_seeds, [0, 0])
    other = three_seeds / "other"
    _write(other, 0, [_run("a", 0.8, 1.0, "x")])
    _write(other, 1, [_run("b", 0.8, 1.0, "x")])
    with pytest.raises(ValueError, match="same configurations"):
        summarize_seeds(other, [0, 1])
    (other / "seed2").mkdir()
    (other / "seed2" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not a compare metrics\.json"):
        summarize_seeds(other, [0, 2])


def test_the_cli_summarises_a_subset(three_seeds, capsys):
    from facemetric.cli import main

    code = main(["compare-summary", str(three_seeds), "--seeds", "0", "1", "2",
                 "--runs", "softmax", "arcface", "--name", "margins"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "82.00 ± 2.00%" in printed and "npair" not in printed
    assert (three_seeds / "margins.png").is_file()
    with pytest.raises(SystemExit):  # one seed or several, not both
        main(["compare", "--configs", "x.toml", "--steps", "1", "--seed", "1", "--seeds", "2"])
