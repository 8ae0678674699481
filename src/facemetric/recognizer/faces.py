"""From whatever a caller holds to aligned, embedded faces — or a typed reason why not.

Every call of the recognizer goes through :class:`FacePipeline`:

1. **read** the input: a path, encoded bytes, a PIL image or a uint8 array (EXIF orientation
   honoured; images above ``max_pixels`` refused from their header, before decoding);
2. **detect** every face with dlib (HOG + 68 landmarks, as the training data was aligned);
3. apply the **policy** for several faces: ``largest`` (biggest box), ``centre`` (box centre
   nearest the image centre, LFW's convention), ``all`` (every face), or ``single`` (refuse
   an image with more than one face — enrollment's default, so a group photo never
   enrolls the wrong person);
4. refuse faces whose box is smaller than ``min_face_size`` pixels;
5. **align** each kept face to the encoder's template and **embed** them in one batch;
6. keep a *context crop* (the face with half a box of margin on every side, at most 224 px)
   with its landmarks in crop coordinates, so a gallery can re-align and re-embed the face
   for another model or template without the original photo.

Nothing is guessed: an image that yields no usable face comes back with a
:class:`Problem` and a sentence, never an embedding of something else.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facemetric.align.detect import Face, FaceDetector
from facemetric.data.images import ImageLoadError, decode_image, pil_to_rgb
from facemetric.inference.encoder import Encoder

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
"""What the recognizer accepts as an image."""

POLICIES = ("largest", "centre", "all", "single")
"""What to do with several faces in one image (module docstring)."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image accepted by default (40 megapixels; a 30,000 × 30,000 bomb is refused)."""

CROP_MARGIN = 0.5
CROP_MAX_SIDE = 224


class Problem(enum.StrEnum):
    """Why an image gave no usable face."""

    UNREADABLE = "unreadable"
    """Not an image, truncated, corrupt, empty, or too many pixels."""
    NO_FACE = "no_face"
    """The detector found no face."""
    SEVERAL_FACES = "several_faces"
    """More than one face under the ``single`` policy."""
    FACE_TOO_SMALL = "face_too_small"
    """The face's box is smaller than ``min_face_size``."""
    DUPLICATE = "duplicate"
    """The same photo, or a near-identical template, is already enrolled."""
    PRESENTATION_ATTACK = "presentation_attack"
    """The liveness check (a :mod:`facemetric.pad` detector) judged a face an attack."""


@dataclass(frozen=True, eq=False)
class FoundFace:
    """One detected, aligned, embedded face.

    Attributes:
        box: ``(left, top, right, bottom)`` in the (upright) input image's pixels.
        detection_score: the detector's confidence (HOG: SVM margin).
        landmarks: ``(n, 2)`` points in image pixels; ``scheme`` their layout.
        embedding: ``(D,)`` float32 unit vector.
        crop: context crop (uint8 RGB) and ``crop_landmarks`` in its coordinates.
        liveness: the attack score of the recognizer's liveness check (``None``: not
            checked); see :mod:`facemetric.recognizer.liveness`.
    """

    box: tuple[int, int, int, int]
    detection_score: float
    landmarks: np.ndarray
    scheme: str
    embedding: np.ndarray
    crop: np.ndarray
    crop_landmarks: np.ndarray
    liveness: float | None = None

    @property
    def size(self) -> int:
        """The shorter side of the box, in pixels."""
        left, top, right, bottom = self.box
        return int(min(right - left, bottom - top))

    def box_dict(self) -> dict[str, int]:
        left, top, right, bottom = self.box
        return {"left": left, "top": top, "right": right, "bottom": bottom}


@dataclass(frozen=True, eq=False)
class ImageFaces:
    """The outcome for one input image: its faces (kept by the policy), or a problem."""

    index: int
    faces: tuple[FoundFace, ...] = ()
    problem: Problem | None = None
    detail: str = ""
    source_sha256: str = ""
    faces_detected: int = 0
    size: tuple[int, int] | None = None  # (width, height)

    @property
    def ok(self) -> bool:
        return self.problem is None and bool(self.faces)

    def describe(self) -> str:
        if self.ok:
            return f"image {self.index}: {len(self.faces)} face(s)"
        return f"image {self.index}: {self.problem} — {self.detail}"


@dataclass
class FacePipeline:
    """Read → detect → policy → align → embed (module docstring).

    Args:
        encoder: the model; faces are aligned to its contract's template.
        detector: a dlib :class:`~facemetric.align.detect.FaceDetector` (built on first use
            with ``upsample=1``, so faces down to about 40 px are found).
        min_face_size: shorter side of the smallest accepted face box, in pixels.
        max_pixels: largest accepted image (width × height), checked before decoding.
    """

    encoder: Encoder
    detector: FaceDetector | None = None
    min_face_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    _warp: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.min_face_size < 1 or self.max_pixels < 1:
            raise ValueError("min_face_size and max_pixels must be positive")

    def _detector(self) -> FaceDetector:
        if self.detector is None:
            self.detector = FaceDetector(upsample=1)
        return self.detector

    # ---------------------------------------------------------------- reading

    def read(self, image: ImageInput, index: int = 0) -> tuple[np.ndarray, str]:
        """``(upright uint8 RGB array, SHA-256 of the input)``.

        Raises:
            ImageLoadError: unreadable, or above ``max_pixels``.
            TypeError: an input of another type.
        """
        if isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            return decode_image(data, f"image {index}", max_pixels=self.max_pixels), _sha(data)
        if isinstance(image, str | os.PathLike):
            path = Path(image)
            try:
                data = path.read_bytes()
            except OSError as err:
                raise ImageLoadError(path, f"cannot read the file ({err.strerror or err})") from err
            return decode_image(data, str(path), max_pixels=self.max_pixels), _sha(data)
        if isinstance(image, Image.Image):
            if image.width * image.height > self.max_pixels:
                raise ImageLoadError(f"image {index}", f"too many pixels ({image.width}×"
                                     f"{image.height} > {self.max_pixels:,})")
            rgb = pil_to_rgb(image)
            return rgb, _sha(rgb.tobytes(), rgb.shape)
        if isinstance(image, np.ndarray):
            return _array_rgb(image, index, self.max_pixels)
        raise TypeError(
            f"image {index}: expected a path, bytes, a PIL image or a uint8 array, got "
            f"{type(image).__name__}"
        )

    # ---------------------------------------------------------------- faces

    def process(self, images: Sequence[ImageInput], policy: str = "largest") -> list[ImageFaces]:
        """Every image's faces under ``policy``, embedded in one batch per call."""
        if policy not in POLICIES:
            raise ValueError(f"unknown face policy {policy!r}; choose one of {POLICIES}")
        from facemetric.align.templates import warp_to_template

        template = self.encoder.contract.template
        pending: list[tuple[int, list[Face], np.ndarray, str, int, tuple[int, int]]] = []
        results: dict[int, ImageFaces] = {}
        for i, image in enumerate(images):
            try:
                rgb, sha = self.read(image, i)
            except ImageLoadError as err:
                results[i] = ImageFaces(i, problem=Problem.UNREADABLE, detail=err.reason)
                continue
            size = (int(rgb.shape[1]), int(rgb.shape[0]))
            found = self._detector().detect(rgb)
            if not found:
                results[i] = ImageFaces(i, problem=Problem.NO_FACE, source_sha256=sha, size=size,
                                        detail=f"no face found in the {size[0]}×{size[1]} image")
                continue
            if policy == "single" and len(found) > 1:
                results[i] = ImageFaces(
                    i, problem=Problem.SEVERAL_FACES, source_sha256=sha, size=size,
                    faces_detected=len(found),
                    detail=f"{len(found)} faces found; send a photo of this person alone "
                    "(or choose the 'largest' or 'centre' policy)")
                continue
            kept = _apply_policy(found, policy, rgb.shape)
            big = [f for f in kept if _box_side(f.box) >= self.min_face_size]
            if not big:
                side = max(_box_side(f.box) for f in kept)
                results[i] = ImageFaces(
                    i, problem=Problem.FACE_TOO_SMALL, source_sha256=sha, size=size,
                    faces_detected=len(found),
                    detail=f"the face is {side} px, below the minimum of {self.min_face_size} px")
                continue
            pending.append((i, big, rgb, sha, len(found), size))

        aligned = [warp_to_template(rgb, f.landmarks, f.scheme, template)
                   for _, faces, rgb, *_ in pending for f in faces]
        embeddings = self.encoder.embed_faces(aligned) if aligned else np.zeros((0, 0))
        row = 0
        for i, faces, rgb, sha, detected, size in pending:
            out = []
            for f in faces:
                crop, crop_points = context_crop(rgb, f.box, f.landmarks)
                out.append(FoundFace(f.box, float(f.score), f.landmarks, f.scheme,
                                     embeddings[row], crop, crop_points))
                row += 1
            results[i] = ImageFaces(i, tuple(out), source_sha256=sha, faces_detected=detected,
                                    size=size)
        return [results[i] for i in range(len(images))]

    def embed_crop(self, crop: np.ndarray, landmarks: np.ndarray, scheme: str) -> np.ndarray:
        """Re-align a stored context crop to this encoder's template and embed it: ``(D,)``."""
        from facemetric.align.templates import warp_to_template

        face = warp_to_template(crop, landmarks, scheme, self.encoder.contract.template)
        return self.encoder.embed_faces(face[None])[0]


def _sha(data: bytes, shape: tuple[int, ...] | None = None) -> str:
    digest = hashlib.sha256()
    if shape is not None:
        digest.update(repr(shape).encode())
    digest.update(data)
    return digest.hexdigest()


def _array_rgb(image: np.ndarray, index: int, max_pixels: int) -> tuple[np.ndarray, str]:
    if image.dtype != np.uint8:
        raise ImageLoadError(f"image {index}", f"arrays must be uint8 RGB, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ImageLoadError(f"image {index}", f"arrays must be (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageLoadError(f"image {index}", f"too many pixels ({image.shape[1]}×"
                             f"{image.shape[0]} > {max_pixels:,})")
    rgb = np.ascontiguousarray(image[:, :, :3])
    return rgb, _sha(rgb.tobytes(), rgb.shape)


def _box_side(box: tuple[int, int, int, int]) -> int:
    return int(min(box[2] - box[0], box[3] - box[1]))


def _apply_policy(faces: list[Face], policy: str, shape: tuple[int, ...]) -> list[Face]:
    if policy == "all" or len(faces) == 1:
        return list(faces)
    if policy == "largest":
        return [max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))]
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    return [min(faces, key=lambda f: (f.centre[0] - cx) ** 2 + (f.centre[1] - cy) ** 2)]


def context_crop(
    image: np.ndarray, box: tuple[int, int, int, int], landmarks: np.ndarray,
    margin: float = CROP_MARGIN, max_side: int = CROP_MAX_SIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """The face box grown by ``margin`` box sides on every side (clipped to the image),
    shrunk to at most ``max_side`` pixels, and the landmarks in its coordinates."""
    import cv2

    h, w = image.shape[:2]
    left, top, right, bottom = box
    pad = margin * max(right - left, bottom - top)
    x0, y0 = max(0, int(np.floor(left - pad))), max(0, int(np.floor(top - pad)))
    x1, y1 = min(w, int(np.ceil(right + pad))), min(h, int(np.ceil(bottom + pad)))
    crop = image[y0:y1, x0:x1]
    points = np.asarray(landmarks, dtype=np.float64) - [x0, y0]
    scale = min(1.0, max_side / max(crop.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        points = points * [size[0] / (x1 - x0), size[1] / (y1 - y0)]
    return np.ascontiguousarray(crop), points


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "POLICIES",
    "FacePipeline",
    "FoundFace",
    "ImageFaces",
    "ImageInput",
    "Problem",
    "context_crop",
]
