"""Verification metrics against hand-worked cases, scikit-learn and brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from facemetric.evaluation import (
    cosine_pair_scores,
    equal_error_rate,
    interleaved_folds,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    scores_from_distances,
    tar_at_far,
    verification_report,
)


def brute_kfold(scores: np.ndarray, same: np.ndarray, fold: np.ndarray):
    """Every candidate threshold of every fold tried in a loop; first (smallest) maximum."""
    thresholds, accuracies = [], []
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        distinct = np.unique(scores[train])
        candidates = [-np.inf]
        candidates += [(distinct[j] + distinct[j + 1]) / 2 for j in range(len(distinct) - 1)]
        candidates.append(np.inf)
        best, best_correct = None, -1
        for c in candidates:
            correct = sum(
                int((s >= c) == y) for s, y in zip(scores[train], same[train], strict=True)
            )
            if correct > best_correct:
                best, best_correct = c, correct
        thresholds.append(best)
        accuracies.append(np.mean((scores[test] >= best) == same[test]))
    return np.array(thresholds), np.array(accuracies)


def brute_tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float | None:
    neg = scores[~same]
    if far < 1 / neg.size:
        return None
    best = 0.0
    for t in np.unique(scores):
        if np.mean(neg >= t) <= far + 1e-12:
            best = max(best, float(np.mean(scores[same] >= t)))
    return best


# ------------------------------------------------------------------ hand-worked


def test_roc_auc_eer_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = np.array([True, True, False, True, False, False])
    roc = roc_curve(scores, same)
    np.testing.assert_allclose(roc.tar, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(roc.far, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(roc.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # positives .9 .8 .6 against negatives .7 .5 .4: 3 + 3 + 2 of 9 orderings right
    assert roc_auc(roc) == pytest.approx(8 / 9)
    # at τ = 0.7: FAR = 1/3 (the 0.7 negative), FRR = 1/3 (the 0.6 positive)
    assert equal_error_rate(roc) == pytest.approx((1 / 3, 0.7))


def test_eer_interpolates_between_roc_points():
    # P = 2, N = 1: FAR jumps 0 → 1 between τ = .9 and .8 while FRR stays 1/2; the crossing
    # is half-way along that segment.
    roc = roc_curve([0.9, 0.8, 0.7], [True, False, True])
    eer, threshold = equal_error_rate(roc)
    assert eer == pytest.approx(0.5)
    assert threshold == pytest.approx(0.85)


def test_kfold_by_hand():
    # fold 0: (.9 same) (.2 diff); fold 1: (.6 same) (.4 diff) (.8 diff)
    scores = np.array([0.9, 0.2, 0.6, 0.4, 0.8])
    same = np.array([True, False, True, False, False])
    fold = np.array([0, 0, 1, 1, 1])
    # test fold 0, train fold 1: candidates -inf (1/3), .5 (2/3), .7 (1/3), +inf (2/3)
    # -> smallest best .5 -> fold 0 fully right. test fold 1, train fold 0: .55 best
    # -> .6 accepted, .4 rejected, .8 wrongly accepted: 2/3.
    res = kfold_accuracy(scores, same, fold)
    np.testing.assert_allclose(res.thresholds, [0.5, 0.55])
    np.testing.assert_allclose(res.fold_accuracies, [1.0, 2 / 3])
    assert res.accuracy == pytest.approx(5 / 6)
    assert res.accuracy_std == pytest.approx((1 / 3) / np.sqrt(2))  # ddof = 1
    assert res.accuracy_sem == pytest.approx(res.accuracy_std / np.sqrt(2))
    np.testing.assert_array_equal(res.fold_ids, [0, 1])


def test_all_scores_tied_leave_only_accept_all_or_reject_all():
    scores = np.full(8, 0.3)
    same = np.array([True, True, True, False, True, False, True, False])
    res = kfold_accuracy(scores, same, np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    # training on fold 1 (2:2 positives:negatives) ties -inf and +inf: the smaller wins;
    # training on fold 0 (3:1) accepts all. Accepting all is right 3/4 and 2/4 of the time.
    np.testing.assert_array_equal(res.thresholds, [-np.inf, -np.inf])
    np.testing.assert_allclose(res.fold_accuracies, [3 / 4, 2 / 4])
    roc = roc_curve(scores, same)
    assert roc.far.tolist() == [0.0, 1.0] and roc.tar.tolist() == [0.0, 1.0]
    assert roc_auc(roc) == pytest.approx(0.5)


def test_tar_at_far_by_hand_and_unresolvable():
    # 4 negatives: FAR resolution 1/4.
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.1])
    same = np.array([True, False, True, True, False, True, False, False])
    roc = roc_curve(scores, same)
    tars, ths, unresolvable = tar_at_far(roc, (0.1, 0.25, 0.5, 1.0))
    assert unresolvable == (0.1,)
    assert tars[0.1] is None and ths[0.1] is None
    assert tars[0.25] == pytest.approx(3 / 4) and ths[0.25] == pytest.approx(0.8)
    assert tars[0.5] == 1.0 and ths[0.5] == pytest.approx(0.6)
    assert tars[1.0] == 1.0


# ------------------------------------------------------------------ oracles


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_roc_and_auc_match_sklearn_with_and_without_ties(decimals):
    rng = np.random.default_rng(3)
    same = rng.random(500) < 0.4
    scores = rng.normal(size=500) + same
    if decimals is not None:
        scores = np.round(scores, decimals)
    roc = roc_curve(scores, same)
    far, tar, th = sk_roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc.far, far, rtol=0, atol=1e-15)
    np.testing.assert_allclose(roc.tar, tar, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(roc.thresholds, th)
    assert roc_auc(roc) == pytest.approx(roc_auc_score(same, scores), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fold_kind", ["explicit", "interleaved"])
def test_kfold_matches_brute_force(decimals, fold_kind):
    rng = np.random.default_rng(7)
    n = 300
    same = rng.random(n) < 0.5
    scores = rng.normal(size=n) + 1.2 * same
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties
    fold = rng.integers(0, 6, size=n) if fold_kind == "explicit" else np.arange(n) % 6
    res = kfold_accuracy(scores, same, fold if fold_kind == "explicit" else 6)
    ths, accs = brute_kfold(scores, same, fold)
    np.testing.assert_array_equal(res.thresholds, ths)
    np.testing.assert_array_equal(res.fold_accuracies, accs)
    assert res.accuracy == pytest.approx(accs.mean())
    assert res.accuracy_std == pytest.approx(np.std(accs, ddof=1))


def test_kfold_with_a_fold_of_only_positives():
    rng = np.random.default_rng(11)
    n = 120
    same = rng.random(n) < 0.5
    fold = np.arange(n) % 4
    same[fold == 2] = True  # fold 2 has no negative
    scores = rng.normal(size=n) + same
    res = kfold_accuracy(scores, same, fold)
    ths, accs = brute_kfold(scores, same, fold)
    np.testing.assert_array_equal(res.thresholds, ths)
    np.testing.assert_array_equal(res.fold_accuracies, accs)
    # Only positives in the training data: accept everything.
    only_pos = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    res = kfold_accuracy(np.linspace(0, 1, 20), only_pos, np.repeat([0, 1], 10))
    assert res.thresholds[1] == -np.inf and res.thresholds[0] == np.inf
    np.testing.assert_array_equal(res.fold_accuracies, [0.0, 0.0])


def test_interleaved_folds_handle_sorted_protocol_files():
    # pairsDev*.txt order: all matched first. Interleaving keeps both classes in each fold.
    n = 200
    same = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    scores = np.random.default_rng(0).normal(size=n) + 2 * same
    folds = interleaved_folds(n, 10)
    np.testing.assert_array_equal(folds, np.arange(n) % 10)
    for f in range(10):
        assert same[folds == f].sum() == 10 and (~same[folds == f]).sum() == 10
    a = kfold_accuracy(scores, same, 10)
    b = kfold_accuracy(scores, same, folds)
    np.testing.assert_array_equal(a.thresholds, b.thresholds)
    assert a.accuracy == b.accuracy > 0.8


def test_tar_at_far_matches_brute_force():
    rng = np.random.default_rng(5)
    same = rng.random(2000) < 0.3
    scores = np.round(rng.normal(size=2000) + 2 * same, 2)
    roc = roc_curve(scores, same)
    targets = (1e-4, 1e-3, 3e-3, 1e-2, 1e-1, 0.5)
    tars, ths, unresolvable = tar_at_far(roc, targets)
    for f in targets:
        expected = brute_tar_at_far(scores, same, f)
        if expected is None:
            assert tars[f] is None and f in unresolvable
        else:
            assert tars[f] == pytest.approx(expected, abs=0)
            assert np.mean(scores[~same] >= ths[f]) <= f + 1e-12
    assert unresolvable == (1e-4,)  # about 1400 negatives


def test_eer_threshold_balances_error_rates():
    rng = np.random.default_rng(9)
    same = rng.random(20000) < 0.5
    scores = rng.normal(size=20000) + 2 * same
    eer, threshold = equal_error_rate(roc_curve(scores, same))
    far = np.mean(scores[~same] >= threshold)
    frr = np.mean(scores[same] < threshold)
    assert abs(far - eer) < 2e-3 and abs(frr - eer) < 2e-3
    # two unit-variance Gaussians 2 apart: EER = Φ(−1) ≈ 0.1587
    assert eer == pytest.approx(0.1587, abs=0.01)


# ------------------------------------------------------------------ report and helpers


def test_report_fields_and_summary():
    rng = np.random.default_rng(1)
    same = np.tile(np.r_[np.ones(300, bool), np.zeros(300, bool)], 10)
    scores = rng.normal(size=6000) + 2.5 * same
    fold = np.repeat(np.arange(10), 600)
    rep = verification_report(scores, same, folds=fold)
    kf = kfold_accuracy(scores, same, fold)
    assert rep.accuracy == kf.accuracy and rep.accuracy_std == kf.accuracy_std
    np.testing.assert_array_equal(rep.thresholds, kf.thresholds)
    assert rep.thresholds.shape == (10,)
    assert rep.auc == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    assert rep.num_positives == rep.num_negatives == 3000
    assert rep.unresolvable_fars == (1e-6, 1e-5, 1e-4)
    assert [rep.tar_at_far[f] is None for f in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)] == [
        True, True, True, False, False, False,
    ]  # fmt: skip
    text = str(rep)
    assert "TAR@FAR=1e-06: unresolvable" in text and "TAR@FAR=0.1: " in text
    assert "TAR@FAR=1e-03: " in text and "nan" not in text.lower()


def test_cosine_pair_scores_and_distances():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(50, 8))
    b = rng.normal(size=(50, 8))
    expected = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(cosine_pair_scores(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(
        cosine_pair_scores(torch.from_numpy(a).float(), torch.from_numpy(b).float()),
        expected,
        atol=1e-6,
    )
    d = rng.random(50)
    np.testing.assert_array_equal(scores_from_distances(d), -d)
    same = rng.random(50) < 0.5
    # Distances through the helper give the ROC of the negated scores.
    assert roc_auc(roc_curve(scores_from_distances(d), same)) == pytest.approx(
        roc_auc_score(same, -d)
    )


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        kfold_accuracy([0.1, np.nan, 0.3, 0.4], [True, False, True, False], 2)
    with pytest.raises(ValueError, match="shape"):
        kfold_accuracy([0.1, 0.2, 0.3], [True, False], 2)
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy([0.1, 0.2], [True, False], np.array([3, 3]))
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="booleans"):
        roc_curve([0.1, 0.2], [0.5, 1.0])
    with pytest.raises(ValueError, match="FAR targets"):
        tar_at_far(roc_curve([0.1, 0.2], [True, False]), (0.0,))
