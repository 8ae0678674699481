"""Constrained agglomerative clustering on the k-NN graph against a brute-force float64
greedy reference (same partition), against scikit-learn's exact AgglomerativeClustering
when k covers every neighbour above the threshold, and cannot-link as a property."""

from __future__ import annotations

import numpy as np
import pytest
from clustering_reference import greedy_reference, partition

from facemetric.clustering import (
    cannot_link_violations,
    constrained_agglomerative,
    knn_edges,
    unit_float32,
)


def _blobs(seed: int, n: int, dim: int = 8, centres: int = 4, spread: float = 0.6):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    lab = rng.integers(0, centres, n)
    return c[lab] + spread * rng.normal(size=(n, dim))


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
@pytest.mark.parametrize("seed", range(6))
def test_same_partition_as_brute_force_with_cannot_link(linkage, seed):
    x = _blobs(seed, 24)
    rng = np.random.default_rng(100 + seed)
    photos = rng.integers(0, 14, 24).tolist()  # several faces share photos
    threshold = float(np.quantile((unit_float32(x) @ unit_float32(x).T)[np.triu_indices(24, 1)],
                                  0.7))
    got = constrained_agglomerative(x, threshold, linkage=linkage, photos=photos,
                                    neighbours=23)
    want = greedy_reference(x, threshold, linkage, photos)
    assert partition(got.labels) == set(want)
    assert cannot_link_violations(got.labels, photos) == 0


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
def test_starting_groups_join_new_faces_but_never_each_other(linkage):
    x = _blobs(7, 20, centres=3, spread=0.4)
    groups = [0, 0, 1, 1, 2] + [-1] * 15
    photos = list(range(20))
    threshold = 0.3
    got = constrained_agglomerative(x, threshold, linkage=linkage, photos=photos, groups=groups,
                                    neighbours=19)
    want = greedy_reference(x, threshold, linkage, photos, groups)
    assert partition(got.labels) == set(want)
    assert len({got.labels[0], got.labels[2], got.labels[4]}) == 3


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
@pytest.mark.parametrize("seed", range(3))
def test_knn_graph_equals_sklearn_exact_when_k_covers_the_threshold(linkage, seed):
    from sklearn.cluster import AgglomerativeClustering

    x = _blobs(seed, 300, dim=16, centres=30, spread=0.3)
    u = unit_float32(x).astype(np.float64)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    threshold = 0.8
    k = int((sim >= threshold).sum(1).max())  # covers every neighbour above the threshold
    assert 1 <= k < 30
    got = constrained_agglomerative(x, threshold, linkage=linkage, neighbours=k)
    ref = AgglomerativeClustering(n_clusters=None, distance_threshold=1 - threshold,
                                  metric="cosine", linkage=linkage).fit(x)
    assert partition(got.labels) == partition(ref.labels_)
    assert 25 <= len(set(got.labels.tolist())) < 100  # a real test: neither all-one nor all-single


def test_cannot_link_property_on_random_photos():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        x = rng.normal(size=(n, 6)) + 3 * rng.normal(size=(1, 6))  # one tight blob
        photos = rng.integers(-1, max(2, n // 3), n)
        for linkage in ("average", "single", "complete"):
            res = constrained_agglomerative(x, -1.0, linkage=linkage, photos=photos,
                                            neighbours=n - 1)
            assert cannot_link_violations(res.labels, photos) == 0, (trial, linkage)
            plain = constrained_agglomerative(x, -1.0, linkage=linkage, neighbours=n - 1)
            assert len(set(plain.labels.tolist())) == 1  # everything merges unconstrained
            # the constrained result cannot have fewer clusters than the largest photo
            real = photos[photos >= 0]
            biggest = int(np.bincount(real).max()) if real.size else 1
            assert len(set(res.labels.tolist())) >= biggest


def test_violations_are_counted_by_pairs():
    assert cannot_link_violations([0, 0, 0, 1, -1], [5, 5, 5, 5, 5]) == 3
    assert cannot_link_violations([0, 0, 1], [-1, -1, 2]) == 0


def test_knn_edges_keep_pairs_above_the_threshold_once():
    x = unit_float32(_blobs(1, 50))
    e = knn_edges(x, 0.5, neighbours=49)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    iu = np.triu_indices(50, 1)
    want = {(int(a), int(b)) for a, b in zip(*iu, strict=True) if sim[a, b] >= 0.5}
    assert set(zip(e.u.tolist(), e.v.tolist(), strict=True)) == want
    np.testing.assert_allclose(e.sim, sim[e.u, e.v], rtol=0, atol=1e-12)


def test_bad_input_is_refused_with_a_reason():
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match="linkage"):
        constrained_agglomerative(x, 0.5, linkage="ward")
    with pytest.raises(ValueError, match="NaN"):
        constrained_agglomerative(np.full((3, 4), np.nan), 0.5)
    with pytest.raises(ValueError, match="photos"):
        constrained_agglomerative(x, 0.5, photos=[1, 2])
    with pytest.raises(ValueError, match="starting group"):
        constrained_agglomerative(x, 0.5, photos=[1, 1, 2], groups=[0, 0, -1])
    with pytest.raises(ValueError, match="cosine"):
        constrained_agglomerative(x, 1.5)


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
def test_heap_compaction_changes_nothing(linkage, monkeypatch):
    from facemetric.clustering import graph

    x = _blobs(11, 40, centres=3, spread=0.5)
    photos = np.random.default_rng(11).integers(0, 25, 40)
    want = constrained_agglomerative(x, 0.2, linkage=linkage, photos=photos, neighbours=39)
    calls = []
    original = graph._MergeLoop._compact

    def counting(self):
        calls.append(len(self.heap))
        original(self)

    monkeypatch.setattr(graph._MergeLoop, "_compact_limit", lambda self: len(self.heap) + 3)
    monkeypatch.setattr(graph._MergeLoop, "_compact", counting)
    got = constrained_agglomerative(x, 0.2, linkage=linkage, photos=photos, neighbours=39)
    assert calls  # compaction did run
    assert partition(got.labels) == partition(want.labels)
    assert partition(got.labels) == set(greedy_reference(x, 0.2, linkage, photos.tolist()))
