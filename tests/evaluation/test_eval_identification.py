"""Identification: CMC and open-set DIR/FPIR against hand-worked cases and loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facemetric.evaluation import cmc_curve, open_set_identification, split_gallery_probe


def unit(deg: float) -> list[float]:
    r = np.deg2rad(deg)
    return [float(np.cos(r)), float(np.sin(r))]


def brute_identity_scores(gallery, gallery_labels, probe):
    """{label: max cosine over that label's gallery images}, by loops."""
    out: dict = {}
    for g, lab in zip(gallery, gallery_labels, strict=True):
        s = float(g @ probe / np.linalg.norm(g) / np.linalg.norm(probe))
        out[lab] = max(out.get(lab, -np.inf), s)
    return out


def brute_rank(gallery, gallery_labels, probe, label) -> int:
    scores = brute_identity_scores(gallery, gallery_labels, probe)
    return sum(1 for s in scores.values() if s >= scores[label])


# ------------------------------------------------------------------ CMC


def test_cmc_by_hand_uses_max_over_identity_images():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    gallery_labels = np.array(["A", "A", "B", "C"])
    # p1 (A): cos .6 with A's first image, -.8 with its second -> A scores .6 (max);
    # B -.6, C .8 -> rank 2. (A mean over images, -.1, would give rank 3.)
    # p2 (B) and p3 (C) sit next to their identity -> rank 1.
    probes = np.array([[0.6, -0.8], [-1.0, 0.1], [0.0, -1.0]])
    res = cmc_curve(gallery, gallery_labels, probes, np.array(["A", "B", "C"]))
    np.testing.assert_array_equal(res.probe_ranks, [2, 1, 1])
    np.testing.assert_allclose(res.curve, [2 / 3, 1.0, 1.0])
    assert res.rank1 == pytest.approx(2 / 3)
    assert res.rank5 == res.rank10 == 1.0  # beyond the 3 identities


def test_cmc_matches_loop_with_small_blocks():
    rng = np.random.default_rng(0)
    num_ids, dim = 30, 6
    centres = rng.normal(size=(num_ids, dim))
    gallery_labels = rng.integers(0, num_ids, size=70)
    gallery_labels[:num_ids] = np.arange(num_ids)  # every identity enrolled, some twice+
    gallery = centres[gallery_labels] + rng.normal(scale=1.0, size=(70, dim))
    probe_labels = rng.integers(0, num_ids, size=53)
    probes = centres[probe_labels] + rng.normal(scale=1.0, size=(53, dim))
    res = cmc_curve(
        torch.from_numpy(gallery),
        torch.from_numpy(gallery_labels),
        probes,
        probe_labels,
        max_block_bytes=700,  # a few probes per block
    )
    ranks = [
        brute_rank(gallery, gallery_labels, p, lab)
        for p, lab in zip(probes, probe_labels, strict=True)
    ]
    np.testing.assert_array_equal(res.probe_ranks, ranks)
    expected = [np.mean(np.array(ranks) <= r) for r in range(1, num_ids + 1)]
    np.testing.assert_allclose(res.curve, expected)
    assert 0.0 < res.rank1 < res.at(5) <= res.at(10) <= 1.0


def test_cmc_ties_count_against_the_probe():
    gallery = np.zeros((4, 3))
    res = cmc_curve(gallery, [0, 1, 2, 3], np.ones((2, 3)), [1, 2])
    np.testing.assert_array_equal(res.probe_ranks, [4, 4])
    assert res.rank1 == 0.0 and res.at(4) == 1.0


def test_cmc_refuses_unenrolled_probes():
    with pytest.raises(ValueError, match="no identity in the gallery"):
        cmc_curve(np.eye(2), [0, 1], np.eye(2), [0, 5])


# ------------------------------------------------------------------ open set


def test_open_set_by_hand():
    gallery = np.array([unit(0), unit(90)])  # identities A, B
    mated = [
        [1.0, 0.1],  # A: cos A .995 -> rank 1
        [0.8, 1.0],  # B: cos B .781 > cos A .625 -> rank 1
        [0.2, 1.0],  # A: cos A .196 < cos B .981 -> rank 2, never a hit
    ]
    nonmated = [
        [0.95, np.sqrt(1 - 0.95**2)],  # top .95
        [0.85, np.sqrt(1 - 0.85**2)],  # top .85
        [0.1, -np.sqrt(1 - 0.01)],  # top .1
        [0.0, -1.0],  # top 0
    ]
    probes = np.array(mated + nonmated)
    labels = ["A", "B", "A", "X", "Y", "Z", "W"]
    res = open_set_identification(gallery, ["A", "B"], probes, labels, (0.1, 0.25, 0.5, 1.0))
    assert (res.num_mated, res.num_nonmated) == (3, 4)
    assert res.rank1_rate == pytest.approx(2 / 3)
    # 0.1 < 1/4: not resolvable with 4 non-mated probes.
    assert res.unresolvable_fpirs == (0.1,)
    assert res.dir_at_fpir[0.1] is None and res.threshold_at_fpir[0.1] is None
    # FPIR 1/4 lets one non-mated probe through: τ just above .85 -> only the .995 hit stays.
    assert res.threshold_at_fpir[0.25] == pytest.approx(0.85)
    assert res.dir_at_fpir[0.25] == pytest.approx(1 / 3)
    # FPIR 1/2: τ just above .1 -> both hits.
    assert res.threshold_at_fpir[0.5] == pytest.approx(0.1)
    assert res.dir_at_fpir[0.5] == pytest.approx(2 / 3)
    assert res.threshold_at_fpir[1.0] == -np.inf and res.dir_at_fpir[1.0] == pytest.approx(2 / 3)


def brute_open_set(gallery, gallery_labels, probes, probe_labels, target):
    enrolled = set(gallery_labels.tolist())
    tops, hits = [], []
    for p, lab in zip(probes, probe_labels, strict=True):
        scores = brute_identity_scores(gallery, gallery_labels, p)
        if lab in enrolled:
            if sum(1 for s in scores.values() if s >= scores[lab]) == 1:
                hits.append(scores[lab])
        else:
            tops.append(max(scores.values()))
    num_mated = len(probe_labels) - len(tops)
    # every threshold that changes the non-mated count, smallest first
    candidates = [-np.inf, *sorted(np.nextafter(t, np.inf) for t in set(tops))]
    for tau in candidates:
        if sum(1 for t in tops if t >= tau) / len(tops) <= target:
            return tau, sum(1 for h in hits if h >= tau) / num_mated
    raise AssertionError("unreachable")


def test_open_set_matches_loop():
    rng = np.random.default_rng(1)
    num_ids, dim = 20, 5
    centres = rng.normal(size=(num_ids + 15, dim))
    gallery_labels = np.r_[np.arange(num_ids), rng.integers(0, num_ids, size=15)]
    gallery = centres[gallery_labels] + rng.normal(scale=0.8, size=(35, dim))
    probe_labels = rng.integers(0, num_ids + 15, size=120)  # ids ≥ 20 are unknown
    probes = centres[probe_labels] + rng.normal(scale=0.8, size=(120, dim))
    probes = np.round(probes, 1)  # some equal scores
    targets = (0.02, 0.05, 0.1, 0.3)
    res = open_set_identification(
        gallery, gallery_labels, probes, probe_labels, targets, max_block_bytes=512
    )
    num_nonmated = int((probe_labels >= num_ids).sum())
    assert res.num_nonmated == num_nonmated
    for f in targets:
        if f * num_nonmated < 1:
            assert res.dir_at_fpir[f] is None
            continue
        tau, dir_ = brute_open_set(gallery, gallery_labels, probes, probe_labels, f)
        assert res.threshold_at_fpir[f] == pytest.approx(tau, rel=1e-12)
        assert res.dir_at_fpir[f] == pytest.approx(dir_)
    # the curve: FPIR and DIR fall together as the threshold rises
    assert np.all(np.diff(res.curve_thresholds) < 0)
    assert np.all(np.diff(res.curve_fpir) >= 0) and np.all(np.diff(res.curve_dir) >= 0)
    assert res.curve_dir[-1] == pytest.approx(res.rank1_rate) and res.curve_fpir[-1] == 1.0


def test_open_set_needs_both_kinds_of_probe():
    with pytest.raises(ValueError, match="non-mated"):
        open_set_identification(np.eye(2), [0, 1], np.eye(2), [0, 1])


# ------------------------------------------------------------------ split


def test_split_gallery_probe():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 40, size=400)
    labels[:3] = 99  # an identity of 3 images
    labels[3] = 77  # an identity of 1 image
    split = split_gallery_probe(labels, gallery_per_identity=2, unknown_fraction=0.25, seed=5)
    n_ids = np.unique(labels).size
    assert split.unknown_identities.size == round(0.25 * n_ids)
    assert np.intersect1d(split.gallery, split.probes).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[split.gallery, split.probes]), np.arange(400))
    unknown = set(split.unknown_identities.tolist())
    gallery_count: dict[int, int] = {}
    for i in split.gallery:
        gallery_count[labels[i]] = gallery_count.get(labels[i], 0) + 1
    for lab in np.unique(labels):
        total = int((labels == lab).sum())
        expected = 0 if lab in unknown else min(total, 2)
        assert gallery_count.get(lab, 0) == expected
    # reproducible, and the seed matters
    again = split_gallery_probe(labels, gallery_per_identity=2, unknown_fraction=0.25, seed=5)
    np.testing.assert_array_equal(again.gallery, split.gallery)
    other = split_gallery_probe(labels, gallery_per_identity=2, unknown_fraction=0.25, seed=6)
    assert not np.array_equal(other.gallery, split.gallery)
    # the split feeds open-set identification directly
    emb = rng.normal(size=(400, 8))
    res = open_set_identification(
        emb[split.gallery], labels[split.gallery], emb[split.probes], labels[split.probes]
    )
    assert res.num_nonmated == int(np.isin(labels, split.unknown_identities).sum())


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError):
        split_gallery_probe([0, 1], unknown_fraction=1.0)
    with pytest.raises(ValueError):
        split_gallery_probe([0, 1], gallery_per_identity=0)
