"""RowSparseSGD (lazy row-wise SGD for sparse gradients) and clip_grad_norm: checked
against torch.optim.SGD on dense gradients (bit for bit), a float64 loop reference of the
lazy-momentum rule, and torch's clipping on the densified gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facemetric.training import RowSparseSGD, clip_grad_norm

N, D = 9, 4
SETTINGS = [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": False},
    {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.0, "nesterov": True},
    {"lr": 0.2, "momentum": 0.0, "weight_decay": 0.1, "nesterov": False},
]
# rows touched per step; repeats are summed by the sparse gradient's coalescing
STEPS = [[1, 4, 4, 7], [0, 4], [8, 1, 2], [4, 7, 7, 7]]


def _targets(step: int) -> torch.Tensor:
    return torch.randn(len(STEPS[step]), D, generator=torch.Generator().manual_seed(step),
                       dtype=torch.float64)


def _loss(rows_of_w: torch.Tensor, step: int) -> torch.Tensor:
    return ((rows_of_w - _targets(step)) ** 2).sum() * 0.5


@pytest.mark.parametrize("hp", SETTINGS)
def test_dense_gradients_match_torch_sgd_bit_for_bit(hp: dict) -> None:
    torch.manual_seed(0)
    w0 = torch.randn(N, D)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours, theirs = RowSparseSGD([a], **hp), torch.optim.SGD([b], **hp)
    for step in range(len(STEPS)):
        for p, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            _loss(p[STEPS[step]].double(), step).backward()
            opt.step()
        assert torch.equal(a, b)
    if hp["momentum"]:
        assert torch.equal(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])


@pytest.mark.parametrize("hp", SETTINGS)
def test_sparse_gradients_follow_the_lazy_row_rule(hp: dict) -> None:
    torch.manual_seed(1)
    w0 = torch.randn(N, D, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = RowSparseSGD([p], **hp)
    # loop reference: only the touched rows move, only their momentum changes
    w, v = w0.clone(), torch.zeros(N, D, dtype=torch.float64)
    lr, mu, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    for step, rows in enumerate(STEPS):
        opt.zero_grad()
        index = torch.tensor(rows)
        _loss(F.embedding(index, p, sparse=True), step).backward()
        assert p.grad is not None and p.grad.is_sparse
        opt.step()
        grad = torch.zeros(N, D, dtype=torch.float64)
        grad.index_add_(0, index, w[index] - _targets(step))
        for r in sorted(set(rows)):
            g = grad[r] + wd * w[r]
            if mu:
                v[r] = mu * v[r] + g
                u = g + mu * v[r] if hp["nesterov"] else v[r]
            else:
                u = g
            w[r] = w[r] - lr * u
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-14)
    untouched = sorted(set(range(N)) - {r for rows in STEPS for r in rows})
    assert untouched and torch.equal(p.detach()[untouched], w0[untouched])
    if mu:
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], v, rtol=0, atol=1e-14)


def test_sparse_equals_dense_sgd_when_every_row_is_touched() -> None:
    w0 = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    ours, theirs = RowSparseSGD([a], **hp), torch.optim.SGD([b], **hp)
    index = torch.arange(N)
    for _ in range(3):
        for p, opt, sparse in ((a, ours, True), (b, theirs, False)):
            opt.zero_grad()
            F.embedding(index, p, sparse=sparse).pow(3).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_mixed_parameters_and_state_dict_resume_exactly() -> None:
    def make() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(3)
        return (torch.nn.Parameter(torch.randn(N, D, generator=gen)),
                torch.nn.Parameter(torch.randn(D, generator=gen)))

    def run(steps: range, table, bias, opt) -> None:
        for s in steps:
            opt.zero_grad()
            rows = F.embedding(torch.tensor(STEPS[s % len(STEPS)]), table, sparse=True)
            (rows.float() @ bias).square().sum().backward()
            opt.step()

    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    t1, b1 = make()
    o1 = RowSparseSGD([t1, b1], **hp)
    run(range(6), t1, b1, o1)
    t2, b2 = make()
    o2 = RowSparseSGD([t2, b2], **hp)
    run(range(3), t2, b2, o2)
    saved = o2.state_dict()
    t3, b3 = torch.nn.Parameter(t2.detach().clone()), torch.nn.Parameter(b2.detach().clone())
    o3 = RowSparseSGD([t3, b3], **hp)
    o3.load_state_dict(saved)
    run(range(3, 6), t3, b3, o3)
    assert torch.equal(t3, t1) and torch.equal(b3, b1)


def test_sparse_gradients_refuse_dampening() -> None:
    p = torch.nn.Parameter(torch.randn(N, D))
    opt = RowSparseSGD([p], lr=0.1, momentum=0.9, dampening=0.1)
    F.embedding(torch.tensor([1]), p, sparse=True).sum().backward()
    with pytest.raises(ValueError, match="dampening"):
        opt.step()


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_with_sparse_and_dense_gradients(max_norm: float) -> None:
    gen = torch.Generator().manual_seed(4)
    table = torch.nn.Parameter(torch.randn(N, D, generator=gen, dtype=torch.float64))
    vec = torch.nn.Parameter(torch.randn(D, generator=gen, dtype=torch.float64))
    rows = F.embedding(torch.tensor([2, 5, 5]), table, sparse=True)
    (rows @ vec).pow(2).sum().backward()
    dense_table = table.grad.to_dense()
    ref_t = torch.nn.Parameter(table.detach().clone())
    ref_v = torch.nn.Parameter(vec.detach().clone())
    ref_t.grad, ref_v.grad = dense_table.clone(), vec.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_([ref_t, ref_v], max_norm)
    norm = clip_grad_norm([table, vec], max_norm)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-12)
    assert table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), ref_t.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(vec.grad, ref_v.grad, rtol=1e-12, atol=1e-15)
