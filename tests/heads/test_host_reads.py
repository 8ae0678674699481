"""Partial FC and the chunked classifier head do not read the device back in a training step
beyond what they must: on a GPU every such read (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, boolean indexing, ``torch.unique``, ``nonzero``) waits for all queued kernels,
and the H200 profile of 2026-12-04 counted 28 of them per training step of the loop with
Partial FC (the head's, the loop's checks and the optimiser's together).

The reads are counted here on the CPU by the operators that perform them on a GPU
(:class:`facemetric.host_reads.HostReads`, a ``TorchDispatchMode`` that sees every operator of
the forward and the backward pass, plus ``Tensor.tolist`` and ``torch.tensor``, wrapped).
``reads_are_free`` is patched to answer as on a GPU, so the CPU runs the GPU's branches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from facemetric.heads import PartialFC
from facemetric.host_reads import HostReads
from facemetric.losses.classifier import ArcFaceLoss, chunked
from facemetric.losses.classifier.head import margin_cross_entropy
from facemetric.losses.margins import (
    ArcMargin,
    CombinedMargin,
    CosMargin,
    DynamicArcMargin,
    Margin,
)


@pytest.fixture
def as_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's branches as a GPU takes them (no read to choose a cheaper path)."""
    monkeypatch.setattr(chunked, "reads_are_free", lambda tensor: False)


def test_the_counter_sees_each_kind_of_read() -> None:
    t = torch.tensor([1.0, -2.0, 3.0])
    original, original_tensor = torch.Tensor.tolist, torch.tensor
    with HostReads() as c:
        int(t[0])
        bool((t > 0).any())
        _ = t[t > 0]
        torch.unique(t)
        torch.nonzero(t)
        t.tolist()
        torch.tensor(0.5, device=t.device)
    names = " ".join(c.reads)
    assert "_local_scalar_dense" in names
    assert "boolean mask" in names
    assert "_unique2" in names and "nonzero" in names
    assert "Tensor.tolist" in names and "torch.tensor(device=...)" in names
    assert len(c.reads) == 7
    assert torch.Tensor.tolist is original and torch.tensor is original_tensor  # unwrapped


def _pfc_step(pfc: PartialFC, x: Tensor, y: Tensor) -> None:
    x = x.clone().requires_grad_()
    pfc(x, y).backward()


@pytest.mark.parametrize(
    "margin", [ArcMargin(0.5), CosMargin(0.35), CombinedMargin(1.0, 0.3, 0.2)],
    ids=["arcface", "cosface", "combined"],
)
def test_a_partial_fc_step_reads_the_device_twice(margin: Margin, as_on_gpu) -> None:
    torch.manual_seed(0)
    pfc = PartialFC(20_000, 32, margin, 64.0, sample_rate=0.1, chunk_size=512)
    x = torch.randn(64, 32)
    y = torch.randint(0, 20_000, (64,))
    _pfc_step(pfc, x, y)  # the first step reads the step buffer once
    with HostReads() as c:
        for _ in range(3):
            _pfc_step(pfc, x, y)
    # per step: the input check (one transfer) and whether any of the 4 chunks'
    # log-sum-exp underflowed (one read for all)
    assert c.reads == ["Tensor.tolist", "aten._local_scalar_dense.default"] * 3
    assert int(pfc.step) == 4


def test_dynamic_margins_check_their_labels_in_one_read(as_on_gpu) -> None:
    counts = torch.randint(1, 50, (20_000,)).double()
    margin = DynamicArcMargin.from_counts(counts, a=0.5, b=0.05, lam=0.25)
    pfc = PartialFC(20_000, 32, margin, 64.0, sample_rate=0.1)
    x, y = torch.randn(64, 32), torch.randint(0, 20_000, (64,))
    _pfc_step(pfc, x, y)
    with HostReads() as c:
        _pfc_step(pfc, x, y)
    # the input check, the underflow check, then the margin's label range (φ comes after)
    assert c.reads == ["Tensor.tolist", "aten._local_scalar_dense.default", "Tensor.tolist"]


def test_partial_fc_reads_the_positives_only_when_they_could_exceed_the_sample(
    as_on_gpu,
) -> None:
    pfc = PartialFC(100, 8, ArcMargin(0.5), 16.0, sample_rate=0.1)  # samples 10 centres
    x, y = torch.randn(16, 8), torch.arange(16)  # 16 positives: more than 10
    _pfc_step(pfc, x, y)
    with HostReads() as c:
        _pfc_step(pfc, x, y)
    # the input check, the positives' count, the underflow
    assert c.reads == ["Tensor.tolist"] + ["aten._local_scalar_dense.default"] * 2
    assert pfc.last_sampled is not None and pfc.last_sampled.numel() == 16


def test_the_step_is_read_again_after_it_was_written() -> None:
    pfc = PartialFC(100, 8, ArcMargin(0.5), 16.0, sample_rate=0.3, seed=3)
    x, y = torch.randn(4, 8), torch.randint(0, 100, (4,))
    pfc(x, y)
    pfc(x, y)
    second = pfc.last_sampled
    pfc.step.fill_(1)  # an in-place write: the remembered value must not be used
    pfc(x, y)
    assert torch.equal(pfc.last_sampled, second)
    assert int(pfc.step) == 2
    other = PartialFC(100, 8, ArcMargin(0.5), 16.0, sample_rate=0.3, seed=3)
    other(x, y)  # remembers step 1 ...
    other.load_state_dict(pfc.state_dict())  # ... then is loaded at step 2
    pfc(x, y)
    other(x, y)
    assert torch.equal(other.last_sampled, pfc.last_sampled)


def _arcface_logits(x: Tensor, w: Tensor, y: Tensor, margin: float) -> Tensor:
    """cos θ with the target replaced by ArcFace's ψ (``cos θ − m·sin m`` past ``π − m``),
    through ``acos``, in float64 with autograd."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()
    target = cos.gather(1, y[:, None])
    theta = torch.acos(target.clamp(-1 + 1e-12, 1 - 1e-12))
    psi = torch.where(
        theta + margin < torch.pi,
        torch.cos(theta + margin),
        target - margin * torch.sin(torch.tensor(margin, dtype=x.dtype)),
    )
    return cos.scatter(1, y[:, None], psi)


def _reference_losses(x: Tensor, w: Tensor, y: Tensor, scale: float, margin: float) -> Tensor:
    """Per-sample ArcFace in float64, written out with autograd."""
    return F.cross_entropy(scale * _arcface_logits(x, w, y, margin), y, reduction="none")


@pytest.mark.parametrize("gpu_branches", [False, True], ids=["cpu", "gpu-branches"])
def test_negative_incoming_gradients_in_either_branch(
    gpu_branches: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if gpu_branches:
        monkeypatch.setattr(chunked, "reads_are_free", lambda tensor: False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 30, (10,), generator=gen)
    weights = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)  # mixed signs, one zero-ish
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    per = margin_cross_entropy(xa, wa, y, ArcMargin(0.3), 10.0, reduction="none", chunk_size=7)
    (per * weights).sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference_losses(xr, wr, y, 10.0, 0.3)
    (ref * weights).sum().backward()
    torch.testing.assert_close(per, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(wa.grad, wr.grad, rtol=1e-9, atol=1e-10)


def test_a_zero_scale_row_takes_u_from_the_features(as_on_gpu) -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 9, (5,), generator=gen)
    scale = torch.tensor([4.0, 0.0, 2.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    xa = x.clone().requires_grad_()
    per = margin_cross_entropy(xa, w, y, ArcMargin(0.2), scale, reduction="none")
    per.sum().backward()
    # at s_b = 0 every logit is 0 (ℓ_b = log C), but ∂ℓ_b/∂s_b still needs the target's u
    xr, sr = x.clone().requires_grad_(), scale.detach().clone().requires_grad_()
    logits = _arcface_logits(xr, w, y, 0.2) * sr[:, None]
    ref = F.cross_entropy(logits, y, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(per, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scale.grad, sr.grad, rtol=1e-9, atol=1e-12)


def test_the_full_arcface_head_step_reads_twice(as_on_gpu) -> None:
    torch.manual_seed(1)
    loss = ArcFaceLoss(3_000, 16, scale=64.0, margin=0.5, chunk_size=1_000)
    x = torch.randn(32, 16, requires_grad=True)
    y = torch.randint(0, 3_000, (32,))
    with HostReads() as c:
        loss(x, y).backward()
    assert c.reads == ["Tensor.tolist", "aten._local_scalar_dense.default"]
