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
    RandomGrayscale,
    RandomResizedCrop,
    Resize,
    ToTensor,
    eval_transform,
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
