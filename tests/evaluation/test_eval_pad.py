"""ISO/IEC 30107-3 PAD metrics against hand-worked cases and brute-force counts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facemetric.evaluation.pad import (
    bpcer_at_apcer,
    det_curve,
    pad_errors,
    pad_report,
    plot_det,
    select_threshold,
)

# 4 attacks, 5 bona fide (worked by hand in the comments below)
ATTACK = [0.9, 0.8, 0.3, 0.7]
BONA = [0.1, 0.2, 0.4, 0.85, 0.05]
SCORES = np.array(ATTACK + BONA)
IS_ATTACK = np.array([True] * 4 + [False] * 5)


@pytest.mark.parametrize(
    ("tau", "apcer", "bpcer"),
    [
        (0.5, 1 / 4, 1 / 5),  # attack 0.3 passes; bona fide 0.85 rejected
        (0.3, 0.0, 2 / 5),  # attack at exactly τ is caught; bona fide 0.4, 0.85 rejected
        (0.85, 3 / 4, 1 / 5),  # bona fide at exactly τ is rejected
        (0.0, 0.0, 1.0),
        (1.0, 1.0, 0.0),
    ],
)
def test_apcer_bpcer_acer_hand_worked(tau, apcer, bpcer):
    e = pad_errors(SCORES, IS_ATTACK, tau)
    assert e.apcer == pytest.approx(apcer, abs=1e-15)
    assert e.bpcer == pytest.approx(bpcer, abs=1e-15)
    assert e.acer == pytest.approx((apcer + bpcer) / 2, abs=1e-15)
    assert (e.attacks, e.bona_fide) == (4, 5)


def test_apcer_is_the_worst_species():
    species = ["print", "print", "replay", "replay", "-", "-", "-", "-", "-"]
    e = pad_errors(SCORES, IS_ATTACK, 0.5, species=species)
    # print attacks 0.9, 0.8 are both caught; replay 0.3 passes, 0.7 is caught
    assert e.apcer_by_species == {"print": 0.0, "replay": 0.5}
    assert e.apcer == 0.5
    assert e.bpcer == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("target", "bpcer", "threshold"),
    [
        (0.25, 0.2, 0.7),  # one attack may pass: τ = 2nd lowest attack score
        (0.5, 0.2, 0.8),
        (0.75, 0.0, 0.9),  # three may pass: τ = 0.9 rejects no bona fide
        (0.3, 0.2, 0.7),  # floor(0.3 · 4) = 1
    ],
)
def test_bpcer_at_apcer_hand_worked(target, bpcer, threshold):
    r = bpcer_at_apcer(SCORES, IS_ATTACK, target)
    assert r.resolved
    assert r.bpcer == pytest.approx(bpcer)
    assert r.threshold == threshold
    assert pad_errors(SCORES, IS_ATTACK, r.threshold).apcer <= target


@pytest.mark.parametrize("target", [0.1, 0.24, 0.05, 0.01])
def test_bpcer_at_apcer_unresolved_below_one_attack(target):
    r = bpcer_at_apcer(SCORES, IS_ATTACK, target)
    assert not r.resolved and r.bpcer is None and r.threshold is None
    assert "unresolved" in str(r) and "4 attacks" in str(r)


def test_bpcer_at_apcer_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    s = np.round(rng.random(300), 2)  # many ties
    y = rng.random(300) < 0.4
    for target in (0.01, 0.05, 0.1, 0.3):
        best = None
        for t in np.append(np.unique(s), np.inf):  # every distinct decision
            apcer = np.sum(s[y] < t) / y.sum()
            bpcer = np.sum(s[~y] >= t) / (~y).sum()
            if apcer <= target and (best is None or bpcer < best):
                best = bpcer
        got = bpcer_at_apcer(s, y, target)
        assert got.bpcer == pytest.approx(best, abs=1e-15)


def test_det_curve_matches_counting():
    det = det_curve(SCORES, IS_ATTACK)
    assert det.thresholds[-1] == np.inf
    for t, a, b in zip(det.thresholds, det.apcer, det.bpcer, strict=True):
        assert a == sum(x < t for x in ATTACK) / 4
        assert b == sum(x >= t for x in BONA) / 5
    assert np.all(np.diff(det.apcer) >= 0) and np.all(np.diff(det.bpcer) <= 0)
    assert (det.attacks, det.bona_fide) == (4, 5)


def test_select_threshold_equal_error_hand_worked():
    # candidates (APCER, BPCER): …, 0.35 → (.25, .4), 0.55 → (.25, .2), 0.75 → (.5, .2), …
    assert select_threshold(SCORES, IS_ATTACK) == pytest.approx(0.55)
    # separable: only the midpoint of the gap makes no error
    assert select_threshold([0.8, 0.9, 0.1, 0.2], [1, 1, 0, 0]) == pytest.approx(0.5)


def test_select_threshold_at_target_apcer():
    assert select_threshold(SCORES, IS_ATTACK, "apcer", 0.25) == pytest.approx(0.55)
    assert select_threshold(SCORES, IS_ATTACK, "apcer", 0.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="target_apcer"):
        select_threshold(SCORES, IS_ATTACK, "apcer")
    with pytest.raises(ValueError, match="unknown threshold rule"):
        select_threshold(SCORES, IS_ATTACK, "eer")


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [0, 0], "both attack and bona fide"),
        ([0.1, float("nan")], [0, 1], "finite"),
        ([0.1, 0.2, 0.3], [0, 1], "differ in length"),
        ([0.1, 0.2], [0, 2], "booleans or 0/1"),
    ],
)
def test_bad_input_says_what_is_wrong(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        pad_errors(scores, labels, 0.5)


def test_report_and_det_png(tmp_path):
    report = pad_report(SCORES, IS_ATTACK, 0.5)
    d = report.to_dict()
    assert d["apcer"] == 0.25 and d["bona_fide"] == 5
    assert d["bpcer_at_apcer"] == {"0.05": None, "0.01": None}
    assert d["unresolved_apcer_targets"] == [0.05, 0.01]
    path = plot_det({"a": report, "b": pad_report(SCORES[::-1], IS_ATTACK, 0.5)},
                    tmp_path / "det.png", title="DET test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (640, 480)
        assert im.info["Title"] == "DET test"
    assert [p.name for p in tmp_path.iterdir()] == ["det.png"]  # no temporary file left
