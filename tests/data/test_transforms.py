"""Augmentation ops on synthetic images: exact effects, sizes, ranges, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facemetric.data.transforms import (
    LUMA,
    ColorJitter,
    Compose,
    GaussianBlur,
    HorizontalFlip,
    PoseDraw,
    RandomGrayscale,
    RandomPose,
    RandomResizedCrop,
    Resize,
    ToTensor,
    eval_transform,
    pose_maps,
    sample_seeds,
    train_transform,
)


def _image(h: int = 24, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_flip_is_exact_mirror_and_respects_probability():
    img = _image()
    out = HorizontalFlip(p=1.0)(img, _rng())
    for x in range(img.shape[1]):
        np.testing.assert_array_equal(out[:, x], img[:, img.shape[1] - 1 - x])
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(HorizontalFlip(p=0.0)(img, _rng()), img)
    flips = [not np.array_equal(HorizontalFlip(0.5)(img, _rng(s)), img) for s in range(200)]
    assert 70 < sum(flips) < 130


@pytest.mark.parametrize("size", [8, 16, (12, 10), 31])
@pytest.mark.parametrize("padding", [0, 3])
def test_random_resized_crop_output_size(size, padding):
    op = RandomResizedCrop(size, scale=(0.3, 1.0), ratio=(0.5, 2.0), padding=padding)
    want = (size, size) if isinstance(size, int) else size
    for seed in range(10):
        out = op(_image(), _rng(seed))
        assert out.shape == (*want, 3)
        assert out.dtype == np.uint8


def test_crop_of_full_scale_without_padding_is_identity():
    img = _image(16, 16)
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(img, _rng(3))
    np.testing.assert_array_equal(out, img)


def test_padding_with_full_scale_is_a_translation_of_the_zero_padded_image():
    img = _image(16, 16)
    pad = 3
    padded = np.zeros((16 + 2 * pad, 16 + 2 * pad, 3), np.uint8)
    padded[pad:-pad, pad:-pad] = img
    op = RandomResizedCrop((22, 22), scale=(1.0, 1.0), ratio=(1.0, 1.0), padding=pad,
                           fill_zero=True)
    np.testing.assert_array_equal(op(img, _rng(0)), padded)  # the box is the whole image
    small = RandomResizedCrop((16, 16), scale=(0.53, 0.53), ratio=(1.0, 1.0), padding=pad,
                               fill_zero=True)
    offsets = set()
    for seed in range(30):
        out = small(img, _rng(seed))
        hits = [
            (t, left)
            for t in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            if np.array_equal(padded[t : t + 16, left : left + 16], out)
        ]
        assert hits, "the output must be a 16×16 window of the padded image"
        offsets.add(hits[0])
    assert len(offsets) > 3


def test_color_jitter_brightness_scales_values():
    img = np.full((4, 4, 3), 100, np.uint8)
    out = ColorJitter(brightness=0.5)(img, _rng(1))
    values = np.unique(out)
    assert values.size == 1 and 50 <= values[0] <= 150 and values[0] != 100


def test_contrast_and_saturation_leave_a_constant_gray_image_unchanged():
    img = np.full((5, 5, 3), 77, np.uint8)
    op = ColorJitter(contrast=0.9, saturation=0.9)
    for seed in range(5):
        np.testing.assert_array_equal(op(img, _rng(seed)), img)


def test_saturation_zero_factor_bounds_and_range():
    img = _image()
    out = ColorJitter(0.4, 0.4, 0.4)(img, _rng(2))
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert not np.array_equal(out, img)


def test_grayscale_makes_channels_equal_to_luma():
    img = _image()
    out = RandomGrayscale(p=1.0)(img, _rng())
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 1], out[..., 2])
    luma = np.clip(np.rint(img.astype(np.float64) @ LUMA.astype(np.float64)), 0, 255)
    assert np.abs(out[..., 0].astype(int) - luma.astype(int)).max() <= 1
    np.testing.assert_array_equal(RandomGrayscale(p=0.0)(img, _rng()), img)


def test_gaussian_blur_smooths_noise_and_keeps_constants():
    noise = _image(32, 32)
    out = GaussianBlur(p=1.0, sigma=(1.0, 1.0))(noise, _rng())
    assert out.astype(float).std() < 0.6 * noise.astype(float).std()
    assert abs(out.astype(float).mean() - noise.astype(float).mean()) < 3
    flat = np.full((9, 9, 3), 200, np.uint8)
    np.testing.assert_array_equal(GaussianBlur(p=1.0)(flat, _rng()), flat)
    np.testing.assert_array_equal(GaussianBlur(p=0.0)(noise, _rng()), noise)


def test_to_tensor_normalises_to_minus_one_one():
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 0] = [255, 0, 128]
    x = ToTensor()(img, _rng())
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[0, 0, 0] == 1.0 and x[1, 0, 0] == -1.0
    assert float(x[2, 0, 0]) == pytest.approx((128 / 255 - 0.5) / 0.5, abs=1e-6)
    assert x[:, 1, 1].tolist() == [-1.0, -1.0, -1.0]


def test_pipeline_is_deterministic_given_the_seed_and_in_range():
    op = train_transform(16, crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25), padding=2,
                         brightness=0.3, contrast=0.3, saturation=0.3, blur_prob=0.5,
                         grayscale_prob=0.3)
    img = _image(30, 26)
    a = op(img, _rng(42))
    b = op(img, _rng(42))
    assert torch.equal(a, b)
    assert a.shape == (3, 16, 16)
    assert a.min() >= -1.0 and a.max() <= 1.0
    others = [op(img, _rng(s)) for s in range(5)]
    assert sum(not torch.equal(a, o) for o in others) >= 4


def test_ops_never_touch_the_global_rng():
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    train_transform(16, padding=2, brightness=0.3, blur_prob=1.0)(_image(), _rng(0))
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_eval_transform_and_resize():
    out = eval_transform((10, 12))(_image(20, 24), _rng())
    assert out.shape == (3, 10, 12)
    assert Resize(7)(_image(), _rng()).shape == (7, 7, 3)
    assert isinstance(Compose([Resize(7)]).ops[0], Resize)


def test_sample_seeds_are_pure_and_distinct():
    a = sample_seeds(0, 1, 2, 8)
    assert a == sample_seeds(0, 1, 2, 8)
    assert len(set(a)) == 8
    assert a != sample_seeds(0, 1, 3, 8) and a != sample_seeds(0, 2, 2, 8)
    assert a != sample_seeds(1, 1, 2, 8)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        HorizontalFlip(1.0)(np.zeros((4, 4, 3), np.float32), _rng())
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ToTensor()(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="probability"):
        RandomGrayscale(1.5)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(8, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=2.0)


def _forward(draw: PoseDraw, x: float, y: float, h: int, w: int) -> tuple[float, float] | None:
    """Where source pixel (x, y) lands, computed forward in float64 with 3-D vectors: the photo
    on a cylinder of radius (w − 1)/2 about the image centre, turned about the vertical axis,
    seen orthographically (``None``: turned out of sight), then rolled, zoomed, shifted."""
    cx, cy, r = (w - 1) / 2, (h - 1) / 2, (w - 1) / 2
    phi = np.arcsin(np.clip((x - cx) / r, -1.0, 1.0))
    point = np.array([r * np.sin(phi), y - cy, r * np.cos(phi)])  # z towards the camera
    t = draw.yaw
    turn = np.array([[np.cos(t), 0.0, np.sin(t)], [0.0, 1.0, 0.0],
                     [-np.sin(t), 0.0, np.cos(t)]])
    px, py, pz = turn @ point
    if pz < -1e-3:  # behind the rim (a float32 map may read the rim itself at -1e-6)
        return None
    c, s = np.cos(draw.roll), np.sin(draw.roll)
    ox, oy = draw.zoom * (c * px - s * py), draw.zoom * (s * px + c * py)
    return cx + draw.dx + ox, cy + draw.dy + oy


def test_pose_maps_invert_a_turned_cylinder_computed_forward():
    h, w = 48, 56
    for draw in (PoseDraw(0.5, 0.0, 1.0, 0.0, 0.0), PoseDraw(-0.8, 0.3, 0.9, 4.0, -3.0),
                 PoseDraw(0.2, -0.2, 1.1, -5.0, 2.0)):
        map_x, map_y = pose_maps(draw, h, w)
        seen = np.argwhere(map_x >= 0)
        assert len(seen) > h * w // 3
        # every output pixel that sees the photo reads the source point that lands on it
        for i, j in seen[::7]:
            landed = _forward(draw, float(map_x[i, j]), float(map_y[i, j]), h, w)
            assert landed is not None
            np.testing.assert_allclose(landed, (j, i), atol=2e-3)
    # a quarter turn away: the far half of the photo is out of sight, the output black there
    map_x, _ = pose_maps(PoseDraw(np.radians(60.0), 0.0, 1.0, 0.0, 0.0), h, w)
    # (output columns left of c − r sin 30° = 13.75 show nothing)
    assert (map_x[:, :13] == -1).all() and (map_x[:, 15:] >= 0).all()
    # what stays in sight is the source left of c + r sin 30° = 41.25: the rest turned away
    assert map_x[map_x >= 0].min() < 6
    assert map_x.max() == pytest.approx((w - 1) / 2 * (1 + np.sin(np.pi / 6)), abs=1e-4)
    with pytest.raises(ValueError, match="radius"):
        pose_maps(PoseDraw(0.0, 0.0, 1.0, 0.0, 0.0), h, w, radius=0.0)


def test_random_pose_moves_a_point_where_the_forward_model_says_and_fills_black():
    img = np.zeros((64, 64, 3), np.uint8)
    img[20:23, 36:39] = 255  # a 3×3 dot centred on (x, y) = (37, 21)
    op = RandomPose(1.0, yaw=45.0, roll=20.0, scale=(0.8, 1.1), shift=0.1)
    for seed in range(8):
        out = op(img, _rng(seed))
        rng = _rng(seed)
        rng.random()  # the p draw
        seen = _forward(op.draw(rng, 64, 64), 37.0, 21.0, 64, 64)
        assert seen is not None
        ys, xs = np.nonzero(out[..., 0])
        weights = out[ys, xs, 0].astype(float)
        centroid = (np.sum(xs * weights) / weights.sum(), np.sum(ys * weights) / weights.sum())
        np.testing.assert_allclose(centroid, seen, atol=0.6)
    # zoomed out: the area the photo no longer covers is black
    small = RandomPose(1.0, yaw=0.0, roll=0.0, scale=(0.5, 0.5), shift=0.0)
    out = small(np.full((40, 40, 3), 200, np.uint8), _rng(0))
    assert out[:5].max() == 0 and out[-5:].max() == 0 and out[15:25, 15:25].min() == 200


def test_random_pose_without_motion_or_probability_is_the_identity():
    img = _image(32, 28)
    still = RandomPose(1.0, yaw=0.0, roll=0.0, scale=(1.0, 1.0), shift=0.0)
    np.testing.assert_array_equal(still(img, _rng(1)), img)
    assert RandomPose(0.0)(img, _rng(1)) is img
    turned = RandomPose(1.0)(img, _rng(1))
    assert turned.shape == img.shape and turned.dtype == np.uint8
    assert not np.array_equal(turned, img)
    op = train_transform(16, flip=False, pose_prob=0.5)
    assert isinstance(op.ops[0], RandomPose) and op.ops[0].p == 0.5
    for bad, pattern in (({"yaw": 90.0}, "yaw"), ({"roll": -1.0}, "roll"),
                         ({"scale": (1.2, 1.1)}, "scale"), ({"shift": 1.0}, "shift"),
                         ({"radius": 0.0}, "radius"), ({"p": 2.0}, "probability")):
        with pytest.raises(ValueError, match=pattern):
            RandomPose(**bad)
