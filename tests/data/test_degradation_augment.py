"""The degradation augmentation (downscale, JPEG, occlusion) and its ``[augment]`` keys."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemetric.data.transforms import (
    GaussianBlur,
    RandomDownscale,
    RandomJpeg,
    RandomOcclusion,
    train_transform,
)
from facemetric.training.config import load_config


def _image(h: int = 40, w: int = 36, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int = 48, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([127 + 100 * np.sin(x / 5), 127 + 100 * np.cos(y / 7),
                    127 + 60 * np.sin((x + y) / 9)], axis=-1)
    return np.rint(img).astype(np.uint8)


def test_downscale_fixed_factor_matches_block_average_then_bilinear():
    # scale=(0.5, 0.5): the factor is exactly 0.5; area downsampling by 2 is the mean of
    # each 2×2 block, checked with a float64 loop.
    img = _image(8, 8)
    out = RandomDownscale(p=1.0, scale=(0.5, 0.5))(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8
    x = img.astype(np.float64)
    blocks = np.zeros((4, 4, 3))
    for i in range(4):
        for j in range(4):
            blocks[i, j] = x[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1, 3).mean(axis=0)
    # bilinear upsampling by 2 with half-pixel centres: output pixel (0.5 + k)/2 − 0.5
    def upsample(a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        pos = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        t = pos - lo
        rows = a[lo] * (1 - t)[:, None, None] + a[hi] * t[:, None, None]
        return rows[:, lo] * (1 - t)[None, :, None] + rows[:, hi] * t[None, :, None]
    want = upsample(blocks)
    assert np.abs(out.astype(np.float64) - want).max() <= 1.0


def test_downscale_probability_and_identity():
    img = _image()
    assert RandomDownscale(p=0.0)(img, np.random.default_rng(0)) is img
    changed = [not np.array_equal(RandomDownscale(0.3, (0.2, 0.5))(img, np.random.default_rng(s)),
                                  img) for s in range(300)]
    assert 60 < sum(changed) < 120
    # the strongest shrink loses the most detail (variance of the difference)
    mild = RandomDownscale(1.0, (0.9, 0.9))(img, np.random.default_rng(0))
    hard = RandomDownscale(1.0, (0.2, 0.2))(img, np.random.default_rng(0))
    assert np.abs(hard.astype(int) - img).mean() > np.abs(mild.astype(int) - img).mean() + 10


def test_jpeg_equals_pil_round_trip_at_the_drawn_quality():
    img = _smooth()
    op = RandomJpeg(p=1.0, quality=(20, 20))
    out = op(img, np.random.default_rng(5))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=20)
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(out, want)
    # the quality is drawn from the integers in the range, inclusive, uniformly
    draws = []
    for s in range(400):
        rng = np.random.default_rng(s)
        rng.random()
        draws.append(int(rng.integers(10, 13)))
    assert set(draws) == {10, 11, 12}
    np.testing.assert_array_equal(RandomJpeg(p=0.0)(img, np.random.default_rng(0)), img)


def test_occlusion_paints_one_grey_rectangle_of_the_drawn_area():
    img = np.full((50, 60, 3), 7, dtype=np.uint8)
    for seed in range(30):
        out = RandomOcclusion(p=1.0, area=(0.1, 0.2))(img, np.random.default_rng(seed))
        changed = np.argwhere((out != img).any(axis=2))
        if len(changed) == 0:  # the drawn grey happened to be 7
            continue
        (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0)
        area = (y1 - y0 + 1) * (x1 - x0 + 1)
        assert len(changed) == area  # a filled rectangle
        grey = out[y0, x0, 0]
        assert (out[y0 : y1 + 1, x0 : x1 + 1] == grey).all()
        # area within the range (rounding of the sides and clipping allow some slack)
        assert 0.08 * 3000 <= area <= 0.23 * 3000
        aspect = (x1 - x0 + 1) / (y1 - y0 + 1)
        assert 0.4 <= aspect <= 2.5


def test_augmentation_is_deterministic_for_a_seed_and_varies_across_seeds():
    t = train_transform(32, occlusion_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5,
                        blur_prob=0.5, blur_sigma=(0.5, 2.0))
    img = _smooth()
    a = t(img, np.random.default_rng(11))
    b = t(img, np.random.default_rng(11))
    assert a.shape == (3, 32, 32)
    assert np.array_equal(a.numpy(), b.numpy())
    outs = {t(img, np.random.default_rng(s)).numpy().tobytes() for s in range(10)}
    assert len(outs) == 10
    names = [type(op).__name__ for op in t.ops]
    assert names[:3] == ["RandomOcclusion", "RandomDownscale", "RandomJpeg"]
    assert any(isinstance(op, GaussianBlur) and op.sigma == (0.5, 2.0) for op in t.ops)
    assert all(math.isfinite(float(v)) for v in a.flatten()[:10])


@pytest.mark.parametrize(("op", "kwargs", "pattern"), [
    (RandomDownscale, {"scale": (0.0, 1.0)}, "scale must satisfy"),
    (RandomDownscale, {"scale": (0.5, 1.5)}, "scale must satisfy"),
    (RandomDownscale, {"p": 1.5}, "probability"),
    (RandomJpeg, {"quality": (0, 50)}, "quality must satisfy"),
    (RandomJpeg, {"quality": (60, 50)}, "quality must satisfy"),
    (RandomOcclusion, {"area": (0.3, 0.1)}, "area must satisfy"),
    (RandomOcclusion, {"p": -0.1}, "probability"),
])
def test_bad_parameters_are_refused(op, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        op(**kwargs)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_augment_section_reads_the_degradation_keys(tmp_path):
    cfg = load_config(_config(tmp_path, (
        "[augment]\nocclusion_prob = 0.2\nocclusion_area = [0.05, 0.2]\n"
        "downscale_prob = 0.25\ndownscale_scale = [0.15, 1.0]\njpeg_prob = 0.15\n"
        "jpeg_quality = [8, 50]\nblur_prob = 0.1\nblur_sigma = [0.3, 1.5]\n"
    )), check_loss=False)
    a = cfg.augment
    assert (a.occlusion_prob, a.downscale_prob, a.jpeg_prob) == (0.2, 0.25, 0.15)
    assert a.jpeg_quality == [8, 50] and a.downscale_scale == [0.15, 1.0]
    robust = load_config(Path(__file__).resolve().parents[2] / "configs" /
                         "demo_lfw_robust.toml", check_loss=False)
    assert robust.augment.downscale_prob > 0 and robust.augment.occlusion_prob > 0


@pytest.mark.parametrize(("text", "pattern"), [
    ("[augment]\njpeg_prob = 1.5", "jpeg_prob must be in"),
    ("[augment]\njpeg_quality = [0, 50]", "jpeg_quality must be"),
    ("[augment]\njpeg_quality = [10, 99]", "jpeg_quality must be"),
    ("[augment]\ndownscale_scale = [0.5, 1.5]", "downscale_scale max must be <= 1"),
    ("[augment]\nocclusion_area = [0.3, 0.1]", "occlusion_area must be"),
    ("[augment]\nblur_sigma = [0, 1]", "blur_sigma must be"),
])
def test_bad_augment_values_are_refused(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(_config(tmp_path, text), check_loss=False)
