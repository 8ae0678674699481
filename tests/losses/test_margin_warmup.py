"""``WarmupMargin`` and ``[loss] margin_warmup_steps``: the ramp against closed forms, the
loss at step 0 against a float64 normalised-softmax loop, resume, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from facemetric.losses import ArcFaceLoss
from facemetric.losses.margins import ArcMargin, CosMargin, WarmupMargin
from facemetric.training import config_from_dict
from facemetric.training.builders import build_loss
from facemetric.training.config import LossConfig

COS = torch.linspace(-0.95, 0.95, 39, dtype=torch.float64)
LABELS = torch.zeros(39, dtype=torch.int64)


def test_cos_margin_ramps_linearly_from_zero_to_m():
    warm = WarmupMargin(CosMargin(0.4), steps=4)
    warm.train()
    for t in range(7):  # ψ_t = cos − min(1, t/4)·0.4 exactly, for an additive cosine margin
        got = warm(COS, LABELS)
        assert torch.allclose(got, COS - 0.4 * min(1.0, t / 4), atol=1e-12)
    assert int(warm.iteration) == 7


def test_arc_margin_blend_and_eval_mode_does_not_count():
    warm = WarmupMargin(ArcMargin(0.5, fallback=False), steps=10)
    warm.train()
    for _ in range(3):
        warm(COS, LABELS)
    warm.eval()
    theta = torch.arccos(COS)
    want = 0.7 * COS + 0.3 * torch.cos(theta + 0.5)  # α = 3/10
    for _ in range(5):
        assert torch.allclose(warm(COS, LABELS), want, atol=1e-9)
    assert int(warm.iteration) == 3 and warm.current_alpha() == pytest.approx(0.3)


def test_gradcheck_mid_ramp():
    warm = WarmupMargin(ArcMargin(0.5), steps=4).eval()
    warm.iteration.fill_(1)
    cos = torch.linspace(-0.9, 0.9, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: warm(c, LABELS[:11]), (cos,))


def test_arcface_at_step_zero_is_the_normalised_softmax():
    torch.manual_seed(0)
    loss = ArcFaceLoss(5, 4, scale=16.0, margin=0.5).double()
    loss.margin = WarmupMargin(loss.margin, steps=100)
    emb = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    got = loss.train()(emb, labels).item()
    w = loss.weight.detach()
    total = 0.0
    for b in range(6):  # float64 loop: −log softmax(s·cos θ_b·)[y_b], no margin at all
        x = emb[b] / math.sqrt(float(emb[b] @ emb[b]))
        logits = [16.0 * float(x @ w[c]) / math.sqrt(float(w[c] @ w[c])) for c in range(5)]
        top = max(logits)
        lse = top + math.log(sum(math.exp(v - top) for v in logits))
        total += lse - logits[int(labels[b])]
    assert got == pytest.approx(total / 6, rel=1e-10)
    later = loss(emb, labels).item()  # α = 1/100 now: the margin has begun to bite
    assert later > got


def test_state_dict_resumes_the_ramp():
    warm = WarmupMargin(CosMargin(0.3), steps=10).train()
    for _ in range(6):
        warm(COS, LABELS)
    other = WarmupMargin(CosMargin(0.3), steps=10)
    other.load_state_dict(warm.state_dict())
    assert other.current_alpha() == pytest.approx(0.6)


def test_config_wraps_margin_losses_and_refuses_the_others():
    cfg = LossConfig(name="cosface", margin_warmup_steps=50, params={"scale": 32.0})
    loss = build_loss(cfg, num_classes=3, embedding_size=8)
    assert isinstance(loss.margin, WarmupMargin) and loss.margin.steps == 50
    assert isinstance(loss.margin.inner, CosMargin)
    for name in ("softmax", "normface", "sphereface", "triplet"):
        with pytest.raises(ValueError, match="margin_warmup_steps"):
            build_loss(LossConfig(name=name, margin_warmup_steps=5), 3, 8)
    with pytest.raises(ValueError, match="margin_warmup_steps must be >= 0"):
        config_from_dict({"data": {"root": "x"}, "loss": {"name": "arcface",
                                                          "margin_warmup_steps": -1}})
    parsed = config_from_dict({"data": {"root": "x"},
                               "loss": {"name": "arcface", "margin_warmup_steps": 30}})
    assert parsed.loss.margin_warmup_steps == 30 and "margin_warmup_steps" not in parsed.loss.params


def test_invalid_warmups_raise():
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        WarmupMargin(CosMargin(0.3), steps=0)
    with pytest.raises(ValueError, match="wrap it once"):
        WarmupMargin(WarmupMargin(CosMargin(0.3), steps=3), steps=3)
