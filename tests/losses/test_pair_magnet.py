"""MagnetLoss, MagnetClusterIndex and MagnetBatchSampler against loop-written references."""

from __future__ import annotations

import math

import pytest
import torch
from structured_toy import nn_accuracy, toy_problem

from facemetric.losses.pair.magnet import MagnetBatchSampler, MagnetClusterIndex, MagnetLoss
from facemetric.tuples import Triplets

# ---------------------------------------------------------------- loop-written references


def _sqd(a: list[float], b: list[float]) -> float:
    return sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True))


def _means(rows: list[list[float]], ids: list[int]) -> dict[int, list[float]]:
    out = {}
    for c in sorted(set(ids)):
        members = [r for r, i in zip(rows, ids, strict=True) if i == c]
        out[c] = [sum(col) / len(members) for col in zip(*members, strict=True)]
    return out


def ref_magnet(x: torch.Tensor, y: torch.Tensor, cid: torch.Tensor, alpha: float) -> float:
    rows, lab, ids = x.tolist(), y.tolist(), cid.tolist()
    N = len(rows)
    mu = _means(rows, ids)
    cl_label = {c: lab[ids.index(c)] for c in mu}
    var = sum(_sqd(rows[n], mu[ids[n]]) for n in range(N)) / (N - 1)
    total = 0.0
    for n in range(N):
        num = math.exp(-_sqd(rows[n], mu[ids[n]]) / (2 * var) - alpha)
        den = sum(math.exp(-_sqd(rows[n], mu[c]) / (2 * var)) for c in mu if cl_label[c] != lab[n])
        total += max(-math.log(num / den), 0.0)
    return total / N


# ---------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("alpha", [0.0, 1.0, 4.0])
def test_loss_matches_loop_reference(alpha: float):
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    cid = torch.tensor([7, 7, 3, 3, 5, 5, 5, 9, 9, 1, 1, 1])  # arbitrary ids, 2 per class
    x = torch.randn(len(y), 4, generator=g, dtype=torch.float64)
    loss = MagnetLoss(alpha=alpha)
    got = float(loss(x, y, cluster_ids=cid))
    want = ref_magnet(x, y, cid, alpha)
    assert want > 0
    assert math.isclose(got, want, rel_tol=1e-10)
    # without cluster ids every class is one cluster
    assert math.isclose(float(loss(x, y)), ref_magnet(x, y, y, alpha), rel_tol=1e-10)


def test_hinge_clips_easy_samples_to_zero():
    # three tight, far-apart clusters: every sample's term is negative before the hinge
    y = torch.arange(3).repeat_interleave(3)
    x = 10.0 * torch.eye(3, dtype=torch.float64)[y] + 0.01 * torch.randn(9, 3).double()
    assert float(MagnetLoss(alpha=1.0)(x, y)) == 0.0


def test_gradcheck():
    g = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    cid = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])
    x = torch.randn(len(y), 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = MagnetLoss(alpha=1.0)
    assert float(loss(x, y, cluster_ids=cid).detach()) > 0
    assert torch.autograd.gradcheck(lambda e: loss(e, y, cluster_ids=cid), (x,))
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,))


def test_bad_input():
    loss = MagnetLoss()
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError):
        loss(x, y[:5])
    with pytest.raises(ValueError):
        loss(x, torch.arange(6))
    with pytest.raises(ValueError):
        loss(x, torch.arange(6), cluster_ids=torch.arange(6))
    with pytest.raises(ValueError):
        bad = x.clone()
        bad[0, 0] = float("nan")
        loss(bad, y)
    with pytest.raises(ValueError):
        bad = x.clone()
        bad[0, 0] = float("nan")
        loss(bad, y, cluster_ids=y)
    with pytest.raises(ValueError):  # one class: no impostor cluster
        loss(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError):  # cluster 0 spans labels 0 and 1
        loss(x, y, cluster_ids=torch.tensor([0, 0, 0, 1, 2, 2]))
    with pytest.raises(ValueError):
        loss(x, y, cluster_ids=torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError):
        loss(x, y, cluster_ids=y.float())
    with pytest.raises(ValueError):
        i = torch.tensor([0])
        loss(x, y, Triplets(i, i + 1, i + 2))


# ---------------------------------------------------------------------------- k-means


def _blobs(seed: int = 0):
    """3 classes × 2 far-apart blobs of 15 points (blob b belongs to class b // 2)."""
    g = torch.Generator().manual_seed(seed)
    centres = 20.0 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    blob = torch.arange(6).repeat_interleave(15)
    perm = torch.randperm(90, generator=g)  # interleave the dataset order
    blob = blob[perm]
    x = centres[blob] + 0.2 * torch.randn(90, 5, generator=g, dtype=torch.float64)
    return x, blob // 2, blob, centres


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_well_separated_blobs(seed: int):
    x, y, blob, _ = _blobs(seed)
    index = MagnetClusterIndex(clusters_per_class=2, seed=seed)
    index.refresh(x, y)
    assert index.num_clusters == 6
    a = index.assignments
    # the clustering equals the blob partition
    pairs = set(zip(a.tolist(), blob.tolist(), strict=True))
    assert len(pairs) == 6
    assert len({p[0] for p in pairs}) == 6
    for cluster, b in pairs:
        members = [r for r, bb in zip(x.tolist(), blob.tolist(), strict=True) if bb == b]
        mean = [sum(col) / len(members) for col in zip(*members, strict=True)]
        assert torch.allclose(index.centres[cluster], torch.tensor(mean, dtype=torch.float64))
        assert int(index.cluster_labels[cluster]) == b // 2
    assert torch.equal(index.cluster_ids(torch.tensor([5, 0, 17])), a[[5, 0, 17]])


def test_kmeans_is_a_lloyd_fixed_point_on_random_data():
    g = torch.Generator().manual_seed(4)
    y = torch.tensor([3] * 9 + [8] * 12 + [1] * 2 + [6] * 1)
    x = torch.randn(len(y), 3, generator=g, dtype=torch.float64)
    index = MagnetClusterIndex(clusters_per_class=3, iterations=200, seed=4)
    index.refresh(x, y)
    rows, lab, a = x.tolist(), y.tolist(), index.assignments.tolist()
    cl_lab = index.cluster_labels.tolist()
    counts = {c: cl_lab.count(c) for c in set(lab)}
    assert counts == {3: 3, 8: 3, 1: 2, 6: 1}  # min(K, class size) clusters per class
    mu = _means(rows, a)
    assert sorted(mu) == list(range(index.num_clusters))
    for c, m in mu.items():
        assert torch.allclose(index.centres[c], torch.tensor(m, dtype=torch.float64))
    for n in range(len(rows)):
        assert cl_lab[a[n]] == lab[n]
        own = [c for c in mu if cl_lab[c] == lab[n]]
        nearest = min(own, key=lambda c: _sqd(rows[n], mu[c]))
        assert a[n] == nearest


def test_index_needs_refresh():
    with pytest.raises(ValueError):
        MagnetClusterIndex().cluster_ids(torch.tensor([0]))


# ---------------------------------------------------------------------------- the sampler


def test_neighbourhood_sampler_takes_seed_and_nearest_impostors():
    x, y, _, _ = _blobs(0)
    index = MagnetClusterIndex(clusters_per_class=2, seed=0)
    index.refresh(x, y)
    sampler = MagnetBatchSampler(
        index, clusters_per_batch=3, samples_per_cluster=4, num_batches=25, seed=0
    )
    cen, cl_lab = index.centres.tolist(), index.cluster_labels.tolist()
    seeds = set()
    batches = list(sampler)
    assert len(batches) == len(sampler) == 25
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        ids = index.cluster_ids(torch.tensor(batch)).tolist()
        groups = [ids[k : k + 4] for k in range(0, 12, 4)]
        assert all(len(set(gr)) == 1 for gr in groups)
        seed, rest = groups[0][0], [gr[0] for gr in groups[1:]]
        impostors = [c for c in range(len(cen)) if cl_lab[c] != cl_lab[seed]]
        impostors.sort(key=lambda c: _sqd(cen[c], cen[seed]))
        assert rest == impostors[:2]
        assert torch.equal(y[batch], index.cluster_labels[ids])
        seeds.add(seed)
    assert len(seeds) >= 4


def test_sampler_batches_depend_on_seed_epoch_and_batch_number_only():
    x, y, _, _ = _blobs(1)
    index = MagnetClusterIndex(clusters_per_class=2, seed=0)
    index.refresh(x, y)
    sampler = MagnetBatchSampler(index, 3, 4, num_batches=6, seed=5)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(2)
    assert list(sampler) != first
    ranks = [MagnetBatchSampler(index, 3, 4, num_batches=3, seed=5, num_replicas=2, rank=r)
             for r in (0, 1)]
    assert list(ranks[0]) == first[0::2] and list(ranks[1]) == first[1::2]


def test_index_state_round_trip_and_seeded_refresh():
    x, y, _, _ = _blobs(2)
    index = MagnetClusterIndex(clusters_per_class=3, seed=0)
    index.refresh(x, y, generator=torch.Generator().manual_seed(9))
    other = MagnetClusterIndex(clusters_per_class=3, seed=123)  # its own seed is not used
    other.refresh(x, y, generator=torch.Generator().manual_seed(9))
    assert torch.equal(index.assignments, other.assignments)
    restored = MagnetClusterIndex(clusters_per_class=3)
    restored.load_state_dict(index.state_dict())
    for name in ("centres", "cluster_labels", "assignments", "member_order", "member_counts",
                 "member_starts"):
        assert torch.equal(getattr(restored, name), getattr(index, name)), name
    assert torch.equal(restored.nearest_impostors(0, 3), index.nearest_impostors(0, 3))
    empty = MagnetClusterIndex()
    empty.load_state_dict(MagnetClusterIndex().state_dict())
    assert empty.assignments is None


# ---------------------------------------------------------------------------- optimisation


def test_optimisation_lowers_loss_and_raisesnn_accuracy():
    x, y = toy_problem()
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.copy_(torch.eye(8))
        model.bias.zero_()
    loss_fn = MagnetLoss(alpha=1.0)
    index = MagnetClusterIndex(clusters_per_class=2, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.no_grad():
        before, acc_before = float(loss_fn(model(x), y)), nn_accuracy(model(x), y)
    for step in range(150):
        if step % 50 == 0:  # the epoch-level clusters
            with torch.no_grad():
                index.refresh(model(x), y)
        opt.zero_grad()
        loss_fn(model(x), y, cluster_ids=index.assignments).backward()
        opt.step()
    with torch.no_grad():
        after, acc_after = float(loss_fn(model(x), y)), nn_accuracy(model(x), y)
    assert after < 0.25 * before
    assert acc_before <= 0.5 and acc_after >= 0.9
