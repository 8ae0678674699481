"""HierarchicalTripletLoss, ClassTree and AnchorNeighborSampler against loop-written references."""

from __future__ import annotations

import math

import pytest
import torch
from structured_toy import nn_accuracy, toy_problem

from facemetric.losses.pair.hierarchical_triplet import (
    AnchorNeighborSampler,
    ClassTree,
    HierarchicalTripletLoss,
)
from facemetric.tuples import Pairs, Triplets

# ---------------------------------------------------------------- loop-written references


def _sqd(a: list[float], b: list[float]) -> float:
    return sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True))


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(t * t for t in v))
    return [t / n for t in v]


def _group(x: torch.Tensor, y: torch.Tensor, normalize: bool) -> dict[int, list[list[float]]]:
    pts: dict[int, list[list[float]]] = {}
    for row, lab in zip(x.tolist(), y.tolist(), strict=True):
        pts.setdefault(lab, []).append(_unit(row) if normalize else row)
    return pts


def _mean_pair_distance(A: list[list[float]], B: list[list[float]]) -> float:
    return sum(_sqd(a, b) for a in A for b in B) / (len(A) * len(B))


def ref_tree(pts: dict[int, list[list[float]]], L: int, max_distance: float | None):
    """(classes, inner, thresholds, level[(c1, c2)]) by plain loops over samples."""
    classes = sorted(pts)
    inner = {}
    for c in classes:
        P = pts[c]
        n = len(P)
        if n < 2:
            inner[c] = 0.0
            continue
        total = sum(_sqd(P[i], P[j]) for i in range(n) for j in range(n) if i != j)
        inner[c] = total / (n * (n - 1))
    multi = [c for c in classes if len(pts[c]) >= 2]
    d0 = sum(inner[c] for c in multi) / len(multi)
    if max_distance is None:
        max_distance = max(
            _mean_pair_distance(pts[a], pts[b]) for a in classes for b in classes if a != b
        )
    thr = [d0 + lv * max(max_distance - d0, 0.0) / L for lv in range(L + 1)]
    nodes = [[c] for c in classes]
    level: dict[tuple[int, int], int] = {}
    for lv in range(L):
        while len(nodes) > 1:
            best = None
            for i in range(len(nodes)):
                for j in range(i + 1, len(nodes)):
                    A = [p for c in nodes[i] for p in pts[c]]
                    B = [p for c in nodes[j] for p in pts[c]]
                    d = _mean_pair_distance(A, B)
                    if best is None or d < best[0]:
                        best = (d, i, j)
            assert best is not None
            if not best[0] < thr[lv]:
                break
            _, i, j = best
            for a in nodes[i]:
                for b in nodes[j]:
                    level[(a, b)] = level[(b, a)] = lv
            nodes[i] = nodes[i] + nodes[j]
            del nodes[j]
    for a in classes:
        for b in classes:
            if a != b and (a, b) not in level:
                level[(a, b)] = L
    return classes, inner, thr, level


def ref_htl(x, y, triplets, inner, thr, level, beta):
    pts = [_unit(r) for r in x.tolist()]
    lab = y.tolist()
    total = 0.0
    for a, p, n in triplets:
        alpha = beta + thr[level[(lab[a], lab[n])]] - inner[lab[a]]
        total += max(_sqd(pts[a], pts[p]) - _sqd(pts[a], pts[n]) + alpha, 0.0)
    return total / len(triplets)


def all_triplets_loop(y: torch.Tensor) -> list[tuple[int, int, int]]:
    lab = y.tolist()
    out = []
    for a in range(len(lab)):
        for p in range(len(lab)):
            for n in range(len(lab)):
                if a != p and lab[a] == lab[p] and lab[a] != lab[n]:
                    out.append((a, p, n))
    return out


def tree_levels(tree: ClassTree) -> dict[tuple[int, int], int]:
    C = tree.num_classes
    rows = torch.arange(C)
    lv = tree.merge_level(rows[:, None].expand(C, C), rows[None, :].expand(C, C))
    cls = tree.classes.tolist()
    return {(cls[i], cls[j]): int(lv[i, j]) for i in range(C) for j in range(C) if i != j}


# ---------------------------------------------------------------------------- the tree

# five classes of two 1-D samples at ±0.1 around 0, 0.1, 1.0, 2.3, 3.4: every inner distance
# is 0.2² = 0.04 = d_0; with L = 4 and d_max = 4 the thresholds are 0.04 + l·0.99.
HAND_X = torch.tensor([-0.1, 0.1, 0.0, 0.2, 0.9, 1.1, 2.2, 2.4, 3.3, 3.5], dtype=torch.float64)[
    :, None
]
HAND_Y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])


def hand_tree() -> ClassTree:
    return ClassTree.build(HAND_X, HAND_Y, num_levels=4, normalize=False, max_distance=4.0)


def test_tree_hand_made_levels_and_thresholds():
    tree = hand_tree()
    assert torch.allclose(tree.thresholds, torch.tensor([0.04, 1.03, 2.02, 3.01, 4.0]).double())
    assert torch.allclose(tree.inner, torch.full((5,), 0.04, dtype=torch.float64))
    # by hand: d(0,1) = 0.1² + 0.02 = 0.03 < d_0 -> level 0; d({0,1}, 2) = 0.95² + 0.0125 + 0.01
    # = 0.925 < 1.03 -> level 1; d(3,4) = 1.1² + 0.02 = 1.23 -> level 2; d({0,1,2},{3,4}) = 6.69
    # > 3.01 -> only the root (level 4) joins the two groups.
    expected = {(0, 1): 0, (0, 2): 1, (1, 2): 1, (3, 4): 2}
    levels = tree_levels(tree)
    for (a, b), lv in levels.items():
        assert lv == expected.get((min(a, b), max(a, b)), 4), (a, b)
    a, b = torch.tensor([0, 0, 3, 1]), torch.tensor([1, 2, 4, 4])
    want = torch.tensor([0.04, 1.03, 2.02, 4.0], dtype=torch.float64)
    assert torch.allclose(tree.merge_threshold(a, b), want)


@pytest.mark.parametrize(
    ("normalize", "sizes", "levels"),
    [
        (True, [1, 2, 3, 4, 2, 5, 3], 6),
        (False, [1, 2, 3, 4, 2, 5, 3], 6),
        (False, [2, 3, 1, 2, 2, 3, 2, 2, 1, 3, 2, 2, 3, 2, 2, 2], 8),
        (True, [2, 3, 1, 2, 2, 3, 2, 2, 1, 3, 2, 2, 3, 2, 2, 2], 10),
    ],
)
def test_tree_matches_loop_reference(normalize: bool, sizes: list[int], levels: int):
    g = torch.Generator().manual_seed(3)
    y = torch.cat([torch.full((s,), 10 + 3 * c) for c, s in enumerate(sizes)])  # sparse ids
    x = torch.randn(len(y), 3, generator=g, dtype=torch.float64)
    x += 2.0 * torch.randn(len(sizes), 3, generator=g, dtype=torch.float64).repeat_interleave(
        torch.tensor(sizes), 0
    )
    max_d = 4.0 if normalize else None
    tree = ClassTree.build(x, y, num_levels=levels, normalize=normalize, max_distance=max_d)
    classes, inner, thr, level = ref_tree(_group(x, y, normalize), levels, max_d)
    assert tree.classes.tolist() == classes
    assert torch.allclose(tree.inner, torch.tensor([inner[c] for c in classes]).double())
    assert torch.allclose(tree.thresholds, torch.tensor(thr).double())
    assert tree_levels(tree) == level
    assert len(set(level.values())) >= 3  # the data exercise several levels
    # class distances = mean pairwise squared distances
    pts = _group(x, y, normalize)
    d = tree.class_distance(torch.arange(len(classes)))
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            if i != j:
                assert math.isclose(
                    float(d[i, j]), _mean_pair_distance(pts[a], pts[b]), rel_tol=1e-9, abs_tol=1e-12
                )


def test_tree_refuses_bad_statistics():
    with pytest.raises(ValueError):
        ClassTree.build(torch.randn(3, 2), torch.tensor([0, 1, 2]))  # no class with 2 samples
    with pytest.raises(ValueError):
        ClassTree.build(torch.randn(4, 2), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError):
        hand_tree().index_of(torch.tensor([0, 7]))


# ---------------------------------------------------------------------------- the loss


def _dataset(seed: int, classes: int = 6, per: int = 4, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per)
    x = torch.randn(classes, dim, generator=g, dtype=torch.float64)[y]
    x = x + 0.7 * torch.randn(len(y), dim, generator=g, dtype=torch.float64)
    return x, y


def test_loss_matches_loop_reference_with_dataset_tree():
    data_x, data_y = _dataset(0)
    tree = ClassTree.build(data_x, data_y, num_levels=5)
    _, inner, thr, level = ref_tree(_group(data_x, data_y, True), 5, 4.0)
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 5, 5])
    x = torch.randn(len(y), 5, generator=g, dtype=torch.float64)
    loss = HierarchicalTripletLoss(tree=tree, beta=0.2)
    got = loss(x, y)
    want = ref_htl(x, y, all_triplets_loop(y), inner, thr, level, 0.2)
    assert want > 0
    assert math.isclose(float(got), want, rel_tol=1e-10)
    # explicit triplets: only those are averaged
    trip = [(0, 1, 3), (3, 4, 9), (5, 7, 0), (8, 9, 2)]
    t = Triplets(*(torch.tensor(c) for c in zip(*trip, strict=True)))
    want_t = ref_htl(x, y, trip, inner, thr, level, 0.2)
    assert math.isclose(float(loss(x, y, t)), want_t, rel_tol=1e-10)


def test_margin_matrix_is_beta_plus_merge_threshold_minus_inner():
    data_x, data_y = _dataset(4)
    tree = ClassTree.build(data_x, data_y, num_levels=5)
    _, inner, thr, level = ref_tree(_group(data_x, data_y, True), 5, 4.0)
    loss = HierarchicalTripletLoss(tree=tree, beta=0.3)
    labels = torch.tensor([5, 1, 3, 1])
    margin, inv = loss.margins(labels, tree)
    uniq = [1, 3, 5]
    assert inv.tolist() == [2, 0, 1, 0]
    for i, a in enumerate(uniq):
        for j, b in enumerate(uniq):
            if a != b:
                assert math.isclose(float(margin[i, j]), 0.3 + thr[level[(a, b)]] - inner[a])


def test_loss_without_tree_builds_one_from_the_batch():
    x, y = _dataset(2, classes=4, per=3)
    _, inner, thr, level = ref_tree(_group(x, y, True), 3, 4.0)
    got = HierarchicalTripletLoss(beta=0.1, num_levels=3)(x, y)
    want = ref_htl(x, y, all_triplets_loop(y), inner, thr, level, 0.1)
    assert math.isclose(float(got), want, rel_tol=1e-10)


def test_single_identity_batch_has_no_triplet_and_gives_zero():
    x = torch.randn(4, 3, requires_grad=True)
    out = HierarchicalTripletLoss()(x, torch.zeros(4, dtype=torch.long))
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradcheck_with_a_fixed_tree():
    data_x, data_y = _dataset(5, classes=3, per=4, dim=3)
    tree = ClassTree.build(data_x, data_y, num_levels=4)
    g = torch.Generator().manual_seed(6)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = HierarchicalTripletLoss(tree=tree, beta=0.2)
    assert float(loss(x, y).detach()) > 0
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,))


def test_bad_input():
    loss = HierarchicalTripletLoss()
    x = torch.randn(6, 4)
    with pytest.raises(ValueError):
        loss(x, torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError):
        loss(x, torch.arange(6))
    with pytest.raises(ValueError):
        bad = x.clone()
        bad[2, 1] = float("nan")
        loss(bad, torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError):
        p = torch.tensor([0])
        loss(x, torch.tensor([0, 0, 1, 1, 2, 2]), Pairs(p, p + 1, p, p + 2))
    with pytest.raises(ValueError):  # a class the tree does not know
        HierarchicalTripletLoss(tree=hand_tree())(x, torch.tensor([0, 0, 1, 1, 9, 9]))


# ---------------------------------------------------------------------------- units


def _ref_htl_plain(x, y, triplets, inner, thr, level, beta):
    """``ref_htl`` on the raw (unnormalised) embeddings."""
    pts, lab = x.tolist(), y.tolist()
    total = 0.0
    for a, p, n in triplets:
        alpha = beta + thr[level[(lab[a], lab[n])]] - inner[lab[a]]
        total += max(_sqd(pts[a], pts[p]) - _sqd(pts[a], pts[n]) + alpha, 0.0)
    return total / len(triplets)


def _batch_hard_loop(x, y, normalize: bool) -> list[tuple[int, int, int]]:
    """Per anchor: its farthest positive and nearest negative in squared distance."""
    pts = [_unit(r) if normalize else r for r in x.tolist()]
    lab = y.tolist()
    out = []
    for a in range(len(lab)):
        pos = [p for p in range(len(lab)) if p != a and lab[p] == lab[a]]
        neg = [n for n in range(len(lab)) if lab[n] != lab[a]]
        if pos and neg:
            p = max(pos, key=lambda j: _sqd(pts[a], pts[j]))
            n = min(neg, key=lambda j: _sqd(pts[a], pts[j]))
            out.append((a, p, n))
    return out


def test_a_miner_in_other_units_is_refused():
    from facemetric.distances import CosineDistance, EuclideanDistance, SquaredEuclideanDistance
    from facemetric.miners import BatchHardMiner, SemiHardMiner

    for miner in (BatchHardMiner(), SemiHardMiner(0.2),  # Euclidean by default
                  BatchHardMiner(distance=CosineDistance()),
                  BatchHardMiner(distance=SquaredEuclideanDistance())):  # not normalised
        with pytest.raises(ValueError, match=r"miner .* measures with .* units"):
            HierarchicalTripletLoss(miner=miner)
    with pytest.raises(ValueError, match="squared Euclidean"):
        HierarchicalTripletLoss(distance=EuclideanDistance(normalize=True))
    with pytest.raises(ValueError, match=r"miner .* units"):  # loss unnormalised, miner not
        HierarchicalTripletLoss(distance=SquaredEuclideanDistance(),
                                miner=BatchHardMiner(distance=SquaredEuclideanDistance(True)))


def test_a_miner_in_the_loss_units_gives_the_loop_value():
    from facemetric.miners import BatchHardMiner

    data_x, data_y = _dataset(0)
    tree = ClassTree.build(data_x, data_y, num_levels=5)
    _, inner, thr, level = ref_tree(_group(data_x, data_y, True), 5, 4.0)
    g = torch.Generator().manual_seed(8)
    y = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 5, 5])
    x = torch.randn(len(y), 5, generator=g, dtype=torch.float64)
    miner = BatchHardMiner(distance=HierarchicalTripletLoss.default_distance())
    loss = HierarchicalTripletLoss(tree=tree, beta=0.2, miner=miner)
    want = ref_htl(x, y, _batch_hard_loop(x, y, True), inner, thr, level, 0.2)
    assert want > 0 and math.isclose(float(loss(x, y)), want, rel_tol=1e-10)


def test_unnormalised_units_build_the_batch_tree_unnormalised_too():
    from facemetric.distances import SquaredEuclideanDistance

    x, y = _dataset(2, classes=4, per=3)
    x = 3.0 * x  # norms far from 1: normalised and raw units differ
    _, inner, thr, level = ref_tree(_group(x, y, False), 3, None)
    loss = HierarchicalTripletLoss(beta=0.1, num_levels=3, distance=SquaredEuclideanDistance())
    want = _ref_htl_plain(x, y, all_triplets_loop(y), inner, thr, level, 0.1)
    assert want > 0 and math.isclose(float(loss(x, y)), want, rel_tol=1e-10)


def test_tree_state_round_trip():
    tree = hand_tree()
    again = ClassTree.from_state_dict(tree.state_dict())
    for name, value in tree.state_dict().items():
        assert torch.equal(getattr(again, name), value), name
    with pytest.raises(ValueError, match="lacks"):
        ClassTree.from_state_dict({"classes": tree.classes})


# ---------------------------------------------------------------------------- the sampler


def ref_neighbour_order(pts, level, anchor):
    others = [c for c in sorted(pts) if c != anchor]
    return sorted(
        others, key=lambda c: (level[(anchor, c)], _mean_pair_distance(pts[anchor], pts[c]))
    )


@pytest.mark.parametrize(("anchors", "per_anchor", "images"), [(1, 2, 2), (2, 2, 1), (1, 3, 3)])
def test_anchor_neighbour_sampler(anchors: int, per_anchor: int, images: int):
    tree = hand_tree()
    pts = _group(HAND_X, HAND_Y, False)
    _, _, _, level = ref_tree(pts, 4, 4.0)
    sampler = AnchorNeighborSampler(HAND_Y, tree, anchors, per_anchor, images, num_batches=30)
    assert len(sampler) == 30
    batches = list(sampler)
    assert len(batches) == 30
    first_anchors = set()
    for batch in batches:
        assert len(batch) == anchors * per_anchor * images
        labels = HAND_Y[batch].tolist()
        groups = [labels[i : i + images] for i in range(0, len(labels), images)]
        assert all(len(set(gr)) == 1 for gr in groups)
        classes = [gr[0] for gr in groups]
        assert len(set(classes)) == len(classes)
        used: set[int] = set()
        for k in range(0, len(classes), per_anchor):
            anchor, neigh = classes[k], classes[k + 1 : k + per_anchor]
            want = [c for c in ref_neighbour_order(pts, level, anchor) if c not in used]
            assert neigh == want[: per_anchor - 1]
            used.update(classes[k : k + per_anchor])
        first_anchors.add(classes[0])
        if images <= 2:  # classes have two images: drawn without replacement
            for k in range(0, len(batch), images):
                assert len(set(batch[k : k + images])) == images
    assert len(first_anchors) >= 3  # anchors are drawn at random


def test_sampler_skips_tree_classes_missing_from_its_labels():
    # 1-D classes at 0, 10, 1, 2, 3, 4, 5: the nearest classes of class 0 are 2..6, but the
    # sampler's labels hold only classes 0 and 1, so every batch pairs them (past the
    # precomputed neighbour lists)
    pos = torch.tensor([0.0, 10.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    y = torch.arange(7).repeat_interleave(2)
    x = (pos[y] + torch.tensor([-0.1, 0.1]).double().repeat(7))[:, None]
    tree = ClassTree.build(x, y, num_levels=3, normalize=False)
    labels = torch.tensor([1, 0, 1, 0])
    sampler = AnchorNeighborSampler(labels, tree, 1, 2, 2, num_batches=10)
    for batch in sampler:
        classes = labels[batch].tolist()
        assert sorted(classes) == [0, 0, 1, 1] and classes[0] == classes[1]


def test_sampler_batches_depend_on_seed_epoch_and_batch_number_only():
    tree = hand_tree()
    sampler = AnchorNeighborSampler(HAND_Y, tree, 1, 2, 2, num_batches=6, seed=3)
    first, again = list(sampler), list(sampler)
    assert first == again  # the same epoch redraws the same batches
    sampler.set_epoch(1)
    assert list(sampler) != first
    # two processes: each takes every other global batch, none shared
    ranks = [AnchorNeighborSampler(HAND_Y, tree, 1, 2, 2, num_batches=3, seed=3,
                                   num_replicas=2, rank=r) for r in (0, 1)]
    assert list(ranks[0]) == first[0::2] and list(ranks[1]) == first[1::2]
    with pytest.raises(ValueError, match="no class tree"):
        list(AnchorNeighborSampler(HAND_Y, None, 1, 2, 2, num_batches=1))


# ---------------------------------------------------------------------------- optimisation


def test_optimisation_lowers_loss_and_raisesnn_accuracy():
    x, y = toy_problem()
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.copy_(torch.eye(8))
        model.bias.zero_()
    loss_fn = HierarchicalTripletLoss(beta=0.1, num_levels=4)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.no_grad():
        first_tree = ClassTree.build(model(x), y, num_levels=4)
        loss_fn.tree = first_tree
        before, acc_before = float(loss_fn(model(x), y)), nn_accuracy(model(x), y)
    for step in range(200):
        if step % 50 == 49:  # the epoch-level tree, rebuilt from the current embeddings
            with torch.no_grad():
                loss_fn.tree = ClassTree.build(model(x), y, num_levels=4)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    loss_fn.tree = first_tree  # judge both ends with the same margins
    with torch.no_grad():
        after, acc_after = float(loss_fn(model(x), y)), nn_accuracy(model(x), y)
    assert after < 0.25 * before
    assert acc_before <= 0.5 and acc_after >= 0.9
