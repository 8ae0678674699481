"""IResNet: parameter counts from the architecture by hand, shapes, training, eval mode."""

from __future__ import annotations

import pytest
import torch

from facemetric.models import IResidualUnit, IResNet, build_model


def unit_params(c_in: int, c: int) -> int:
    """One improved residual unit without its shortcut, layer by layer (no conv biases)."""
    bn1 = 2 * c_in  # BN scale + shift
    conv1 = 3 * 3 * c_in * c
    bn2 = 2 * c
    prelu = c  # one slope per channel
    conv2 = 3 * 3 * c * c
    bn3 = 2 * c
    return bn1 + conv1 + bn2 + prelu + conv2 + bn3


def iresnet_params(depths: tuple[int, int, int, int], d: int = 512) -> int:
    stem = 3 * 3 * 3 * 64 + 2 * 64 + 64  # conv3×3 3→64, BN, PReLU
    total, c_in = stem, 64
    for c, n in zip((64, 128, 256, 512), depths, strict=True):
        total += unit_params(c_in, c) + (c_in * c + 2 * c)  # stride 2: 1×1 conv + BN shortcut
        total += (n - 1) * unit_params(c, c)  # identity shortcuts
        c_in = c
    head = 2 * 512 + (512 * 7 * 7 * d + d) + 2 * d  # BN2d, FC over the 7×7 map, BN1d
    return total + head


DOCUMENTED = {"iresnet18": 24_025_600, "iresnet34": 34_139_328, "iresnet50": 43_590_848}
DEPTHS = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3)}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_one_unit_param_count():
    # stride-2 unit 64 → 128: 128 + 73,728 + 256 + 128 + 147,456 + 256 + shortcut (8,192 + 256)
    assert n_params(IResidualUnit(64, 128, stride=2)) == 230_400
    # identity unit 128 → 128: 256 + 147,456 + 256 + 128 + 147,456 + 256
    assert n_params(IResidualUnit(128, 128, stride=1)) == 295_808


def test_iresnet50_written_out():
    stem = 1_728 + 128 + 64
    stage1 = 3 * 74_176 + 4_224  # 64 → 64: three units (74,176 each) + one 1×1 shortcut
    stage2 = 221_952 + 8_448 + 3 * 295_808  # 64 → 128, 4 units
    stage3 = 886_272 + 33_280 + 13 * 1_181_440  # 128 → 256, 14 units
    stage4 = 3_542_016 + 132_096 + 2 * 4_722_176  # 256 → 512, 3 units
    head = 1_024 + 12_845_568 + 1_024  # BN2d(512), FC 25,088 → 512 with bias, BN1d(512)
    total = stem + stage1 + stage2 + stage3 + stage4 + head
    assert total == iresnet_params((3, 4, 14, 3)) == DOCUMENTED["iresnet50"]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_param_counts_match_the_hand_count(name):
    model = build_model(name)
    assert n_params(model) == iresnet_params(DEPTHS[name]) == DOCUMENTED[name]


def test_iresnet100_param_count():
    model = build_model("iresnet100")
    assert n_params(model) == iresnet_params((3, 13, 30, 3)) == 65_156_160
    assert abs(n_params(model) / 1e6 - 65.2) < 0.1  # ArcFace's LResNet100E-IR size


def test_param_count_follows_embedding_size():
    model = build_model("iresnet18", embedding_size=128)
    assert n_params(model) == iresnet_params((2, 2, 2, 2), d=128)


@pytest.mark.parametrize("d", [512, 128])
def test_output_shape_and_stage_maps(d):
    model = build_model("iresnet18", embedding_size=d).eval()
    sizes = []
    hooks = []
    for stage in model.stages:

        def hook(module, inputs, output) -> None:
            sizes.append(tuple(output.shape))

        hooks.append(stage.register_forward_hook(hook))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    for h in hooks:
        h.remove()
    assert out.shape == (2, d)
    assert sizes == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 256, 14, 14), (2, 512, 7, 7)]
    assert torch.isfinite(out).all()


def test_stride_sits_on_the_second_conv():
    unit = IResidualUnit(64, 128, stride=2)
    assert unit.conv1.stride == (1, 1) and unit.conv2.stride == (2, 2)


def test_training_steps_reduce_a_loss():
    model = build_model("iresnet18", embedding_size=16).train()
    x = torch.randn(2, 3, 112, 112)
    target = torch.randn(2, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert model.stem[0].weight.grad.abs().sum() > 0  # gradient reaches the first layer
    # Batch of 2: the final BN1d pins each dimension to ±1 before its affine, so the
    # reachable loss is bounded; ask for a steady decrease, not a collapse.
    assert losses[0] > losses[1] > losses[2]
    assert losses[-1] < 0.95 * losses[0]


def test_eval_mode_is_deterministic_and_per_sample():
    model = build_model("iresnet18", embedding_size=32, dropout=0.5)
    model.train()
    with torch.no_grad():  # move BN running statistics away from their initial values
        model(torch.randn(4, 3, 112, 112))
    model.eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)  # dropout off, no randomness
    torch.testing.assert_close(single, a[1:2], rtol=1e-4, atol=1e-4)  # running stats


def test_zero_init_residual_starts_units_as_their_shortcut():
    model = IResNet((2, 2, 2, 2), embedding_size=8, zero_init_residual=True).eval()
    unit = model.stages[1][1]
    x = torch.randn(1, 128, 28, 28)
    with torch.no_grad():
        assert torch.equal(unit(x), x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depths": (2, 2, 2)}, "four"),
        ({"depths": (2, 0, 2, 2)}, "four"),
        ({"depths": (2, 2, 2, 2), "dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IResNet(**kwargs)


def test_a_smaller_input_size_shrinks_the_maps_and_the_head():
    model = build_model("iresnet18", embedding_size=128, input_size=64).eval()
    # the 4×4 final map: the head's FC has 512·16·128 weights instead of 512·49·128
    full = build_model("iresnet18", embedding_size=128)
    assert n_params(full) - n_params(model) == 512 * (49 - 16) * 128
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape)))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    assert sizes == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
    with pytest.raises(ValueError, match="64×64"):
        model(torch.randn(1, 3, 112, 112))
    for bad in (100, 16, 64.0):
        with pytest.raises(ValueError, match="input_size"):
            build_model("iresnet18", input_size=bad)
