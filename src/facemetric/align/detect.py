"""Face detection and landmarks with dlib.

Detectors: dlib's HOG + linear SVM frontal detector (``"hog"``, fast on a CPU, frontal and
near-frontal faces of at least 80×80 pixels, 40×40 with one upsampling) and the MMOD CNN
(``"cnn"``, ``mmod_human_face_detector.dat``: more poses, several times slower on a CPU).
Landmarks: the 68-point iBUG model (``"dlib68"``, default) or the 5-point model
(``"dlib5"``). The 68-point model gives all five template points and fits the template
better (measured in ``facemetric.align``'s docs); the 5-point model is 10× smaller, and
dlib's model notes put it under CC0 while the 68-point one, trained on iBUG 300-W, is not
for commercial use: check those notes before shipping a product.

The model files come from the ``face_recognition_models`` package, located without
importing it (its ``__init__`` needs ``pkg_resources``, gone from recent setuptools).
Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from facemetric.align.warp import as_rgb_image

DETECTORS = ("hog", "cnn")
LANDMARK_MODELS = ("dlib68", "dlib5")

_MODEL_FILES = {
    "dlib68": "shape_predictor_68_face_landmarks.dat",
    "dlib5": "shape_predictor_5_face_landmarks.dat",
    "cnn": "mmod_human_face_detector.dat",
}
_INSTALL_HINT = "install the detection extra: pip install 'facemetric[detect]'"


def _dlib() -> ModuleType:
    try:
        import dlib
    except ImportError as err:
        raise ImportError(f"face detection needs dlib; {_INSTALL_HINT}") from err
    return dlib


@functools.cache
def _load_model(name: str) -> Any:
    """Load a dlib model once per process (the 68-point model is 100 MB and takes seconds);
    detectors built later in the same process share it."""
    dlib = _dlib()
    if name == "hog":
        return dlib.get_frontal_face_detector()
    if name == "cnn":
        return dlib.cnn_face_detection_model_v1(str(model_file(_MODEL_FILES["cnn"])))
    return dlib.shape_predictor(str(model_file(_MODEL_FILES[name])))


def model_file(filename: str) -> Path:
    """Path of a model file shipped by the ``face_recognition_models`` package.

    Raises:
        ImportError: the package, or the file in it, is missing (with the install hint).
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the dlib model files are missing; {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / filename
        if path.is_file():
            return path
    raise ImportError(
        f"{filename} is not in face_recognition_models at "
        f"{list(spec.submodule_search_locations)}; reinstall it: {_INSTALL_HINT}"
    )


def check_detector_args(detector: str, landmarks: str, upsample: int, max_side: int | None) -> None:
    """Raise ``ValueError`` for settings :class:`FaceDetector` would refuse (without dlib)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {DETECTORS}")
    if landmarks not in LANDMARK_MODELS:
        raise ValueError(f"unknown landmark model {landmarks!r}; choose one of {LANDMARK_MODELS}")
    if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 0:
        raise ValueError(f"upsample must be a non-negative int, got {upsample!r}")
    if max_side is not None and (isinstance(max_side, bool) or max_side < 32):
        raise ValueError(f"max_side must be an int of at least 32, or None, got {max_side!r}")


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: ``(left, top, right, bottom)`` in image pixels (may extend past the image).
        score: detector confidence (HOG: SVM margin; CNN: MMOD confidence).
        landmarks: ``(n, 2)`` float64 ``(x, y)`` points of the landmark model.
        scheme: the landmark layout (``"dlib68"`` or ``"dlib5"``), for
            :func:`~facemetric.align.landmarks.template_correspondences`.
    """

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray
    scheme: str

    @property
    def centre(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the box."""
        left, top, right, bottom = self.box
        return (left + right) / 2.0, (top + bottom) / 2.0


class FaceDetector:
    """dlib face detector + landmark predictor, models loaded once per instance.

    Args:
        detector: ``"hog"`` (default) or ``"cnn"``.
        landmarks: ``"dlib68"`` (default) or ``"dlib5"``.
        upsample: the most times the image is doubled to find small faces. Detection runs
            at the original size first and doubles only while nothing is found, so large
            faces cost one pass; each doubling halves the smallest face found (HOG: 80 → 40
            px) and costs about 4× the time. Hence a small face beside a large one is not
            reported.
        max_side: images larger than this on their longer side are shrunk for detection
            only (boxes are scaled back; landmarks are found at full resolution). ``None``
            detects at full size.

    The dlib models are loaded once per process and shared by every detector built in it.
    dlib does not promise safe concurrent calls on one model: parallelise with processes
    (as :func:`~facemetric.align.folder.align_folder` does), not threads. Not picklable.
    """

    def __init__(
        self,
        detector: str = "hog",
        landmarks: str = "dlib68",
        upsample: int = 1,
        max_side: int | None = 1024,
    ) -> None:
        check_detector_args(detector, landmarks, upsample, max_side)
        self.detector_name = detector
        self.scheme = landmarks
        self.upsample = upsample
        self.max_side = max_side
        self._dlib = _dlib()
        self._detector = _load_model(detector)
        self._predictor = _load_model(landmarks)

    def _boxes(self, image: np.ndarray) -> list[tuple[tuple[int, int, int, int], float]]:
        h, w = image.shape[:2]
        scale = 1.0
        small = image
        if self.max_side is not None and max(h, w) > self.max_side:
            import cv2

            scale = self.max_side / max(h, w)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        found: list[tuple[Any, float]] = []
        for level in range(self.upsample + 1):  # stop at the first level that finds a face
            if self.detector_name == "hog":
                rects, scores, _ = self._detector.run(small, level, 0.0)
                found = list(zip(rects, scores, strict=True))
            else:
                found = [(d.rect, float(d.confidence)) for d in self._detector(small, level)]
            if found:
                break
        boxes: list[tuple[tuple[int, int, int, int], float]] = []
        for rect, score in found:
            sides = (rect.left(), rect.top(), rect.right(), rect.bottom())
            left, top, right, bottom = (round(v / scale) for v in sides)
            boxes.append(((left, top, right, bottom), float(score)))
        return boxes

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an RGB ``(H, W, 3)`` (or grey ``(H, W)``) uint8 image, with landmarks.

        Returns:
            Faces in the detector's order (HOG: by decreasing score); empty if none.
        """
        image = np.ascontiguousarray(as_rgb_image(image))
        faces = []
        for box, score in self._boxes(image):
            rect = self._dlib.rectangle(*box)
            shape = self._predictor(image, rect)
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(Face(box=box, score=score, landmarks=pts, scheme=self.scheme))
        return faces

    def landmarks_in_box(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Run only the landmark model inside a given ``(left, top, right, bottom)`` box."""
        image = np.ascontiguousarray(as_rgb_image(image))
        shape = self._predictor(image, self._dlib.rectangle(*(int(v) for v in box)))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
