"""GeM pooling against a float64 loop, its limits (mean, max), gradients and its parameter."""

from __future__ import annotations

import math

import pytest
import torch

from facemetric.models.pooling import GeM


def gem_loop(x: torch.Tensor, p: float, eps: float) -> list[list[float]]:
    """Eq. 3 of Radenović et al., one channel at a time, in Python floats."""
    b, c, h, w = x.shape
    out = []
    for i in range(b):
        row = []
        for j in range(c):
            total = 0.0
            for y in range(h):
                for z in range(w):
                    total += max(float(x[i, j, y, z]), eps) ** p
            row.append((total / (h * w)) ** (1.0 / p))
        out.append(row)
    return out


@pytest.mark.parametrize("p", [1.0, 2.5, 3.0, 7.0])
def test_matches_a_float64_loop_with_negative_inputs_clamped(p):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)  # about half negative: clamped to eps
    pool = GeM(p=p, eps=1e-6).double()
    got = pool(x)
    assert got.shape == (3, 5, 1, 1)
    want = torch.tensor(gem_loop(x, p, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(got[:, :, 0, 0], want, rtol=1e-12, atol=1e-12)


def test_p_one_is_the_mean_and_a_large_p_approaches_the_max():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64) + 0.1  # positive: no clamping
    mean = GeM(p=1.0).double()(x)
    torch.testing.assert_close(mean, x.mean(dim=(2, 3), keepdim=True), rtol=1e-12, atol=0)
    big = GeM(p=200.0).double()(x)
    top = x.amax(dim=(2, 3), keepdim=True)
    # (mean of x^p)^(1/p) lies in [max · (1/25)^(1/p), max]: within 1.6% of the max at p = 200
    assert (big <= top + 1e-12).all()
    assert (big >= top * (1 / 25) ** (1 / 200) - 1e-12).all()
    assert (big > mean).all()


def test_gradients_in_the_input_and_the_exponent():
    torch.manual_seed(2)
    x = (torch.rand(2, 3, 3, 3, dtype=torch.float64) + 0.05).requires_grad_()
    pool = GeM(p=2.7).double()
    assert torch.autograd.gradcheck(lambda t: pool(t), (x,))

    # the exponent as an input, so gradcheck compares its analytic gradient with finite
    # differences as well
    p = torch.tensor([2.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, t: torch.func.functional_call(pool, {"p": q}, (t,)), (p, x)
    )


def test_the_exponent_is_learnt_or_fixed():
    learnt = GeM(p=3.0)
    assert [n for n, _ in learnt.named_parameters()] == ["p"]
    opt = torch.optim.SGD(learnt.parameters(), lr=0.1)
    x = torch.rand(4, 8, 3, 3) + 0.1
    learnt(x).sum().backward()
    opt.step()
    assert not math.isclose(float(learnt.p.detach()), 3.0)
    fixed = GeM(p=3.0, learn_p=False)
    assert list(fixed.parameters()) == []
    assert set(fixed.state_dict()) == {"p"}  # a buffer: saved with the checkpoint


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"p": 0.0}, "exponent"), ({"eps": 0.0}, "clamp")]
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GeM(**kwargs)


def test_needs_a_4d_map():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        GeM()(torch.rand(2, 8))
