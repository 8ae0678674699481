"""Robust image loading: any still-image file PIL decodes → ``H × W × 3`` uint8 RGB.

``load_image`` decodes the whole file (never a header-only peek), so a damaged file is found
when it is loaded, not later as a half-grey face in a batch. Every way a file can fail —
missing, empty, not an image, truncated, corrupt, too large — raises ``ImageLoadError``
(a ``ValueError``) that carries the path and the reason.

How pixel modes become RGB:

- grayscale (``L``, ``1``) is replicated over the three channels;
- 16-bit grayscale (``I;16``, ``I;16B``, ...) and 32-bit ``I`` are scaled from
  ``[0, 65535]`` to ``[0, 255]`` (``v / 257``, rounded; ``I`` is clipped to that range first),
  where PIL's own ``convert("L")`` would clip everything above 255 to white;
- float ``F`` images are taken as ``[0, 1]`` if their maximum is ≤ 1, else as ``[0, 255]``;
  both are clipped to that range;
- images with transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) are
  **composited on black**: ``rgb · α / 255``. A fully transparent pixel becomes black
  whatever colour it stores, so hidden colour left in transparent areas cannot leak into
  the face;
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, palette ``P`` go through PIL's conversion to RGB
  (embedded ICC colour profiles are not applied);
- the EXIF orientation tag is applied (``exif_transpose=True``), so a phone photo comes out
  upright; pass ``False`` to keep the stored pixel order (e.g. for landmarks labelled on it);
- multi-frame files (GIF, TIFF) give their first frame.

PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay ``False`` (its default; this module
never sets it): with it ``True`` PIL silently pads a truncated JPEG with grey.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: File name endings (lower case) treated as images by the dataset scanners.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp"}
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageLoadError(ValueError):
    """An image file that cannot be loaded. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[Path, str]]:
        # Keep (path, reason) when the error crosses a process boundary (DataLoader workers).
        return (type(self), (self.path, self.reason))


def load_image(path: str | os.PathLike[str], exif_transpose: bool = True) -> np.ndarray:
    """Load an image file as a contiguous, writable ``(H, W, 3)`` uint8 RGB array.

    Args:
        path: the image file (JPEG, PNG, PGM/PPM, BMP, TIFF, WebP, GIF, ...).
        exif_transpose: rotate/flip as the EXIF orientation tag says.

    Raises:
        ImageLoadError: the file is missing, empty, not an image, truncated or corrupt, has
            zero size, or exceeds PIL's decompression-bomb limit.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    if size == 0:
        raise ImageLoadError(path, "the file is empty (0 bytes)")

    return _decode(path, path, exif_transpose, None)


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    *,
    exif_transpose: bool = True,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode an encoded image held in memory, exactly as :func:`load_image` decodes a file.

    Args:
        data: the encoded bytes (JPEG, PNG, ...).
        name: how errors refer to the image (an upload's file name, ``"image 3"`` ...).
        max_pixels: refuse images with more pixels than this, read from the header
            *before* any pixel is decoded (a decompression bomb costs nothing).

    Raises:
        ImageLoadError: empty, not an image, truncated, corrupt or too large.
    """
    if not data:
        raise ImageLoadError(name, "the image is empty (0 bytes)")
    return _decode(name, io.BytesIO(data), exif_transpose, max_pixels)


def _decode(
    name: str | os.PathLike[str], source: Path | io.BytesIO, exif_transpose: bool,
    max_pixels: int | None,
) -> np.ndarray:
    try:
        # Pass 1: the header (pixel count) and the format's own integrity check (PNG: chunk
        # CRCs and the IEND marker).
        with Image.open(source) as probe:
            width, height = probe.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    name, f"too many pixels: {width}×{height} = {width * height:,} > the limit "
                    f"of {max_pixels:,}; downscale the image before sending it"
                )
            probe.verify()
        if isinstance(source, io.BytesIO):
            source.seek(0)
        # Pass 2: decode every pixel. A truncated stream raises here (OSError) because
        # LOAD_TRUNCATED_IMAGES is False.
        with Image.open(source) as im:
            im.load()
            if exif_transpose:
                im = _upright(im)
            rgb = _to_rgb(im)
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not an image file PIL can identify") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"too many pixels ({exc})") from exc
    except Exception as exc:
        # PIL's decoders signal damage with OSError, SyntaxError, ValueError, EOFError,
        # struct.error, ... depending on the plugin: all of them mean "this file is broken".
        raise ImageLoadError(name, _reason(exc)) from exc

    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageLoadError(name, f"the image has zero size {rgb.shape[1]}×{rgb.shape[0]}")
    return rgb


def pil_to_rgb(image: Image.Image, exif_transpose: bool = True) -> np.ndarray:
    """A PIL image (any mode) as ``(H, W, 3)`` uint8 RGB, converted as :func:`load_image`
    converts a decoded file (EXIF orientation applied unless ``exif_transpose=False``).

    Raises:
        ImageLoadError: the image has zero size or cannot be converted.
    """
    try:
        image.load()
        rgb = _to_rgb(_upright(image) if exif_transpose else image)
    except Exception as exc:
        raise ImageLoadError("<PIL image>", _reason(exc)) from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageLoadError("<PIL image>", "the image has zero size")
    return rgb


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "truncated" in text.lower():
        return f"truncated file ({text})"
    return f"corrupt or unsupported image data ({type(exc).__name__}: {text or 'no detail'})"


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; unreadable EXIF leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        # Broken metadata is no reason to reject intact pixels.
        return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to ``(H, W, 3)`` uint8 RGB (see module doc)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(im).astype(np.float64)
        gray = np.rint(np.clip(gray, 0.0, 65535.0) / 257.0).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        gray = np.asarray(im, dtype=np.float64)
        finite = gray[np.isfinite(gray)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        gray = np.nan_to_num(gray * scale, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.rint(np.clip(gray, 0.0, 255.0)).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if (mode == "P" and "transparency" in im.info) or mode in _ALPHA_MODES:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        rgba = np.asarray(im).astype(np.uint16)
        alpha = rgba[:, :, 3:4]
        # round(rgb · α / 255) in integers: (x + 127) // 255 rounds half up.
        rgb = ((rgba[:, :, :3] * alpha + 127) // 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)
    # np.array copies: np.asarray of a PIL image can be read-only, which torch warns about.
    return np.array(im.convert("RGB"), dtype=np.uint8, order="C")


__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "decode_image", "load_image", "pil_to_rgb"]
