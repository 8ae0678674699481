"""Partial FC in one process: equals the full margin losses at sample rate 1, equals a
loop-written softmax over exactly the sampled centres otherwise, samples reproducibly and
sends gradients only to the sampled rows."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from facemetric.heads import PartialFC, sample_count, shard_range
from facemetric.losses.classifier import (
    AdaCosLoss,
    ArcFaceLoss,
    CosFaceLoss,
    DynamicMarginArcFaceLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from facemetric.losses.margins import ArcMargin, CosMargin, Margin

N, D, B = 40, 6, 12


def _batch(seed: int = 0, n: int = N, b: int = B) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n, (b,), generator=gen)
    return x, y


@pytest.mark.parametrize(
    "make",
    [
        lambda: ArcFaceLoss(N, D, scale=16.0, margin=0.4),
        lambda: CosFaceLoss(N, D, scale=20.0, margin=0.3),
    ],
    ids=["arcface", "cosface"],
)
def test_rate_one_equals_full_loss(make) -> None:
    torch.manual_seed(1)
    full = make().double()
    pfc = PartialFC.from_loss(full, 1.0).double()
    assert torch.equal(pfc.weight, full.weight)
    x, y = _batch()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    a, b = full(x1, y), pfc(x2, y)
    a.backward()
    b.backward()
    assert b.item() == pytest.approx(a.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pfc.weight.grad, full.weight.grad, rtol=1e-10, atol=1e-12)
    assert pfc.last_sampled is not None and torch.equal(pfc.last_sampled, torch.arange(N))


def _reference(x: Tensor, w: Tensor, y: Tensor, rows: Tensor, margin: Margin, scale: float,
               psi_fn) -> float:
    """Mean over samples of −log softmax over exactly ``rows`` (global ids), float64 loops."""
    total = 0.0
    for b in range(x.shape[0]):
        xb = x[b] / x[b].norm()
        logits = []
        target = None
        for c in rows.tolist():
            cos = float(xb @ (w[c] / w[c].norm()))
            if c == int(y[b]):
                target = len(logits)
                logits.append(scale * psi_fn(cos))
            else:
                logits.append(scale * cos)
        assert target is not None, "a positive centre was not sampled"
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[target]
    return total / x.shape[0]


def _arc(m: float):
    def psi(cos: float) -> float:
        theta = math.acos(max(-1.0, min(1.0, cos)))
        return math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)

    return psi


@pytest.mark.parametrize(
    ("margin", "psi"),
    [(ArcMargin(0.5), _arc(0.5)), (CosMargin(0.35), lambda c: c - 0.35)],
    ids=["arc", "cos"],
)
def test_sampled_loss_matches_loop_reference(margin: Margin, psi) -> None:
    pfc = PartialFC(N, D, margin, 12.0, sample_rate=0.25, seed=5).double()
    x, y = _batch(3)
    value = pfc(x, y)
    rows = pfc.last_sampled
    assert rows is not None
    positives = set(y.tolist())
    assert positives <= set(rows.tolist())
    assert rows.numel() == max(len(positives), math.ceil(0.25 * N))
    assert rows.numel() < N
    assert torch.equal(rows, rows.sort().values)
    expected = _reference(x, pfc.weight.detach(), y, rows, margin, 12.0, psi)
    assert value.item() == pytest.approx(expected, rel=1e-10)


def test_dynamic_margins_follow_the_global_class_ids_through_sampling() -> None:
    # class c has c + 1 images: margins 0.6·(c + 1)^(-1/2) + 0.05, from 0.65 down to ~0.14
    counts = torch.arange(1, N + 1)
    full = DynamicMarginArcFaceLoss(N, D, counts, a=0.6, b=0.05, lam=0.5, scale=12.0)
    pfc = PartialFC.from_loss(full, 0.25, seed=5).double()
    x, y = _batch(4)
    value = pfc(x, y)
    rows = pfc.last_sampled
    assert rows is not None and rows.numel() < N
    w = pfc.weight.detach()
    # the reference: each sample's own softmax over the sampled rows, with its class's margin
    per_sample = [
        _reference(x[b : b + 1], w, y[b : b + 1], rows, ArcMargin(0.0), 12.0,
                   _arc(0.6 * (int(y[b]) + 1) ** -0.5 + 0.05))
        for b in range(B)
    ]
    assert value.item() == pytest.approx(sum(per_sample) / B, rel=1e-10)


def test_gradients_only_reach_sampled_rows() -> None:
    pfc = PartialFC(N, D, ArcMargin(0.5), 16.0, sample_rate=0.2, seed=2)
    x, y = _batch(4)
    pfc(x.float(), y).backward()
    rows = pfc.last_sampled
    grad = pfc.weight.grad
    assert grad is not None and grad.shape == (N, D)
    unsampled = torch.ones(N, dtype=torch.bool)
    unsampled[rows] = False
    assert unsampled.sum() == N - rows.numel() > 0
    assert torch.count_nonzero(grad[unsampled]) == 0
    assert bool((grad[rows].norm(dim=1) > 0).all())


def test_positives_beyond_the_rate_are_all_kept() -> None:
    pfc = PartialFC(N, D, CosMargin(0.2), 10.0, sample_rate=0.05)
    x, y = _batch(6, b=30)
    y = torch.arange(30) % 25  # 25 distinct positives, ⌈0.05·40⌉ = 2
    pfc(x.float(), y)
    assert pfc.last_sampled is not None
    assert pfc.last_sampled.tolist() == list(range(25))
    assert sample_count(25, N, 0.05) == 25
    assert sample_count(0, 1000, 0.1) == 100  # 0.1·1000 is not rounded up to 101
    assert sample_count(3, 7, 1.0) == 7


def test_sampling_is_reproducible_and_changes_per_step() -> None:
    x, y = _batch(7)
    a = PartialFC(N, D, ArcMargin(0.5), 16.0, sample_rate=0.3, seed=11)
    b = PartialFC(N, D, ArcMargin(0.5), 16.0, sample_rate=0.3, seed=11)
    c = PartialFC(N, D, ArcMargin(0.5), 16.0, sample_rate=0.3, seed=12)
    seen_a, seen_b, seen_c = [], [], []
    for _ in range(3):
        for pfc, seen in ((a, seen_a), (b, seen_b), (c, seen_c)):
            pfc(x.float(), y)
            seen.append(pfc.last_sampled.tolist())
    assert seen_a == seen_b
    assert seen_a != seen_c
    assert seen_a[0] != seen_a[1] != seen_a[2]
    assert int(a.step) == 3
    # the step is part of the state: a copy loaded from it continues the same sequence
    d = PartialFC(N, D, ArcMargin(0.5), 16.0, sample_rate=0.3, seed=11)
    d.load_state_dict(a.state_dict())
    a(x.float(), y)
    d(x.float(), y)
    assert torch.equal(a.last_sampled, d.last_sampled)
    # index/targets of sample(): labels map into the sampled rows
    index, targets = a.sample(y, 123)
    assert index is not None
    assert torch.equal(index[targets], y)


def test_eval_mode_uses_every_centre_and_keeps_the_step() -> None:
    torch.manual_seed(0)
    full = ArcFaceLoss(N, D, scale=16.0, margin=0.5)
    pfc = PartialFC.from_loss(full, 0.1).eval()
    x, y = _batch(8)
    with torch.no_grad():
        value = pfc(x.float(), y)
        expected = full(x.float(), y)
    assert int(pfc.step) == 0
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradcheck_tiny() -> None:
    pfc = PartialFC(9, 4, ArcMargin(0.3), 3.0, sample_rate=0.4, seed=1).double()
    x, y = _batch(9, n=9, b=3)
    x = x[:, :4].contiguous().requires_grad_(True)
    w = pfc.weight.detach().clone().requires_grad_(True)

    def loss(xx: Tensor, ww: Tensor) -> Tensor:
        pfc.step.zero_()  # same sample on every call
        return torch.func.functional_call(pfc, {"weight": ww}, (xx, y))

    loss(x, w)
    assert pfc.last_sampled.numel() < 9
    assert torch.autograd.gradcheck(loss, (x, w), eps=1e-6, atol=1e-6)


def test_from_loss_rejects_unsupported_heads() -> None:
    for loss in (
        SphereFaceLoss(N, D),
        AdaCosLoss(N, D),
        SubCenterArcFaceLoss(N, D, k=2),
    ):
        with pytest.raises(ValueError):
            PartialFC.from_loss(loss, 0.5)


def test_input_is_checked() -> None:
    pfc = PartialFC(N, D, CosMargin(0.3), 10.0, sample_rate=0.5)
    x, y = _batch()
    with pytest.raises(ValueError):
        pfc(x.float(), torch.full_like(y, N))
    bad = x.float().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        pfc(bad, y)
    with pytest.raises(ValueError):
        pfc(torch.randn(B, D + 1), y)
    for rate in (0.0, 1.5):
        with pytest.raises(ValueError):
            PartialFC(N, D, CosMargin(0.3), 10.0, sample_rate=rate)


def test_shards_cover_the_classes_and_load_a_full_weight() -> None:
    for n, world in ((10, 3), (40, 4), (7, 7)):
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(2, 0, 3)
    # constructing a shard needs no process group; a full (N, D) weight loads as its rows
    shard = PartialFC(10, D, ArcMargin(0.5), 16.0, rank=1, world_size=3)
    assert (shard.class_start, shard.num_local) == (4, 3)
    full = torch.randn(10, D)
    state = shard.state_dict()
    state["weight"] = full
    shard.load_state_dict(state)
    assert torch.equal(shard.weight.detach(), full[4:7])


def test_sparse_grad_equals_the_dense_gradient_on_the_sampled_rows() -> None:
    torch.manual_seed(0)
    dense = PartialFC(N, D, ArcMargin(0.4), 16.0, sample_rate=0.25, seed=5).double()
    sparse = PartialFC(N, D, ArcMargin(0.4), 16.0, sample_rate=0.25, seed=5,
                       sparse_grad=True).double()
    sparse.load_state_dict(dense.state_dict())
    x, y = _batch(7)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = dense(x1, y), sparse(x2, y)
    a.backward()
    b.backward()
    assert torch.equal(dense.last_sampled, sparse.last_sampled)
    assert b.item() == pytest.approx(a.item(), rel=1e-14)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-14)
    grad = sparse.weight.grad
    assert grad is not None and grad.is_sparse
    grad = grad.coalesce()
    # exactly the sampled rows are stored, and they hold the dense gradient's values
    assert torch.equal(grad.indices()[0], sparse.last_sampled)
    torch.testing.assert_close(grad.to_dense(), dense.weight.grad, rtol=1e-12, atol=1e-14)


def test_sparse_grad_at_rate_one_is_dense() -> None:
    pfc = PartialFC(N, D, ArcMargin(0.4), 16.0, sample_rate=1.0, sparse_grad=True)
    x, y = _batch(8)
    pfc(x.float(), y).backward()
    assert pfc.weight.grad is not None and not pfc.weight.grad.is_sparse
    assert "sparse_grad=True" in repr(pfc)
