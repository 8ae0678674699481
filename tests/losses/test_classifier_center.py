"""Center loss (Wen et al. 2016): the centre term, its gradient, and the centre update."""

from __future__ import annotations

import pytest
import torch

from facemetric.losses.center import CenterLoss
from facemetric.losses.classifier import SoftmaxLoss

C, D = 6, 4


def _setup(seed: int = 0) -> tuple[CenterLoss, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    loss = CenterLoss(C, D, lam=0.3, alpha=0.4).double()
    with torch.no_grad():
        loss.centers.copy_(torch.randn(C, D, generator=gen, dtype=torch.float64))
        loss.weight.copy_(torch.randn(C, D, generator=gen, dtype=torch.float64))
        loss.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    x = torch.randn(8, D, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 5, 0, 2, 3, 3])
    return loss, x, labels


def test_center_update_follows_the_paper() -> None:
    loss, x, labels = _setup()
    before = loss.centers.clone()
    loss(x, labels)
    expected = before.clone()
    for j in range(C):
        members = [i for i in range(len(labels)) if int(labels[i]) == j]
        delta = sum((before[j] - x[i] for i in members), torch.zeros(D, dtype=torch.float64))
        expected[j] = before[j] - 0.4 * delta / (1 + len(members))
    torch.testing.assert_close(loss.centers, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(loss.centers[1], before[1]) and torch.equal(loss.centers[4], before[4])


def test_no_update_in_eval_mode_and_centres_are_a_buffer() -> None:
    loss, x, labels = _setup(1)
    before = loss.centers.clone()
    loss.eval()
    loss(x, labels)
    assert torch.equal(loss.centers, before)
    assert "centers" in dict(loss.named_buffers())
    assert "centers" not in dict(loss.named_parameters())


def test_value_and_gradient_are_softmax_plus_the_pull() -> None:
    loss, x, labels = _setup(2)
    loss.eval()
    soft = SoftmaxLoss(C, D).double()
    soft.load_state_dict({"weight": loss.weight, "bias": loss.bias})
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    value = loss(xa, labels)
    base = soft(xb, labels)
    value.backward()
    base.backward()
    pull = 0.0
    for b in range(len(labels)):
        pull += 0.5 * 0.3 * float(((x[b] - loss.centers[labels[b]]) ** 2).sum())
    pull /= len(labels)
    assert float(value.detach()) == pytest.approx(float(base.detach()) + pull, rel=1e-12)
    expected_grad = xb.grad.clone()
    for b in range(len(labels)):
        expected_grad[b] += 0.3 * (x[b] - loss.centers[labels[b]]) / len(labels)
    torch.testing.assert_close(xa.grad, expected_grad, rtol=1e-10, atol=1e-12)
    # the pull moves the features, never the classifier
    torch.testing.assert_close(loss.weight.grad, soft.weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.bias.grad, soft.bias.grad, rtol=1e-12, atol=1e-14)


def test_zero_lambda_is_softmax() -> None:
    loss = CenterLoss(C, D, lam=0.0).double()
    soft = SoftmaxLoss(C, D).double()
    soft.load_state_dict({"weight": loss.weight, "bias": loss.bias})
    x = torch.randn(5, D, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 4, 5])
    assert torch.equal(loss(x, labels), soft(x, labels))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        CenterLoss(C, D, lam=-1.0)
    with pytest.raises(ValueError):
        CenterLoss(C, D, alpha=1.5)
    loss = CenterLoss(C, D)
    with pytest.raises(ValueError):
        loss(torch.randn(3, D), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        loss(torch.full((2, D), float("nan")), torch.tensor([0, 1]))
