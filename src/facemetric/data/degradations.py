"""Deterministic image degradations at graded severities, for robustness reports.

Each degradation is a small frozen dataclass holding its severity; calling it as
``degrade(image, face, rng)`` returns a degraded copy of an ``(H, W, 3)`` uint8 RGB photo.
``face`` (:class:`FaceGeometry`) gives the face's five landmarks and its size in that photo
— ``width``, the side that the 112×112 ArcFace crop of the face spans in the photo — so that
severities are stated relative to the *aligned face* (a blur of σ = 2 px is σ = 2 pixels of
the 112 px crop whether the photo is a 250 px LFW photo or a large CFP one) and occluders
land on the eyes or the mouth. ``rng`` is used only by degradations that draw something (random
patches, the sign of a rotation); the others ignore it, so every result is a pure function
of ``(image, face, seed)``.

The degradations and their severity scales:

==================  ==================================================================  =========
name                what, and the severity                                              camera?
==================  ==================================================================  =========
``downscale``       shrink the photo so that the 112 px crop spans ``face_px`` pixels     yes
                    (area average, ``cv2.INTER_AREA``), then back to its size
                    (bilinear): 112 → 56 → 28 → 14 px of detail in the aligned crop.
``blur``            Gaussian blur of σ = ``sigma`` pixels *of the 112 px crop*            yes
                    (σ_photo = sigma·w/112), reflected borders, kernel radius ⌈4σ⌉.
``jpeg``            PIL JPEG encode/decode at ``quality`` (1–95; 4:2:0 chroma).           yes
``brightness``      ``x ← f·x`` with ``f = factor`` (< 1 darkens).                        no
``contrast``        ``x ← m + f·(x − m)``, ``m`` the mean luma of the photo.              no
``gamma``           ``x ← 255·(x/255)^γ`` (γ > 1 darkens the mid-tones).                  no
``sunglasses``      a black band over both eyes: centred on the eye line, as wide as      no
                    2× the interocular distance d, ``height``·d tall.
``mask``            a light-blue lower-face mask from the level ``cover`` of the way      no
                    from the mouth line up to the eye line (0.5 ≈ the nose tip), down to
                    one d below the mouth, 2.2·d wide.
``patches``         square grey patches of side 0.4·d at random positions (uniform        no
                    inside the face box: a square of side 0.7·w on the landmarks'
                    centroid, brow to chin) until ``fraction`` of the box is covered (by
                    count: ``⌈fraction·area/side²⌉`` patches; overlaps may leave less).
``rotation``        in-plane rotation by ``degrees`` about the landmarks' centroid, sign  no
                    drawn from ``rng`` (reflected borders).
==================  ==================================================================  =========

"Camera" degradations act on the photo *before* alignment, as a camera would; the others
would act after alignment. Because the robustness report aligns every degraded photo with
the landmarks found on the *clean* photo (it isolates the embedding's robustness and
reports the detector's failures separately), and alignment is a similarity warp, applying a
geometric occluder or a rotation to the photo at the clean landmarks is the same as applying
it to the aligned crop at the template's landmark positions — and it is the same for every
template (ArcFace 112 and dlib's 150 px chip), so two models see the same occluded face.
In-plane rotation aligned with the clean landmarks is what a residual alignment error of
that angle looks like to the model (a detector + aligner would undo most of it).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import cv2
import numpy as np

#: ITU-R BT.601 luma weights (R, G, B).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

#: Colour of the synthetic surgical mask (RGB).
MASK_COLOUR = (170, 205, 230)


def check_image(image: np.ndarray, who: str) -> None:
    """Refuse anything but an ``(H, W, 3)`` uint8 array, naming ``who`` asked."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"{who}: expected an (H, W, 3) array, got {type(image).__name__} {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{who}: expected a uint8 image, got {image.dtype}")


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and clip to 0..255 as uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class FaceGeometry:
    """Where the face is in a photo: five landmarks ``(x, y)`` and the face's width.

    Attributes:
        points: ``(5, 2)`` float — left eye, right eye (image left/right), nose tip, left and
            right mouth corners (the ArcFace five-point order).
        width: the side, in photo pixels, that the face's 112×112 ArcFace crop spans
            (``112 / scale`` of the similarity that aligns it): the face's size.
    """

    points: np.ndarray
    width: float

    def __post_init__(self) -> None:
        pts = np.asarray(self.points, dtype=np.float64)
        if pts.shape != (5, 2) or not np.isfinite(pts).all():
            raise ValueError(
                f"FaceGeometry.points must be five finite (x, y) landmarks, shape (5, 2); got "
                f"{np.shape(self.points)}"
            )
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"FaceGeometry.width must be > 0 pixels, got {self.width}")
        object.__setattr__(self, "points", pts)

    @property
    def eyes(self) -> np.ndarray:
        """``(2, 2)``: left and right eye centres."""
        return self.points[:2]

    @property
    def mouth(self) -> np.ndarray:
        """``(2, 2)``: left and right mouth corners."""
        return self.points[3:5]

    @property
    def interocular(self) -> float:
        """Distance between the eye centres (pixels)."""
        return float(np.linalg.norm(self.points[1] - self.points[0]))

    @property
    def centre(self) -> np.ndarray:
        """Centroid of the five landmarks."""
        return self.points.mean(axis=0)

    def box(self) -> tuple[float, float, float, float]:
        """The face box ``(left, top, right, bottom)``: a square of side ``0.7·width`` centred
        on the landmarks' centroid (in the ArcFace crop: x 17–95, y 33–111, brow to chin)."""
        cx, cy = self.centre
        half = 0.35 * self.width
        return (cx - half, cy - half, cx + half, cy + half)


class Degradation(Protocol):
    """``degrade(image, face, rng) -> image``; ``name`` and ``severity`` describe it."""

    name: ClassVar[str]

    @property
    def severity(self) -> float: ...

    def __call__(
        self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
    ) -> np.ndarray: ...


# ---------------------------------------------------------------- camera: before alignment


def downscale_and_back(image: np.ndarray, factor: float) -> np.ndarray:
    """Shrink by ``factor`` ∈ (0, 1] (area average) and resize back (bilinear).

    The small image is ``max(1, round(factor·H)) × max(1, round(factor·W))``.
    """
    check_image(image, "downscale_and_back")
    if not (0.0 < factor <= 1.0):
        raise ValueError(f"downscale factor must be in (0, 1], got {factor}")
    h, w = image.shape[:2]
    small = (max(1, round(factor * w)), max(1, round(factor * h)))
    if small == (w, h):
        return image.copy()
    low = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels, kernel radius ``⌈4σ⌉``,
    reflected borders (``cv2.BORDER_REFLECT_101``), computed in float32 and rounded;
    ``sigma = 0`` returns a copy."""
    check_image(image, "gaussian_blur")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"blur sigma must be >= 0 pixels, got {sigma}")
    if sigma == 0:
        return image.copy()
    side = 2 * math.ceil(4 * sigma) + 1
    # in float32, rounded once (OpenCV's uint8 path is fixed point, off by up to ~2 levels)
    out = cv2.GaussianBlur(image.astype(np.float32), (side, side), sigmaX=sigma, sigmaY=sigma,
                           borderType=cv2.BORDER_REFLECT_101)
    return to_uint8(out)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG with PIL at ``quality`` (1–95, PIL's default 4:2:0 subsampling) and
    decode again. Deterministic: the same image and quality give the same bytes."""
    from PIL import Image

    check_image(image, "jpeg")
    if not (isinstance(quality, int | np.integer) and 1 <= quality <= 95):
        raise ValueError(f"JPEG quality must be an integer in [1, 95], got {quality!r}")
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8).copy()


@dataclass(frozen=True)
class Downscale:
    """The detail of a 112 px aligned crop that spans only ``face_px`` pixels (module
    table); ``face_px >= width`` changes nothing."""

    face_px: float
    name: ClassVar[str] = "downscale"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.face_px) and self.face_px >= 2):
            raise ValueError(f"downscale: face_px must be >= 2 pixels, got {self.face_px}")

    @property
    def severity(self) -> float:
        return self.face_px

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        return downscale_and_back(image, min(1.0, self.face_px / face.width))


@dataclass(frozen=True)
class Blur:
    """Gaussian blur of σ = ``sigma`` pixels of the 112 px aligned crop (module table)."""

    sigma: float
    name: ClassVar[str] = "blur"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"blur: sigma must be > 0, got {self.sigma}")

    @property
    def severity(self) -> float:
        return self.sigma

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        return gaussian_blur(image, self.sigma * face.width / 112.0)


@dataclass(frozen=True)
class Jpeg:
    """JPEG at ``quality`` (module table)."""

    quality: int
    name: ClassVar[str] = "jpeg"

    def __post_init__(self) -> None:
        if not (isinstance(self.quality, int | np.integer) and 1 <= self.quality <= 95):
            raise ValueError(f"jpeg: quality must be an integer in [1, 95], got {self.quality!r}")

    @property
    def severity(self) -> float:
        return float(self.quality)

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        return jpeg(image, int(self.quality))


# ---------------------------------------------------------------- photometric


@dataclass(frozen=True)
class Brightness:
    """``x ← factor·x`` (module table)."""

    factor: float
    name: ClassVar[str] = "brightness"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"brightness: factor must be > 0, got {self.factor}")

    @property
    def severity(self) -> float:
        return self.factor

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        check_image(image, "brightness")
        return to_uint8(image.astype(np.float64) * self.factor)


@dataclass(frozen=True)
class Contrast:
    """``x ← m + factor·(x − m)``, ``m`` the photo's mean luma (module table)."""

    factor: float
    name: ClassVar[str] = "contrast"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor >= 0):
            raise ValueError(f"contrast: factor must be >= 0, got {self.factor}")

    @property
    def severity(self) -> float:
        return self.factor

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        check_image(image, "contrast")
        x = image.astype(np.float64)
        mean = float((x @ LUMA).mean())
        return to_uint8(mean + self.factor * (x - mean))


@dataclass(frozen=True)
class Gamma:
    """``x ← 255·(x/255)^gamma`` (module table)."""

    gamma: float
    name: ClassVar[str] = "gamma"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma: gamma must be > 0, got {self.gamma}")

    @property
    def severity(self) -> float:
        return self.gamma

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        check_image(image, "gamma")
        table = to_uint8(255.0 * (np.arange(256) / 255.0) ** self.gamma)
        return table[image]


# ---------------------------------------------------------------- occlusion and geometry


def fill_rectangle(
    image: np.ndarray, box: tuple[float, float, float, float], colour: tuple[int, int, int]
) -> np.ndarray:
    """A copy with the pixels whose centres lie in ``box = (left, top, right, bottom)``
    (``left ≤ x + ½ < right``, same for y; clipped to the image) set to ``colour``."""
    check_image(image, "fill_rectangle")
    h, w = image.shape[:2]
    left, top, right, bottom = box
    x0 = min(w, max(0, math.ceil(left - 0.5)))
    x1 = min(w, max(0, math.ceil(right - 0.5)))
    y0 = min(h, max(0, math.ceil(top - 0.5)))
    y1 = min(h, max(0, math.ceil(bottom - 0.5)))
    out = image.copy()
    out[y0:y1, x0:x1] = np.asarray(colour, dtype=np.uint8)
    return out


@dataclass(frozen=True)
class Sunglasses:
    """A black band ``height``·d tall over the eyes, 2·d wide (module table)."""

    height: float
    name: ClassVar[str] = "sunglasses"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.height) and self.height > 0):
            raise ValueError(f"sunglasses: height must be > 0 interocular distances, got "
                             f"{self.height}")

    @property
    def severity(self) -> float:
        return self.height

    def region(self, face: FaceGeometry) -> tuple[float, float, float, float]:
        """The band ``(left, top, right, bottom)`` in photo pixels."""
        d = face.interocular
        cx, cy = face.eyes.mean(axis=0)
        return (cx - d, cy - self.height * d / 2, cx + d, cy + self.height * d / 2)

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        return fill_rectangle(image, self.region(face), (0, 0, 0))


@dataclass(frozen=True)
class Mask:
    """A lower-face mask up to ``cover`` of the way from the mouth to the eyes (module
    table)."""

    cover: float
    name: ClassVar[str] = "mask"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cover) and 0 <= self.cover <= 1):
            raise ValueError(f"mask: cover must be in [0, 1] (0 = mouth line, 1 = eye line), "
                             f"got {self.cover}")

    @property
    def severity(self) -> float:
        return self.cover

    def region(self, face: FaceGeometry) -> tuple[float, float, float, float]:
        """The mask ``(left, top, right, bottom)`` in photo pixels."""
        d = face.interocular
        eye_y = float(face.eyes[:, 1].mean())
        mouth_y = float(face.mouth[:, 1].mean())
        cx = float(face.points[:, 0].mean())
        top = mouth_y - self.cover * (mouth_y - eye_y)
        return (cx - 1.1 * d, top, cx + 1.1 * d, mouth_y + d)

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        return fill_rectangle(image, self.region(face), MASK_COLOUR)


@dataclass(frozen=True)
class Patches:
    """Random grey squares of side 0.4·d covering ``fraction`` of the face box by count
    (module table)."""

    fraction: float
    name: ClassVar[str] = "patches"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"patches: fraction must be in (0, 1], got {self.fraction}")

    @property
    def severity(self) -> float:
        return self.fraction

    def regions(self, face: FaceGeometry, rng: np.random.Generator
                ) -> list[tuple[tuple[float, float, float, float], int]]:
        """The squares ``((left, top, right, bottom), grey)`` drawn from ``rng``."""
        side = 0.4 * face.interocular
        left, top, right, bottom = face.box()
        count = math.ceil(self.fraction * (right - left) * (bottom - top) / side**2)
        out = []
        for _ in range(count):
            x = float(rng.uniform(left, right - side))
            y = float(rng.uniform(top, bottom - side))
            grey = int(rng.integers(0, 256))
            out.append(((x, y, x + side, y + side), grey))
        return out

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        out = image
        for box, grey in self.regions(face, rng):
            out = fill_rectangle(out, box, (grey, grey, grey))
        return out.copy() if out is image else out


def rotate_about(image: np.ndarray, centre: tuple[float, float], degrees: float) -> np.ndarray:
    """Rotate the image content by ``degrees`` counter-clockwise (as displayed, y down) about
    ``centre = (x, y)``; bilinear, reflected borders, same size."""
    check_image(image, "rotate_about")
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(degrees), 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


@dataclass(frozen=True)
class Rotation:
    """In-plane rotation by ±``degrees`` about the landmarks' centroid (module table)."""

    degrees: float
    name: ClassVar[str] = "rotation"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.degrees) and 0 < self.degrees <= 180):
            raise ValueError(f"rotation: degrees must be in (0, 180], got {self.degrees}")

    @property
    def severity(self) -> float:
        return self.degrees

    def __call__(self, image: np.ndarray, face: FaceGeometry, rng: np.random.Generator
                 ) -> np.ndarray:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        cx, cy = face.centre
        return rotate_about(image, (float(cx), float(cy)), sign * self.degrees)


DEGRADATIONS: dict[str, type] = {
    cls.name: cls
    for cls in (Downscale, Blur, Jpeg, Brightness, Contrast, Gamma, Sunglasses, Mask, Patches,
                Rotation)
}
"""Degradation name → class (its one argument is the severity)."""

CAMERA = frozenset({"downscale", "blur", "jpeg"})
"""The degradations a camera makes (before alignment; the detector is retried on them)."""

DEFAULT_SEVERITIES: dict[str, tuple[float, ...]] = {
    "downscale": (56, 28, 14),
    "blur": (1.0, 2.0, 4.0),
    "jpeg": (30, 15, 8, 4),
    "brightness": (0.5, 0.3, 0.15),
    "contrast": (0.5, 0.3, 0.15),
    "gamma": (2.0, 3.0, 4.5),
    "sunglasses": (0.4, 0.7, 1.0),
    "mask": (0.25, 0.5, 0.75),
    "patches": (0.1, 0.2, 0.35),
    "rotation": (10, 20, 30, 45),
}
"""The graded severities a robustness report uses by default (most severe last)."""

CLEAN_SEVERITY: dict[str, float] = {
    "downscale": 112, "blur": 0.0, "jpeg": 95, "brightness": 1.0, "contrast": 1.0,
    "gamma": 1.0, "sunglasses": 0.0, "mask": 0.0, "patches": 0.0, "rotation": 0.0,
}
"""Where the clean image sits on each severity axis (the first point of every curve)."""


def make_degradation(name: str, severity: float) -> Degradation:
    """The degradation ``name`` at ``severity``.

    Raises:
        ValueError: unknown name, or a severity outside the degradation's range.
    """
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; choose from {sorted(DEGRADATIONS)}")
    if name == "jpeg":
        if float(severity) != int(severity):
            raise ValueError(f"jpeg: quality must be an integer, got {severity}")
        severity = int(severity)
    return DEGRADATIONS[name](severity)  # type: ignore[no-any-return]


__all__ = [
    "CAMERA",
    "CLEAN_SEVERITY",
    "DEFAULT_SEVERITIES",
    "DEGRADATIONS",
    "Blur",
    "Brightness",
    "Contrast",
    "Degradation",
    "Downscale",
    "FaceGeometry",
    "Gamma",
    "Jpeg",
    "Mask",
    "Patches",
    "Rotation",
    "Sunglasses",
    "downscale_and_back",
    "fill_rectangle",
    "gaussian_blur",
    "jpeg",
    "make_degradation",
    "rotate_about",
]
