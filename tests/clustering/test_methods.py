"""Assignment to existing clusters against a float64 loop, the scores, the min_size cut,
and HDBSCAN with its cannot-link split (scikit-learn's own labels as the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from facemetric.clustering import (
    ClusterOptions,
    assign_to_clusters,
    cannot_link_violations,
    cluster_embeddings,
    hdbscan_labels,
    member_scores,
    split_cannot_link,
    unit_float32,
)


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _loop_assign(new, new_photos, members, clusters, member_photos, threshold, linkage):
    """Float64 loops: every (face, cluster) score; best-first greedy with the photo rule."""
    q, e = _unit(new), _unit(members)
    cands = []
    for f in range(len(q)):
        per: dict[int, list[float]] = {}
        for j in range(len(e)):
            per.setdefault(int(clusters[j]), []).append(float(q[f] @ e[j]))
        for c, sims in per.items():
            s = {"average": sum(sims) / len(sims), "single": max(sims),
                 "complete": min(sims)}[linkage]
            cands.append((s, f, c))
    taken = {(int(p), int(c)) for p, c in zip(member_photos, clusters, strict=True)}
    out = [-1] * len(q)
    for s, f, c in sorted(cands, key=lambda t: -t[0]):
        if s < threshold:
            break
        if out[f] >= 0 or (int(new_photos[f]), c) in taken:
            continue
        out[f] = c
        taken.add((int(new_photos[f]), c))
    return out


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
def test_assignment_matches_a_float64_loop(linkage):
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 12))
    member_lab = rng.integers(0, 6, 60)
    members = centres[member_lab] + 0.5 * rng.normal(size=(60, 12))
    clusters = member_lab * 10 + 3  # arbitrary non-negative ids
    member_photos = np.arange(60)
    new = centres[rng.integers(0, 8, 40) % 6] + 0.6 * rng.normal(size=(40, 12))
    new[30:] = rng.normal(size=(10, 12))  # strangers
    new_photos = 100 + np.arange(40) // 2  # two faces per new photo
    new_photos[5] = 7  # a new face from an old photo: cannot join that photo's cluster
    for threshold in (0.3, 0.6):
        got = assign_to_clusters(new, new_photos, members, clusters, member_photos, threshold,
                                 linkage, block_bytes=4096)
        want = _loop_assign(new, new_photos, members, clusters, member_photos, threshold,
                            linkage)
        assert got.cluster.tolist() == want
        assert (got.cluster >= 0).sum() > 5 and (got.cluster < 0).sum() > 0
        hit = got.cluster >= 0
        assert np.all(got.score[hit] >= threshold) and np.isnan(got.score[~hit]).all()
        both = np.concatenate([clusters, got.cluster[hit]])
        assert cannot_link_violations(both, np.concatenate([member_photos,
                                                            new_photos[hit]])) == 0


def test_member_scores_are_mean_cosines_to_the_others():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 5))
    labels = np.array([0, 0, 0, 1, 1, 2, -1, 0, 1, 3, 3, 3, 3, 4, 0])
    got = member_scores(x, labels)
    u = _unit(x)
    for i in range(15):
        others = [j for j in range(15) if j != i and labels[j] == labels[i] >= 0]
        if not others:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(np.mean([u[i] @ u[j] for j in others]), abs=1e-6)


def test_min_size_sends_small_clusters_to_unclustered():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 8)) * 5
    sizes = [5, 2, 1]
    x = np.concatenate([c + 0.05 * rng.normal(size=(s, 8))
                        for c, s in zip(centres, sizes, strict=True)])
    res = cluster_embeddings(x, 0.9, None, ClusterOptions(min_size=3))
    assert len(set(res.groups.tolist())) == 3
    assert res.labels.tolist() == [0] * 5 + [-1] * 3
    res = cluster_embeddings(x, 0.9, None, ClusterOptions(min_size=1))
    assert sorted(np.bincount(res.labels).tolist()) == [1, 2, 5]


def test_hdbscan_split_removes_every_same_photo_pair():
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(5, 16)) * 3
    lab = np.repeat(np.arange(5), 12)
    x = unit_float32(centres[lab] + 0.3 * rng.normal(size=(60, 16)))
    photos = np.arange(60)
    # photos holding two faces of one identity: HDBSCAN puts them together
    for a, b in [(0, 1), (12, 13), (14, 15), (30, 31)]:
        photos[b] = photos[a]
    raw = hdbscan_labels(x, 2)
    from sklearn.cluster import HDBSCAN

    ref = HDBSCAN(min_cluster_size=2, min_samples=1, copy=True).fit(x.astype(np.float64)).labels_
    np.testing.assert_array_equal(raw, ref)
    before = cannot_link_violations(raw, photos)
    assert before == 4
    out, split, held = split_cannot_link(x, raw, photos)
    assert cannot_link_violations(out, photos) == 0
    assert held == before and split == len({raw[0], raw[12], raw[30]})
    # the split only separates: faces apart before stay apart
    for i in range(60):
        for j in range(60):
            if raw[i] != raw[j] or raw[i] < 0:
                assert out[i] != out[j] or out[i] < 0
    res = cluster_embeddings(x, 0.5, photos, ClusterOptions(method="hdbscan"))
    assert cannot_link_violations(res.labels, photos) == 0 and res.split >= 1


def test_options_are_checked():
    for bad in ({"far": 0}, {"method": "dbscan"}, {"linkage": "ward"}, {"min_size": 0},
                {"neighbours": 0}):
        with pytest.raises(ValueError):
            ClusterOptions(**bad)
    opts = ClusterOptions(far=1e-4, linkage="single")
    assert ClusterOptions.from_dict(opts.to_dict()) == opts
