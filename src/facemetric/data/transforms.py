"""Training augmentation on ``H × W × 3`` uint8 RGB arrays, with explicit random generators.

Every op is a small callable ``op(image, rng) -> image`` taking a ``numpy.random.Generator``
that the caller owns, so a run is reproducible and resumable: the training loop derives one
generator per sample from ``(seed, epoch, batch, position)`` (see :func:`sample_seeds`), so
the augmentation of a batch does not depend on what ran before it, on the number of
DataLoader workers, or on whether the run was resumed. Ops never touch a global RNG.

Images stay ``uint8`` between ops (each op rounds and clips its result), and the last op of
a pipeline is usually :class:`ToTensor`, which returns a float ``(3, H, W)`` tensor
normalised as ``(x/255 − mean)/std`` (default ``(x − 0.5)/0.5``, range ``[−1, 1]``).

Written with numpy and OpenCV only (no torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from torch import Tensor

from facemetric.data.degradations import check_image as _check_image
from facemetric.data.degradations import downscale_and_back, jpeg
from facemetric.data.degradations import to_uint8 as _to_uint8

#: ITU-R BT.601 luma weights (R, G, B), as used for "grayscale" in most image libraries.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Transform(Protocol):
    """``op(image, rng)``: an ``(H, W, 3)`` uint8 image and the generator to draw from."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Any: ...


def _check_prob(p: float, name: str) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair."""
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


class Compose:
    """Apply ``ops`` in order, all drawing from the same generator."""

    def __init__(self, ops: Sequence[Transform]) -> None:
        self.ops = list(ops)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Any:
        for op in self.ops:
            image = op(image, rng)
        return image

    def __repr__(self) -> str:
        inner = ", ".join(repr(op) for op in self.ops)
        return f"Compose([{inner}])"


class HorizontalFlip:
    """Mirror left-right with probability ``p`` (one uniform draw per call)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = _check_prob(p, "p")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "HorizontalFlip")
        if rng.random() < self.p:
            return np.ascontiguousarray(image[:, ::-1])
        return image

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class Resize:
    """Resize to ``size`` (``(height, width)`` or an int) with area/linear interpolation."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair(size)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "Resize")
        return _resize(image, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = h * w < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


class RandomResizedCrop:
    """Pad, crop a random box, resize it to ``size``.

    The image is first padded by ``padding`` pixels on every side (``cv2.BORDER_REFLECT_101``,
    or zeros with ``fill_zero=True``); then a box with area ``a ∈ scale`` (uniform, as a
    fraction of the padded image) and aspect ``w/h = exp(u)``, ``u`` uniform in
    ``log(ratio)``, is placed uniformly at random and resized to ``size``. A box that does
    not fit is clipped to the image. ``scale=(1, 1)`` with ``padding > 0`` is a random
    translation; ``scale`` below 1 zooms in. The output is always exactly ``size``.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.8, 1.0),
        ratio: Sequence[float] = (0.9, 1.1),
        padding: int = 0,
        fill_zero: bool = False,
    ) -> None:
        self.size = _size_pair(size)
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        rlo, rhi = (float(r) for r in ratio)
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.scale = (lo, hi)
        self.ratio = (rlo, rhi)
        self.padding = int(padding)
        self.fill_zero = fill_zero

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "RandomResizedCrop")
        if self.padding:
            pad = self.padding
            border = cv2.BORDER_CONSTANT if self.fill_zero else cv2.BORDER_REFLECT_101
            image = cv2.copyMakeBorder(image, pad, pad, pad, pad, border, value=(0, 0, 0))
        height, width = image.shape[:2]
        area = rng.uniform(*self.scale) * height * width
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        w = min(width, max(1, round(math.sqrt(area * aspect))))
        h = min(height, max(1, round(math.sqrt(area / aspect))))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return _resize(np.ascontiguousarray(image[top : top + h, left : left + w]), self.size)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"padding={self.padding})"
        )


class ColorJitter:
    """Random brightness, contrast and saturation, in a random order.

    Each enabled factor is drawn uniformly from ``[1 − j, 1 + j]`` (``j`` = its strength):

    - brightness: ``x ← f·x``;
    - contrast: ``x ← m + f·(x − m)``, ``m`` the mean luma of the image;
    - saturation: ``x ← g + f·(x − g)``, ``g`` the pixel's luma (``f = 0`` is grayscale).

    Results are rounded and clipped to ``[0, 255]`` after each adjustment.
    """

    def __init__(
        self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0
    ) -> None:
        for name, value in (
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} strength must be in [0, 1], got {value}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "ColorJitter")
        adjustments = [
            (self._brightness, self.brightness),
            (self._contrast, self.contrast),
            (self._saturation, self.saturation),
        ]
        order = rng.permutation(len(adjustments))
        out = image
        for i in order:
            adjust, strength = adjustments[int(i)]
            if strength > 0:
                factor = float(rng.uniform(1.0 - strength, 1.0 + strength))
                out = adjust(out, factor)
        return out

    @staticmethod
    def _brightness(image: np.ndarray, factor: float) -> np.ndarray:
        return _to_uint8(image.astype(np.float32) * factor)

    @staticmethod
    def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
        x = image.astype(np.float32)
        mean = float((x @ LUMA).mean())
        return _to_uint8(mean + factor * (x - mean))

    @staticmethod
    def _saturation(image: np.ndarray, factor: float) -> np.ndarray:
        x = image.astype(np.float32)
        gray = (x @ LUMA)[:, :, None]
        return _to_uint8(gray + factor * (x - gray))

    def __repr__(self) -> str:
        return (
            f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation})"
        )


class GaussianBlur:
    """With probability ``p``, blur with σ uniform in ``sigma`` (kernel side ``2⌈3σ⌉+1``)."""

    def __init__(self, p: float = 0.5, sigma: Sequence[float] = (0.1, 1.5)) -> None:
        self.p = _check_prob(p, "p")
        lo, hi = (float(s) for s in sigma)
        if not 0.0 < lo <= hi:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {tuple(sigma)}")
        self.sigma = (lo, hi)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "GaussianBlur")
        if rng.random() >= self.p:
            return image
        sigma = float(rng.uniform(*self.sigma))
        side = 2 * math.ceil(3 * sigma) + 1
        return cv2.GaussianBlur(image, (side, side), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT_101)

    def __repr__(self) -> str:
        return f"GaussianBlur(p={self.p}, sigma={self.sigma})"


class RandomGrayscale:
    """With probability ``p``, replace every channel by the luma ``0.299R + 0.587G + 0.114B``."""

    def __init__(self, p: float = 0.1) -> None:
        self.p = _check_prob(p, "p")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "RandomGrayscale")
        if rng.random() >= self.p:
            return image
        gray = _to_uint8(image.astype(np.float32) @ LUMA)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))

    def __repr__(self) -> str:
        return f"RandomGrayscale(p={self.p})"


class RandomDownscale:
    """With probability ``p``, lose resolution: shrink by a factor ``f`` drawn log-uniformly
    from ``scale = (min, max)`` (area average) and resize back (bilinear), as
    :func:`~facemetric.data.degradations.downscale_and_back` does.

    On a 112 px aligned ArcFace crop ``f = 0.125`` leaves 14 px of detail, the robustness
    report's most severe ``downscale`` (a small face in a surveillance frame). Face-safe:
    the geometry is unchanged.
    """

    def __init__(self, p: float = 0.2, scale: Sequence[float] = (0.2, 1.0)) -> None:
        self.p = _check_prob(p, "p")
        lo, hi = (float(s) for s in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"downscale scale must satisfy 0 < min <= max <= 1, got "
                             f"{tuple(scale)}")
        self.scale = (lo, hi)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "RandomDownscale")
        if rng.random() >= self.p:
            return image
        factor = math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        return downscale_and_back(image, factor)

    def __repr__(self) -> str:
        return f"RandomDownscale(p={self.p}, scale={self.scale})"


class RandomJpeg:
    """With probability ``p``, JPEG-compress (PIL) at a quality drawn uniformly from the
    integers in ``quality = (min, max)`` and decode again."""

    def __init__(self, p: float = 0.2, quality: Sequence[int] = (10, 60)) -> None:
        self.p = _check_prob(p, "p")
        lo, hi = (int(q) for q in quality)
        if not 1 <= lo <= hi <= 95:
            raise ValueError(f"JPEG quality must satisfy 1 <= min <= max <= 95, got "
                             f"{tuple(quality)}")
        self.quality = (lo, hi)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "RandomJpeg")
        if rng.random() >= self.p:
            return image
        return jpeg(image, int(rng.integers(self.quality[0], self.quality[1] + 1)))

    def __repr__(self) -> str:
        return f"RandomJpeg(p={self.p}, quality={self.quality})"


class RandomOcclusion:
    """With probability ``p``, paint one rectangle of uniform random grey (random erasing,
    Zhong et al., "Random Erasing Data Augmentation", AAAI 2020).

    Its area is a fraction drawn uniformly from ``area = (min, max)`` of the image, its aspect
    ``w/h = exp(u)``, ``u`` uniform in ``[log ½, log 2]``, clipped to the image, placed
    uniformly. Stands in for sunglasses, masks, hands and hair.
    """

    def __init__(self, p: float = 0.2, area: Sequence[float] = (0.05, 0.25)) -> None:
        self.p = _check_prob(p, "p")
        lo, hi = (float(a) for a in area)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"occlusion area must satisfy 0 < min <= max <= 1, got "
                             f"{tuple(area)}")
        self.area = (lo, hi)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "RandomOcclusion")
        if rng.random() >= self.p:
            return image
        height, width = image.shape[:2]
        area = rng.uniform(*self.area) * height * width
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w = min(width, max(1, round(math.sqrt(area * aspect))))
        h = min(height, max(1, round(math.sqrt(area / aspect))))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        out = image.copy()
        out[top : top + h, left : left + w] = int(rng.integers(0, 256))
        return out

    def __repr__(self) -> str:
        return f"RandomOcclusion(p={self.p}, area={self.area})"


@dataclass(frozen=True)
class PoseDraw:
    """One draw of :class:`RandomPose`: ``yaw`` and ``roll`` in radians, ``zoom`` a factor,
    ``dx``, ``dy`` a shift in pixels."""

    yaw: float
    roll: float
    zoom: float
    dx: float
    dy: float


def pose_maps(draw: PoseDraw, height: int, width: int, radius: float = 1.0,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Where each output pixel of :class:`RandomPose` reads the source (``cv2.remap`` maps,
    float32; ``-1`` where nothing of the photo is seen, which remap fills black).

    The forward model: the photo is wrapped round a vertical cylinder of radius
    ``r = radius · (width − 1)/2`` about the image centre ``c`` (orthographic view, so column
    offset ``u = x − c_x`` is the point at angle ``φ = asin(u / r)``), the cylinder turns by
    ``yaw`` (the point moves to ``φ + yaw``, seen at ``r sin(φ + yaw)``, hidden once
    ``|φ + yaw| ≥ 90°``), then the turned picture is rotated by ``roll``, scaled by ``zoom``
    about ``c`` and shifted by ``(dx, dy)``. The side turning away is compressed and the other
    stretched, as on a head that turns (a face is not a cylinder: the nose's occlusion of the
    far cheek is not made). Inverted here pixel by pixel.
    """
    r = radius * (width - 1) / 2.0
    if r <= 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    px = (np.arange(width, dtype=np.float64) - cx - draw.dx)[None, :]  # broadcast: no grid
    py = (np.arange(height, dtype=np.float64) - cy - draw.dy)[:, None]
    c, s = math.cos(draw.roll), math.sin(draw.roll)
    qx = (c * px + s * py) / draw.zoom  # undo roll and zoom: R(−roll) p / zoom
    qy = (-s * px + c * py) / draw.zoom
    rim = 1e-9  # the rim itself is in sight (orthographic view): the identity keeps every column
    seen = np.abs(qx) <= r * (1.0 + rim)
    phi = np.arcsin(np.clip(qx / r, -1.0, 1.0)) - draw.yaw  # the angle before the turn
    seen &= np.abs(phi) <= math.pi / 2 + rim
    map_x = np.where(seen, cx + r * np.sin(phi), -1.0).astype(np.float32)
    map_y = np.where(seen, cy + qy, -1.0).astype(np.float32)
    return map_x, map_y


class RandomPose:
    """With probability ``p``, show the face as if the head had turned and the aligner had
    placed it less well (:func:`pose_maps`): yaw uniform in ``±yaw`` degrees, roll uniform in
    ``±roll`` degrees, a scale uniform in ``scale``, a shift uniform in ``±shift`` of each
    side; what the photo no longer covers is black, as where an aligner's warp leaves the
    photo (CFP's profile crops). Output size = input size. Draws, after the ``p`` draw: yaw,
    roll, scale, shift x, shift y (:meth:`draw`).
    """

    def __init__(
        self,
        p: float = 0.5,
        yaw: float = 40.0,
        roll: float = 10.0,
        scale: Sequence[float] = (0.9, 1.1),
        shift: float = 0.1,
        radius: float = 1.0,
    ) -> None:
        self.p = _check_prob(p, "p")
        if not 0.0 <= yaw < 90.0:
            raise ValueError(f"yaw must be in [0, 90) degrees, got {yaw}")
        if not 0.0 <= roll <= 180.0:
            raise ValueError(f"roll must be in [0, 180] degrees, got {roll}")
        lo, hi = (float(x) for x in scale)
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
        if not 0.0 <= shift < 1.0:
            raise ValueError(f"shift must be in [0, 1) of the side, got {shift}")
        if radius <= 0:
            raise ValueError(f"radius must be > 0 half-widths, got {radius}")
        self.yaw, self.roll, self.scale = float(yaw), float(roll), (lo, hi)
        self.shift, self.radius = float(shift), float(radius)

    def draw(self, rng: np.random.Generator, height: int, width: int) -> PoseDraw:
        """The pose parameters for one image (the draws after the ``p`` draw)."""
        return PoseDraw(
            yaw=math.radians(rng.uniform(-self.yaw, self.yaw)),
            roll=math.radians(rng.uniform(-self.roll, self.roll)),
            zoom=rng.uniform(*self.scale),
            dx=rng.uniform(-self.shift, self.shift) * width,
            dy=rng.uniform(-self.shift, self.shift) * height,
        )

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check_image(image, "RandomPose")
        if rng.random() >= self.p:
            return image
        height, width = image.shape[:2]
        map_x, map_y = pose_maps(self.draw(rng, height, width), height, width, self.radius)
        return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))

    def __repr__(self) -> str:
        return (f"RandomPose(p={self.p}, yaw={self.yaw}, roll={self.roll}, scale={self.scale}, "
                f"shift={self.shift}, radius={self.radius})")


class ToTensor:
    """``(H, W, 3)`` uint8 → float32 ``(3, H, W)`` tensor ``(x/255 − mean)/std``.

    The defaults give ``(x − 0.5)/0.5`` in ``[−1, 1]``, the usual input of face backbones.
    Draws nothing from ``rng``.
    """

    def __init__(self, mean: float = 0.5, std: float = 0.5) -> None:
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean = float(mean)
        self.std = float(std)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> Tensor:
        _check_image(image, "ToTensor")
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        return x.div_(255.0).sub_(self.mean).div_(self.std).contiguous()

    def __repr__(self) -> str:
        return f"ToTensor(mean={self.mean}, std={self.std})"


def train_transform(
    size: int | Sequence[int],
    *,
    flip: bool = True,
    crop_scale: Sequence[float] = (1.0, 1.0),
    crop_ratio: Sequence[float] = (1.0, 1.0),
    padding: int = 0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    blur_prob: float = 0.0,
    grayscale_prob: float = 0.0,
    blur_sigma: Sequence[float] = (0.1, 1.5),
    occlusion_prob: float = 0.0,
    occlusion_area: Sequence[float] = (0.05, 0.25),
    downscale_prob: float = 0.0,
    downscale_scale: Sequence[float] = (0.2, 1.0),
    jpeg_prob: float = 0.0,
    jpeg_quality: Sequence[int] = (10, 60),
    pose_prob: float = 0.0,
    pose_yaw: float = 40.0,
    pose_roll: float = 10.0,
    pose_scale: Sequence[float] = (0.9, 1.1),
    pose_shift: float = 0.1,
) -> Compose:
    """The usual face-training pipeline: [pose → occlude → downscale → JPEG, at the source
    resolution, in the order a head, a scene, a sensor and an encoder act] → crop/pad →
    resize → flip → jitter → blur → gray → tensor. Ops whose strength or probability is 0
    are left out; the result is always ``size``."""
    ops: list[Transform] = []
    if pose_prob > 0:
        ops.append(RandomPose(pose_prob, pose_yaw, pose_roll, pose_scale, pose_shift))
    if occlusion_prob > 0:
        ops.append(RandomOcclusion(occlusion_prob, occlusion_area))
    if downscale_prob > 0:
        ops.append(RandomDownscale(downscale_prob, downscale_scale))
    if jpeg_prob > 0:
        ops.append(RandomJpeg(jpeg_prob, jpeg_quality))
    if padding > 0 or tuple(crop_scale) != (1.0, 1.0) or tuple(crop_ratio) != (1.0, 1.0):
        ops.append(RandomResizedCrop(size, crop_scale, crop_ratio, padding))
    else:
        ops.append(Resize(size))
    if flip:
        ops.append(HorizontalFlip(0.5))
    if brightness or contrast or saturation:
        ops.append(ColorJitter(brightness, contrast, saturation))
    if blur_prob > 0:
        ops.append(GaussianBlur(blur_prob, blur_sigma))
    if grayscale_prob > 0:
        ops.append(RandomGrayscale(grayscale_prob))
    ops.append(ToTensor())
    return Compose(ops)


def eval_transform(size: int | Sequence[int]) -> Compose:
    """Resize and normalise only (no randomness)."""
    return Compose([Resize(size), ToTensor()])


def sample_seeds(seed: int, epoch: int, batch: int, count: int) -> list[int]:
    """``count`` independent 64-bit seeds for the samples of batch ``batch`` of ``epoch``.

    A pure function of its arguments (``numpy.random.SeedSequence``), so a resumed run gives
    every sample the same augmentation as an uninterrupted one, whatever the worker count.
    """
    if min(seed, epoch, batch, count) < 0:
        raise ValueError("seed, epoch, batch and count must be >= 0")
    state = np.random.SeedSequence([seed, 0x5EED, epoch, batch]).generate_state(
        count, dtype=np.uint64
    )
    return [int(s) for s in state]


__all__ = [
    "ColorJitter",
    "Compose",
    "GaussianBlur",
    "HorizontalFlip",
    "RandomDownscale",
    "RandomGrayscale",
    "RandomJpeg",
    "RandomOcclusion",
    "RandomResizedCrop",
    "Resize",
    "ToTensor",
    "Transform",
    "eval_transform",
    "sample_seeds",
    "train_transform",
]
