"""WeightedLossSum against float64 loops of its terms (N-pair and ArcFace), its parameters and
its refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from facemetric.losses import ArcFaceLoss, NPairLoss, TripletLoss, WeightedLossSum


def _npair_loop(x: Tensor, labels: list[int], l2_reg: float) -> Tensor:
    """Sohn 2016 on every positive pair (dot-product similarity), written out per pair."""
    n = len(labels)
    pairs = [(a, p) for a in range(n) for p in range(n) if a != p and labels[a] == labels[p]]
    total = torch.zeros((), dtype=torch.float64)
    targets = sorted({p for _, p in pairs})
    for a, p in pairs:
        inner = torch.zeros((), dtype=torch.float64)
        for j in targets:
            if labels[j] != labels[a]:
                inner = inner + torch.exp(torch.dot(x[a], x[j]) - torch.dot(x[a], x[p]))
        total = total + torch.log1p(inner)
    used = sorted({i for e in pairs for i in e})
    reg = sum(torch.dot(x[i], x[i]) for i in used) / len(used)
    return total / len(pairs) + l2_reg * reg


def _arcface_loop(x: Tensor, w: Tensor, labels: list[int], s: float, m: float) -> Tensor:
    """ArcFace's cross-entropy, one logit at a time (easy-margin fallback past π − m)."""
    total = torch.zeros((), dtype=torch.float64)
    for b, y in enumerate(labels):
        logits = []
        for c in range(w.shape[0]):
            cos = torch.dot(x[b], w[c]) / (torch.linalg.norm(x[b]) * torch.linalg.norm(w[c]))
            if c == y:
                theta = torch.acos(cos)
                cos = (torch.cos(theta + m) if float(theta.detach()) <= math.pi - m
                       else cos - m * math.sin(m))
            logits.append(s * cos)
        row = torch.stack(logits)
        total = total + torch.logsumexp(row, 0) - row[y]
    return total / len(labels)


LABELS = [0, 0, 1, 1, 2, 2, 1, 0]


def test_value_and_gradients_equal_the_weighted_float64_loops() -> None:
    torch.manual_seed(0)
    x = torch.randn(len(LABELS), 5, dtype=torch.float64, requires_grad=True)
    arc = ArcFaceLoss(num_classes=3, embedding_size=5, scale=16.0, margin=0.3).double()
    total = WeightedLossSum([(1.0, NPairLoss(l2_reg=0.02)), (0.25, arc)])
    labels = torch.tensor(LABELS)
    value = total(x, labels)
    value.backward()
    got_x, got_w = x.grad.clone(), arc.weight.grad.clone()

    x2 = x.detach().clone().requires_grad_(True)
    w2 = arc.weight.detach().clone().requires_grad_(True)
    npair = _npair_loop(x2, LABELS, 0.02)
    arcv = _arcface_loop(x2, w2, LABELS, 16.0, 0.3)
    expected = npair + 0.25 * arcv
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_x, x2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_w, w2.grad, rtol=1e-9, atol=1e-12)
    assert {k: float(v) for k, v in total.last.items()} == pytest.approx(
        {"0.NPairLoss": float(npair.detach()), "1.ArcFaceLoss": float(arcv.detach())}, rel=1e-9)


def test_gradcheck() -> None:
    torch.manual_seed(1)
    arc = ArcFaceLoss(num_classes=3, embedding_size=4, scale=8.0, margin=0.2).double()
    total = WeightedLossSum([(0.5, TripletLoss(margin=0.3)), (2.0, arc)])
    x = torch.randn(len(LABELS), 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: total(e, torch.tensor(LABELS)), (x,))


def test_the_terms_parameters_are_its_own() -> None:
    arc = ArcFaceLoss(num_classes=7, embedding_size=4)
    total = WeightedLossSum([(1.0, NPairLoss()), (1.0, arc)])
    assert [p is arc.weight for p in total.parameters()] == [True]
    assert list(total.state_dict()) == ["terms.1.weight"]
    assert repr(total).count("1×ArcFaceLoss") == 1


@pytest.mark.parametrize(("terms", "pattern"), [
    ([], "at least one"),
    ([(0.0, NPairLoss())], "weight must be a finite number > 0, got 0.0"),
    ([(1.0, NPairLoss()), (-1.0, NPairLoss())], "term 1 .NPairLoss.: weight"),
    ([(float("nan"), NPairLoss())], "got nan"),
    ([(1.0, "npair")], "term 0 is str, not a loss module"),
])
def test_refusals(terms, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        WeightedLossSum(terms)
