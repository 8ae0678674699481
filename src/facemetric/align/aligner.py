"""One image in, one 112×112 aligned face (or a reason why not) out."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemetric.align.detect import Face, FaceDetector, check_detector_args
from facemetric.align.landmarks import (
    read_landmark_file,
    scheme_for_count,
    template_correspondences,
)
from facemetric.align.warp import (
    ALIGNED_SIZE,
    as_rgb_image,
    centre_crop,
    estimate_similarity,
    transform_points,
    warp_affine,
)
from facemetric.data.images import load_image


class AlignStatus(enum.StrEnum):
    """What happened to one image."""

    OK = "ok"
    """One face detected and aligned."""
    MULTIPLE_FACES_PICKED_CENTRE = "multiple_faces_picked_centre"
    """Several faces: the one whose box centre is nearest the image centre was aligned."""
    GIVEN_LANDMARKS = "given_landmarks"
    """Aligned from landmarks supplied with the image (no detection)."""
    NO_FACE = "no_face"
    """No face detected and no fallback asked for: no output."""
    FALLBACK_CENTRE_CROP = "fallback_centre_crop"
    """No face detected: the output is a centre crop, not an aligned face."""
    LOAD_ERROR = "load_error"
    """The image (or its landmark file) could not be read: no output."""
    ERROR = "error"
    """An unexpected exception while aligning a readable image (reported, not raised, by
    :func:`~facemetric.align.folder.align_folder`): no output."""


ALIGNED_STATUSES = frozenset(
    {AlignStatus.OK, AlignStatus.MULTIPLE_FACES_PICKED_CENTRE, AlignStatus.GIVEN_LANDMARKS}
)
"""Statuses whose output is a landmark-aligned face."""


@dataclass(frozen=True)
class AlignResult:
    """The outcome for one image.

    Attributes:
        status: see :class:`AlignStatus`.
        reason: a human sentence (empty for a plain ``ok``).
        face: ``(112, 112, 3)`` uint8 RGB output, ``None`` for ``no_face``/``load_error``.
        num_faces: faces the detector found (0 when landmarks were given or loading failed).
        box: ``(left, top, right, bottom)`` of the aligned face, if detected.
        transform: ``(2, 3)`` similarity from image to output pixels, if aligned.
        residual: RMS distance (output pixels) between the warped landmarks and their
            template points: how far this face's shape is from the template.
    """

    status: AlignStatus
    reason: str = ""
    face: np.ndarray | None = None
    num_faces: int = 0
    box: tuple[int, int, int, int] | None = None
    transform: np.ndarray | None = None
    residual: float | None = None


def nearest_centre(faces: list[Face], shape: tuple[int, ...]) -> Face:
    """The face whose box centre is nearest the centre of an image of ``shape`` (the LFW
    convention: the labelled person is the centred one)."""
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    return min(faces, key=lambda f: (f.centre[0] - cx) ** 2 + (f.centre[1] - cy) ** 2)


class FaceAligner:
    """Detect, pick, landmark and warp a face to the 112×112 ArcFace template.

    Several faces → the one whose box centre is nearest the image centre (the LFW
    convention: the labelled person is the centred one), status
    ``multiple_faces_picked_centre``. No face → ``no_face``, or with ``fallback=True`` a
    centre crop, status ``fallback_centre_crop``.

    Args:
        detector, landmarks, upsample, max_side: passed to
            :class:`~facemetric.align.detect.FaceDetector`, built on first detection (so
            aligning only from given landmarks never loads dlib).
        fallback: centre-crop images without a detected face instead of skipping them.
        fallback_crop: side of the fallback crop as a fraction of the image's shorter side.
    """

    def __init__(
        self,
        detector: str = "hog",
        landmarks: str = "dlib68",
        upsample: int = 1,
        max_side: int | None = 1024,
        fallback: bool = False,
        fallback_crop: float = 1.0,
    ) -> None:
        check_detector_args(detector, landmarks, upsample, max_side)
        if not 0.0 < fallback_crop <= 1.0:
            raise ValueError(f"fallback_crop must lie in (0, 1], got {fallback_crop}")
        self._detector_args = (detector, landmarks, upsample, max_side)
        self._detector: FaceDetector | None = None
        self.fallback = fallback
        self.fallback_crop = fallback_crop

    @property
    def detector(self) -> FaceDetector:
        """The dlib detector, loaded on first use."""
        if self._detector is None:
            self._detector = FaceDetector(*self._detector_args)
        return self._detector

    @staticmethod
    def _warp(
        image: np.ndarray, points: np.ndarray, scheme: str
    ) -> tuple[np.ndarray, np.ndarray, float]:
        src, dst = template_correspondences(points, scheme)
        matrix = estimate_similarity(src, dst)
        residual = float(np.sqrt(((transform_points(matrix, src) - dst) ** 2).sum(1).mean()))
        return warp_affine(image, matrix, ALIGNED_SIZE), matrix, residual

    def align(
        self,
        image: np.ndarray,
        landmarks: np.ndarray | None = None,
        scheme: str | None = None,
    ) -> AlignResult:
        """Align one ``(H, W, 3)`` / ``(H, W)`` uint8 RGB image.

        Args:
            image: the photo.
            landmarks: optional ``(n, 2)`` points; when given, no detection is run.
            scheme: their layout (see :mod:`facemetric.align.landmarks`); by default
                inferred from ``n`` (5 → ArcFace order, 30 → CFP, 68 → iBUG).

        Raises:
            ValueError: a malformed image or landmarks.
        """
        image = as_rgb_image(image)
        if landmarks is not None:
            pts = np.asarray(landmarks, dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise ValueError(f"landmarks must have shape (n, 2), got {pts.shape}")
            scheme = scheme or scheme_for_count(pts.shape[0])
            face, matrix, residual = self._warp(image, pts, scheme)
            return AlignResult(
                AlignStatus.GIVEN_LANDMARKS,
                f"aligned from {pts.shape[0]} given {scheme} landmarks",
                face=face,
                transform=matrix,
                residual=residual,
            )
        faces = self.detector.detect(image)
        if not faces:
            det = self.detector
            why = f"no face detected ({det.detector_name}, upsample={det.upsample})"
            if self.fallback:
                crop = centre_crop(image, self.fallback_crop, ALIGNED_SIZE)
                return AlignResult(
                    AlignStatus.FALLBACK_CENTRE_CROP,
                    f"{why}; centre crop of {self.fallback_crop:g} of the shorter side",
                    face=crop,
                )
            return AlignResult(AlignStatus.NO_FACE, why)
        chosen = nearest_centre(faces, image.shape)
        face, matrix, residual = self._warp(image, chosen.landmarks, chosen.scheme)
        if len(faces) == 1:
            status, reason = AlignStatus.OK, ""
        else:
            status = AlignStatus.MULTIPLE_FACES_PICKED_CENTRE
            reason = f"{len(faces)} faces detected; kept the one nearest the image centre"
        return AlignResult(
            status,
            reason,
            face=face,
            num_faces=len(faces),
            box=chosen.box,
            transform=matrix,
            residual=residual,
        )

    def align_file(self, path: str | Path, landmarks_file: str | Path | None = None) -> AlignResult:
        """Align the image at ``path``; a read failure becomes a ``load_error`` result.

        Args:
            path: image file.
            landmarks_file: optional landmark text file (see
                :func:`~facemetric.align.landmarks.read_landmark_file`); when given, it
                replaces detection, and an unreadable or malformed one is a ``load_error``.
        """
        try:
            image = load_image(path)
        except Exception as err:  # corrupt files raise many kinds (OSError, struct.error...)
            return AlignResult(AlignStatus.LOAD_ERROR, f"{type(err).__name__}: {err}")
        if landmarks_file is None:
            return self.align(image)
        try:
            points = read_landmark_file(landmarks_file)
            return self.align(image, points)
        except (OSError, ValueError) as err:
            return AlignResult(
                AlignStatus.LOAD_ERROR, f"landmarks {landmarks_file}: {type(err).__name__}: {err}"
            )
