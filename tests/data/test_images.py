"""load_image: every pixel mode becomes H×W×3 uint8 RGB; every broken file raises with its path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from facemetric.data.images import ImageLoadError, load_image


def _gradient(h: int = 12, w: int = 16) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 15, ys * 20, (xs + ys) * 7], axis=2).astype(np.uint8)


def _save(im: Image.Image, path: Path, **kw: object) -> Path:
    im.save(path, **kw)
    return path


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags["C_CONTIGUOUS"]
    assert arr.flags["WRITEABLE"]


def test_rgb_png_roundtrips_exactly(tmp_path: Path) -> None:
    rgb = _gradient()
    arr = load_image(_save(Image.fromarray(rgb), tmp_path / "a.png"))
    _check_rgb(arr, 12, 16)
    np.testing.assert_array_equal(arr, rgb)


def test_rgb_jpeg_and_bmp(tmp_path: Path) -> None:
    rgb = _gradient()
    jpg = load_image(_save(Image.fromarray(rgb), tmp_path / "a.jpg", quality=95))
    _check_rgb(jpg, 12, 16)
    assert np.abs(jpg.astype(int) - rgb.astype(int)).mean() < 6  # lossy but close
    bmp = load_image(_save(Image.fromarray(rgb), tmp_path / "a.bmp"))
    np.testing.assert_array_equal(bmp, rgb)


@pytest.mark.parametrize("suffix", [".png", ".pgm", ".jpg"])
def test_grayscale_is_replicated(tmp_path: Path, suffix: str) -> None:
    gray = _gradient()[:, :, 0]
    arr = load_image(_save(Image.fromarray(gray, mode="L"), tmp_path / f"g{suffix}"))
    _check_rgb(arr, 12, 16)
    np.testing.assert_array_equal(arr[:, :, 0], arr[:, :, 1])
    np.testing.assert_array_equal(arr[:, :, 0], arr[:, :, 2])
    if suffix != ".jpg":
        np.testing.assert_array_equal(arr[:, :, 0], gray)


def test_pgm_header_is_parsed(tmp_path: Path) -> None:
    # A hand-written binary PGM (P5) like ORL's: header, then width*height bytes.
    pixels = bytes(range(6 * 4))
    path = tmp_path / "raw.pgm"
    path.write_bytes(b"P5\n6 4\n255\n" + pixels)
    arr = load_image(path)
    _check_rgb(arr, 4, 6)
    np.testing.assert_array_equal(arr[:, :, 1].ravel(), np.arange(24, dtype=np.uint8))


def test_one_bit_image(tmp_path: Path) -> None:
    im = Image.new("1", (8, 4), 0)
    im.putpixel((3, 2), 1)
    arr = load_image(_save(im, tmp_path / "b.png"))
    _check_rgb(arr, 4, 8)
    assert arr[2, 3].tolist() == [255, 255, 255]
    assert arr[0, 0].tolist() == [0, 0, 0]


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 0, 128], [255, 255, 0]]
    arr = load_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "t.png"))
    _check_rgb(arr, 2, 3)
    assert arr[0, 0].tolist() == [200, 100, 50]  # opaque: unchanged
    assert arr[0, 1].tolist() == [0, 0, 0]  # transparent: black, hidden colour dropped
    expected_half = [round(c * 128 / 255) for c in (200, 100, 50)]
    assert arr[0, 2].tolist() == expected_half


def test_gray_alpha_is_composited(tmp_path: Path) -> None:
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (180, 255))
    im.putpixel((1, 0), (180, 0))
    arr = load_image(_save(im, tmp_path / "la.png"))
    assert arr[0, 0].tolist() == [180, 180, 180]
    assert arr[0, 1].tolist() == [0, 0, 0]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    rgb = np.full((8, 8, 3), (255, 0, 0), dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    arr = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))
    _check_rgb(arr, 8, 8)
    r, g, b = arr.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # still red, not inverted


def test_palette_and_palette_with_transparency(tmp_path: Path) -> None:
    rgb = _gradient()
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    arr = load_image(_save(pal, tmp_path / "p.png"))
    _check_rgb(arr, 12, 16)
    np.testing.assert_array_equal(arr, np.asarray(pal.convert("RGB")))

    im = Image.new("P", (2, 1))
    im.putpalette([10, 200, 30, 250, 250, 250] + [0] * (254 * 3))
    im.putpixel((0, 0), 1)
    im.putpixel((1, 0), 0)
    path = _save(im, tmp_path / "pt.png", transparency=1)
    arr = load_image(path)
    assert arr[0, 0].tolist() == [0, 0, 0]  # index 1 is the transparent one
    assert arr[0, 1].tolist() == [10, 200, 30]


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    arr = load_image(_save(im, tmp_path / "d.png"))
    _check_rgb(arr, 1, 4)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_image_in_unit_range(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    arr = load_image(_save(im, tmp_path / "f.tiff"))
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((4, 8, 3), dtype=np.uint8)  # wide image
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = _save(im, tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(path).shape == (8, 4, 3)
    assert load_image(path, exif_transpose=False).shape == (4, 8, 3)


# ---------------------------------------------------------------- broken files


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_gradient(32, 32)).save(buf, "PNG")
    return buf.getvalue()


def _expect_error(path: Path, *words: str) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    err = info.value
    assert err.path == path
    assert str(path) in str(err)
    for word in words:
        assert word in err.reason.lower(), err.reason
    assert isinstance(err, ValueError)
    return err


@pytest.mark.parametrize("keep", [0.98, 0.6, 0.3])
def test_truncated_jpeg_is_reported_not_half_loaded(tmp_path: Path, keep: float) -> None:
    data = _jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    _expect_error(path, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_progressive_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_gradient(40, 40)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    path = tmp_path / "prog.jpg"
    path.write_bytes(data[:-2])  # only the end-of-image marker missing
    _expect_error(path, "truncated")


def test_truncated_png(tmp_path: Path) -> None:
    data = _png_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path)


def test_png_with_damaged_pixel_data(tmp_path: Path) -> None:
    data = bytearray(_png_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "flip.png"
    path.write_bytes(bytes(data))
    err = _expect_error(path)
    assert "corrupt" in err.reason or "truncated" in err.reason


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _expect_error(path, "empty")


def test_text_file_with_image_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 10)
    _expect_error(path, "not an image")


def test_header_only_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "head.jpg"
    path.write_bytes(_jpeg_bytes()[:40])
    _expect_error(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.png", "cannot read")
    (tmp_path / "dir.png").mkdir()
    _expect_error(tmp_path / "dir.png", "not a regular file")


def test_error_survives_pickling(tmp_path: Path) -> None:
    import pickle

    err = ImageLoadError(tmp_path / "x.jpg", "truncated file")
    back = pickle.loads(pickle.dumps(err))
    assert back.path == err.path and back.reason == err.reason and str(back) == str(err)


def test_real_orl_pgm(orl_root: Path) -> None:
    arr = load_image(orl_root / "s1" / "1.pgm")
    _check_rgb(arr, 112, 92)
    assert np.array_equal(arr[:, :, 0], arr[:, :, 2])
    assert 20 < arr.mean() < 235  # a real photo, not a blank


def test_real_lfw_jpeg(lfw_root: Path) -> None:
    path = lfw_root / "lfw-deepfunneled" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    arr = load_image(path)
    _check_rgb(arr, 250, 250)
    assert arr.std() > 10
