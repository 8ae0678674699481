"""MobileFaceNet: hand parameter count, shapes, GDC, training step, eval determinism."""

from __future__ import annotations

import pytest
import torch

from facemetric.models import MobileFaceNet, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bottleneck_params(c_in: int, c_out: int, t: int) -> int:
    h = c_in * t
    expand = c_in * h + 2 * h + h  # 1×1 conv, BN, PReLU
    depthwise = 9 * h + 2 * h + h  # 3×3 depthwise conv, BN, PReLU
    project = h * c_out + 2 * c_out  # linear 1×1 conv, BN
    return expand + depthwise + project


def mobilefacenet_params(d: int, narrow: int = 64, wide: int = 128) -> int:
    """The hand count; ``narrow``/``wide``: the stem's and first stage's channels, the later
    stages' (64/128 in the paper)."""
    n, w = narrow, wide
    stem = (27 * n + 2 * n + n) + (9 * n + 2 * n + n)  # conv3×3/2, depthwise conv3×3
    blocks = (
        5 * bottleneck_params(n, n, 2)  # the first has stride 2, same parameters
        + bottleneck_params(n, w, 4)
        + 6 * bottleneck_params(w, w, 2)
        + bottleneck_params(w, w, 4)
        + 2 * bottleneck_params(w, w, 2)
    )
    expand = w * 512 + 2 * 512 + 512
    gdc = 7 * 7 * 512 + 2 * 512  # one 7×7 filter per channel, BN, no PReLU
    embed = 512 * d + 2 * d  # linear 1×1 conv (no bias), BN1d
    return stem + blocks + expand + gdc + embed


def test_param_count_matches_the_hand_count():
    # Written out for d = 512: 1,920 + 768 (stem) + 92,160 + 53,248 + 417,792 + 139,008
    # + 139,264 (bottlenecks) + 67,072 + 26,112 + 263,168 (head) = 1,200,512.
    assert mobilefacenet_params(512) == 1_200_512
    assert n_params(build_model("mobilefacenet")) == 1_200_512


def test_param_count_with_the_papers_128_d_embedding():
    model = build_model("mobilefacenet", embedding_size=128)
    assert n_params(model) == mobilefacenet_params(128) == 1_003_136
    assert abs(n_params(model) / 1e6 - 0.99) < 0.02  # the paper reports 0.99M


@pytest.mark.parametrize("d", [512, 128])
def test_output_shape_and_final_map(d):
    model = build_model("mobilefacenet", embedding_size=d).eval()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = tuple(output.shape)

        return hook

    model.blocks.register_forward_hook(record("blocks"))
    model.gdc.register_forward_hook(record("gdc"))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, d)
    assert seen["blocks"] == (2, 128, 7, 7)
    assert seen["gdc"] == (2, 512, 1, 1)


def test_gdc_is_a_depthwise_7x7():
    conv = MobileFaceNet().gdc[0]
    assert conv.groups == 512 and conv.kernel_size == (7, 7) and conv.weight.shape == (512, 1, 7, 7)


def test_training_steps_reduce_a_loss():
    model = build_model("mobilefacenet", embedding_size=16).train()
    x = torch.randn(4, 3, 112, 112)
    target = torch.randn(4, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0]


def test_eval_mode_is_deterministic_and_per_sample():
    model = build_model("mobilefacenet", embedding_size=32).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 112, 112))
    model.eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        a, b, single = model(x), model(x), model(x[2:3])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[2:3], rtol=1e-4, atol=1e-4)


def test_smaller_input_size_shrinks_only_the_global_depthwise_conv():
    small = build_model("mobilefacenet", embedding_size=128, input_size=64).eval()
    full = build_model("mobilefacenet", embedding_size=128).eval()
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    # the 512-channel depthwise GDC kernel goes from 7×7 to 4×4: 512·(49 − 16) weights fewer
    assert n_full - n_small == 512 * (49 - 16)
    with pytest.raises(ValueError, match="must be 64×64"):
        small(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("mobilefacenet", input_size=100)
    for wrong in (64.0, "64", True):  # a TOML float or string is refused at once, by name
        with pytest.raises(ValueError, match="input_size must be an int"):
            build_model("mobilefacenet", input_size=wrong)


def test_dropout_acts_in_training_only_and_keeps_the_checkpoint_keys():
    plain = build_model("mobilefacenet", embedding_size=16, input_size=32)
    dropped = build_model("mobilefacenet", embedding_size=16, input_size=32, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))  # identity at evaluation
    # in training, dropout zeroes about half of the 512 pooled features seen by the embedding
    features = []
    dropped.train()
    handle = dropped.embed.register_forward_hook(lambda m, inp, out: features.append(inp[0]))
    dropped(x)
    handle.remove()
    zero = (features[0] == 0).float().mean().item()
    assert 0.4 < zero < 0.6
    with pytest.raises(ValueError, match="dropout"):
        build_model("mobilefacenet", dropout=1.0)


def test_gem_pool_replaces_the_gdc_and_feeds_the_embedding_its_generalised_mean():
    torch.manual_seed(0)
    gdc = build_model("mobilefacenet", embedding_size=128)
    gem = build_model("mobilefacenet", embedding_size=128, pool="gem")
    # the GDC's 7·7·512 weights and its BN's 2·512 go, one learnt exponent comes
    assert n_params(gem) == mobilefacenet_params(128) - (7 * 7 * 512 + 2 * 512) + 1
    assert "gem.p" in gem.state_dict() and not any(k.startswith("gdc.") for k in gem.state_dict())
    assert not any(k.startswith("gem.") for k in gdc.state_dict())  # old checkpoints load
    gem.eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, from_input: bool):  # a hook that returns None leaves the output alone
        def hook(module, inputs, output) -> None:
            seen[name] = inputs[0] if from_input else output

        return hook

    gem.expand.register_forward_hook(keep("map", False))
    gem.embed.register_forward_hook(keep("pooled", True))
    with torch.no_grad():
        out = gem(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128)
    feature_map = seen["map"].double()  # (2, 512, 7, 7), PReLU output: some negatives
    assert (feature_map < 0).any()
    p = float(gem.gem.p.detach())
    want = feature_map.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    torch.testing.assert_close(seen["pooled"][:, :, 0, 0].double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool must be one of"):
        build_model("mobilefacenet", pool="avg")


def test_width_scales_the_trunk_channels_and_keeps_the_head():
    # width 1 is the paper's 64/128 (its hand count, so its checkpoints load); 1.5 × 64 = 96,
    # 1.5 × 128 = 192; 1.3 × 64 = 83.2 → 80, 1.3 × 128 = 166.4 → 168
    cases = ((1.0, 64, 128), (1.5, 96, 192), (1.3, 80, 168), (0.5, 32, 64), (2, 128, 256))
    for width, narrow, wide in cases:
        model = build_model("mobilefacenet", embedding_size=128, width=width)
        assert n_params(model) == mobilefacenet_params(128, narrow, wide), width
        assert model.stem[0][0].out_channels == narrow
        assert model.blocks[-1].body[-1][0].out_channels == wide
        assert model.gdc[0].weight.shape == (512, 1, 7, 7)  # the head as the paper's
    assert n_params(build_model("mobilefacenet", embedding_size=128, width=1.5)) == 2_047_808
    wide64 = build_model("mobilefacenet", embedding_size=128, input_size=64, width=1.5).eval()
    with torch.no_grad():
        assert wide64(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    for wrong in (0.2, 5.0, "1.5", True):
        with pytest.raises(ValueError, match="width must"):
            build_model("mobilefacenet", width=wrong)
