"""Clustering metrics and algorithms against scikit-learn, loops and hand-worked cases."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import (
    adjusted_mutual_info_score,
    fowlkes_mallows_score,
    normalized_mutual_info_score,
    pair_confusion_matrix,
)

from facemetric.evaluation import (
    adjusted_mutual_info,
    agglomerative_clustering,
    bcubed_scores,
    clustering_report,
    kmeans,
    normalized_mutual_info,
    pairwise_scores,
    threshold_clustering,
)


def canonical(labels) -> list[int]:
    """Relabel by first appearance, so equal partitions compare equal."""
    seen: dict = {}
    return [seen.setdefault(lab, len(seen)) for lab in np.asarray(labels).tolist()]


def random_labelings(seed: int, n: int, classes: int, clusters: int):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, classes, size=n)
    p = np.where(rng.random(n) < 0.6, t % clusters, rng.integers(0, clusters, size=n))
    return t, p


def unit(deg):
    r = np.deg2rad(np.asarray(deg, dtype=float))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


# ------------------------------------------------------------------ metrics


@pytest.mark.parametrize(
    ("seed", "n", "classes", "clusters"),
    [(0, 50, 3, 4), (1, 500, 20, 15), (2, 2000, 300, 250), (3, 300, 2, 60)],
)
def test_nmi_ami_match_sklearn(seed, n, classes, clusters):
    t, p = random_labelings(seed, n, classes, clusters)
    assert normalized_mutual_info(t, p) == pytest.approx(
        normalized_mutual_info_score(t, p), abs=1e-12
    )
    assert adjusted_mutual_info(t, p) == pytest.approx(adjusted_mutual_info_score(t, p), abs=1e-9)


def test_mutual_info_degenerate_cases():
    same = np.array([3, 3, 7, 7, 9])
    relabelled = np.array(["b", "b", "a", "a", "c"])
    assert normalized_mutual_info(same, relabelled) == pytest.approx(1.0)
    assert adjusted_mutual_info(same, relabelled) == 1.0
    assert normalized_mutual_info([1, 1, 1], [0, 0, 0]) == 1.0
    one = np.zeros(6, dtype=int)
    split = np.array([0, 0, 1, 1, 2, 2])
    assert normalized_mutual_info(one, split) == 0.0
    assert adjusted_mutual_info(one, split) == pytest.approx(0.0, abs=1e-12)
    assert adjusted_mutual_info(split, one) == pytest.approx(
        adjusted_mutual_info_score(split, one), abs=1e-12
    )


def test_pairwise_and_bcubed_by_hand():
    t = [0, 0, 0, 1, 1]
    p = [0, 0, 1, 1, 1]
    # pairs: true C(3,2)+C(2,2)=4, predicted C(2,2)+C(3,2)=4, both: C(2,2)+C(2,2)=2
    pw = pairwise_scores(t, p)
    assert (pw.precision, pw.recall, pw.f1) == pytest.approx((0.5, 0.5, 0.5))
    # BCubed precision per sample: 1, 1, 1/3, 2/3, 2/3; recall: 2/3, 2/3, 1/3, 1, 1
    bc = bcubed_scores(t, p)
    assert (bc.precision, bc.recall, bc.f1) == pytest.approx((11 / 15, 11 / 15, 11 / 15))
    # everything in singletons: no predicted pair -> vacuous precision 1, recall 0
    pw = pairwise_scores(t, np.arange(5))
    assert (pw.precision, pw.recall, pw.f1) == (1.0, 0.0, 0.0)
    bc = bcubed_scores(t, np.arange(5))
    assert bc.precision == 1.0 and bc.recall == pytest.approx((1 / 3 * 3 + 1 / 2 * 2) / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_matches_sklearn_pair_confusion(seed):
    t, p = random_labelings(seed, 400, 12, 9)
    c = pair_confusion_matrix(t, p)  # ordered pairs; rows: true same?, cols: pred same?
    pw = pairwise_scores(t, p)
    assert pw.precision == pytest.approx(c[1, 1] / (c[1, 1] + c[0, 1]))
    assert pw.recall == pytest.approx(c[1, 1] / (c[1, 1] + c[1, 0]))
    assert np.sqrt(pw.precision * pw.recall) == pytest.approx(fowlkes_mallows_score(t, p))


def brute_bcubed(t, p):
    n = len(t)
    precision = recall = 0.0
    for i in range(n):
        same_cluster = [j for j in range(n) if p[j] == p[i]]
        same_class = [j for j in range(n) if t[j] == t[i]]
        both = [j for j in same_cluster if t[j] == t[i]]
        precision += len(both) / len(same_cluster)
        recall += len(both) / len(same_class)
    return precision / n, recall / n


@pytest.mark.parametrize("seed", [0, 1])
def test_bcubed_matches_loop(seed):
    t, p = random_labelings(seed, 150, 7, 10)
    bc = bcubed_scores(t, p)
    precision, recall = brute_bcubed(t.tolist(), p.tolist())
    assert bc.precision == pytest.approx(precision, abs=1e-12)
    assert bc.recall == pytest.approx(recall, abs=1e-12)
    assert bc.f1 == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)


def test_clustering_report_gathers_everything():
    t, p = random_labelings(4, 300, 10, 8)
    rep = clustering_report(t, p)
    assert rep.nmi == normalized_mutual_info(t, p) and rep.ami == adjusted_mutual_info(t, p)
    assert rep.pairwise == pairwise_scores(t, p) and rep.bcubed == bcubed_scores(t, p)
    assert (rep.num_classes, rep.num_clusters) == (10, 8)
    with pytest.raises(ValueError):
        clustering_report([0, 1], [0, 1, 2])


# ------------------------------------------------------------------ k-means


def blobs(seed: int, k: int = 5, per: int = 40, dim: int = 4, spread: float = 0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    labels = np.repeat(np.arange(k), per)
    return centres[labels] + rng.normal(scale=spread, size=(k * per, dim)), labels


def test_kmeans_recovers_separated_blobs_and_is_a_lloyd_fixed_point():
    x, labels = blobs(0)
    res = kmeans(x, 5, seed=0)
    assert res.converged
    assert normalized_mutual_info(labels, res.labels) == pytest.approx(1.0)
    # each sample is at its nearest centroid; each centroid is the mean of its members
    d = ((x[:, None, :] - res.centroids[None].astype(float)) ** 2).sum(-1)
    np.testing.assert_array_equal(res.labels, d.argmin(1))
    for c in range(5):
        np.testing.assert_allclose(res.centroids[c], x[res.labels == c].mean(0), atol=1e-5)
    assert res.inertia == pytest.approx(d.min(1).sum(), rel=1e-5)
    ref = KMeans(5, n_init=10, random_state=0).fit(x)
    assert res.inertia <= ref.inertia_ * (1 + 1e-5)


def test_kmeans_is_reproducible_and_handles_edge_sizes():
    x, _ = blobs(1, k=6, spread=1.5)
    a, b = kmeans(x, 6, seed=3), kmeans(x, 6, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    every = kmeans(x[:12], 12)
    assert sorted(every.labels.tolist()) == list(range(12)) and every.inertia == pytest.approx(0)
    dup = kmeans(np.tile([1.0, 2.0], (5, 1)), 3)  # identical samples: no crash, no NaN
    assert np.isfinite(dup.centroids).all() and dup.inertia == 0.0
    with pytest.raises(ValueError):
        kmeans(x, 0)


# ------------------------------------------------------------------ threshold graph


def brute_components(x, threshold):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    label = [-1] * n
    for s in range(n):
        if label[s] >= 0:
            continue
        label[s] = s
        queue = deque([s])
        while queue:
            i = queue.popleft()
            for j in range(n):
                if label[j] < 0 and float(xn[i] @ xn[j]) >= threshold:
                    label[j] = s
                    queue.append(j)
    return label


def test_threshold_clustering_by_hand():
    # cos(0°,10°) .985, cos(10°,60°) .643, cos(0°,60°) .5: a chain joins all three at .6
    emb = unit([0, 10, 60, 180])
    assert threshold_clustering(emb, 0.6).tolist() == [0, 0, 0, 1]
    assert threshold_clustering(emb, 0.7).tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_threshold_clustering_matches_bfs(threshold):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(15, 6))[rng.integers(0, 15, size=160)] + rng.normal(
        scale=0.6, size=(160, 6)
    )
    labels = threshold_clustering(x, threshold, max_block_bytes=4000)
    assert labels.tolist() == canonical(brute_components(x, threshold))


# ------------------------------------------------------------------ average linkage


def test_agglomerative_by_hand():
    # cosine distances: d(0°,10°) = .0152, d(10°,60°) = .357, d(0°,60°) = .5.
    # {0°,10°} merge first; then d({0°,10°}, 60°) = (.5 + .357)/2 = .4286.
    emb = unit([0, 10, 60, 180])
    assert agglomerative_clustering(emb, 0.45).tolist() == [0, 0, 0, 1]
    assert agglomerative_clustering(emb, 0.42).tolist() == [0, 0, 1, 2]
    assert agglomerative_clustering(emb, 0.01).tolist() == [0, 1, 2, 3]
    assert agglomerative_clustering(emb, 3.0).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("threshold", [0.1, 0.4, 0.8])
def test_agglomerative_matches_sklearn(threshold):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 5))[rng.integers(0, 12, size=150)] + rng.normal(
        scale=0.5, size=(150, 5)
    )
    ours = agglomerative_clustering(x, threshold)
    ref = AgglomerativeClustering(
        n_clusters=None, distance_threshold=threshold, metric="cosine", linkage="average"
    ).fit_predict(x)
    assert ours.tolist() == canonical(ref)
    assert 1 < ours.max() + 1 < 150
