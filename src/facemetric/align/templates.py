"""Aligned crops by template name: the crop a model's contract asks for.

An encoder states which alignment its network was trained on (``ModelContract.template``);
:func:`warp_to_template` makes that crop from an image and its landmarks:

``"arcface112"``
    The five-point ArcFace template, 112×112: the least-squares similarity from the
    landmarks' template points (:func:`~facemetric.align.landmarks.template_correspondences`)
    to :data:`~facemetric.align.warp.ARCFACE_TEMPLATE`, warped with
    :func:`~facemetric.align.warp.warp_affine` — exactly what
    :class:`~facemetric.align.aligner.FaceAligner` outputs. Any landmark scheme works.
``"dlib150"``
    dlib's own face chip, 150×150 with padding 0.25 (``dlib.get_face_chip``), the input of
    dlib's ResNet face descriptor: dlib fits its own mean face shape to the landmarks and
    the chip spans the fitted face plus 25% of its size on each side. Only dlib's layouts
    (``"dlib68"``, ``"dlib5"``) work, in their own order. The landmarks are rounded to whole
    pixels (a ``dlib.full_object_detection`` holds integer points, as dlib's predictors
    produce them) and the detection rectangle is their bounding box (dlib's chip uses only
    the points).

The sides of the crops are :data:`TEMPLATE_SIZES` (equal to
``facemetric.inference.contract.TEMPLATES``; kept here so that alignment never imports the
inference package and torch).
"""

from __future__ import annotations

import numpy as np

from facemetric.align.detect import _dlib
from facemetric.align.landmarks import template_correspondences
from facemetric.align.warp import ALIGNED_SIZE, as_rgb_image, estimate_similarity, warp_affine

DLIB_CHIP_SIZE = 150
"""Side of dlib's face chip (the descriptor network's input)."""

DLIB_CHIP_PADDING = 0.25
"""Padding of dlib's face chip, as a fraction of the fitted face's size on each side."""

TEMPLATE_SIZES: dict[str, int] = {"arcface112": ALIGNED_SIZE, "dlib150": DLIB_CHIP_SIZE}
"""Template name → side of its square crop."""

_DLIB_SCHEMES = {"dlib68": 68, "dlib5": 5}


def _dlib_chip(image: np.ndarray, points: np.ndarray, scheme: str) -> np.ndarray:
    if scheme not in _DLIB_SCHEMES:
        raise ValueError(
            f"the 'dlib150' template needs dlib's own landmarks ('dlib68' or 'dlib5'), got "
            f"{scheme!r}: detect with FaceDetector(landmarks='dlib68' or 'dlib5'), or use the "
            "'arcface112' template"
        )
    count = _DLIB_SCHEMES[scheme]
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (count, 2):
        raise ValueError(f"{scheme!r} landmarks must have shape ({count}, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{scheme!r} landmarks contain NaN or Inf")
    dlib = _dlib()
    ints = np.rint(pts).astype(np.int64)
    left, top = ints.min(axis=0)
    right, bottom = ints.max(axis=0)
    rect = dlib.rectangle(int(left), int(top), int(right), int(bottom))
    parts = dlib.points([dlib.point(int(x), int(y)) for x, y in ints])
    shape = dlib.full_object_detection(rect, parts)
    chip = dlib.get_face_chip(
        np.ascontiguousarray(image), shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING
    )
    return np.ascontiguousarray(chip, dtype=np.uint8)


def warp_to_template(
    image: np.ndarray, points: np.ndarray, scheme: str, template: str
) -> np.ndarray:
    """The aligned crop of the face with landmarks ``points`` for ``template``.

    Args:
        image: ``(H, W, 3)`` (or grey ``(H, W)``) uint8 RGB photo.
        points: ``(n, 2)`` landmarks as ``(x, y)`` image pixels.
        scheme: their layout (:data:`~facemetric.align.landmarks.SCHEMES`; ``"dlib150"``
            takes only ``"dlib68"`` and ``"dlib5"``).
        template: ``"arcface112"`` or ``"dlib150"`` (see the module docstring).

    Returns:
        ``(T, T, 3)`` uint8 RGB, C-contiguous, ``T = TEMPLATE_SIZES[template]``.

    Raises:
        ValueError: unknown template, a scheme the template cannot use, malformed points
            or image.
        ImportError: ``"dlib150"`` without dlib installed.
    """
    if template not in TEMPLATE_SIZES:
        raise ValueError(
            f"unknown alignment template {template!r}; choose one of {sorted(TEMPLATE_SIZES)}"
        )
    image = as_rgb_image(image)
    if template == "dlib150":
        return _dlib_chip(image, points, scheme)
    src, dst = template_correspondences(points, scheme)
    return warp_affine(image, estimate_similarity(src, dst), ALIGNED_SIZE)


__all__ = ["DLIB_CHIP_PADDING", "DLIB_CHIP_SIZE", "TEMPLATE_SIZES", "warp_to_template"]
