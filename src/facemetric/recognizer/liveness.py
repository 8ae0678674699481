"""The recognizer's optional liveness check: a presentation-attack detector
(:mod:`facemetric.pad`) run on every kept face's context crop.

Contract: ``score = detector.score([face.crop])`` is the attack probability; the face is an
attack when ``score >= threshold`` (the detector's own threshold, chosen on its training
subjects, unless the recognizer was given another). Every checked face carries its score
(``FoundFace.liveness``); an image with any face judged an attack is refused as a whole
with :attr:`~facemetric.recognizer.faces.Problem.PRESENTATION_ATTACK` and a sentence giving
the score and threshold — its faces stay attached (with their scores) but are neither
compared, identified nor enrolled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from facemetric.recognizer.faces import CROP_MARGIN, CROP_MAX_SIDE, ImageFaces, Problem


class LivenessCheck:
    """A PAD detector and the threshold the recognizer applies (module docstring).

    Args:
        detector: a :class:`~facemetric.pad.PadDetector` (anything with ``score(crops)``,
            ``threshold`` and an ``input`` contract), or a folder saved by
            ``facemetric pad train``.
        threshold: overrides the detector's own threshold.

    Raises:
        ValueError: the detector expects crops cut otherwise than the recognizer cuts them
            (margin 0.5, at most 224 px), or a threshold that is not a finite number.
    """

    def __init__(self, detector: Any, threshold: float | None = None) -> None:
        if isinstance(detector, str) or hasattr(detector, "__fspath__"):
            from facemetric.pad import load_detector

            detector = load_detector(detector)
        if not callable(getattr(detector, "score", None)):
            raise ValueError(f"liveness needs a PAD detector with score(crops), got "
                             f"{type(detector).__name__}: load one with "
                             "facemetric.pad.load_detector(FOLDER)")
        contract = getattr(detector, "input", None)
        if contract is not None and (float(contract.margin) != CROP_MARGIN
                                     or int(contract.max_side) != CROP_MAX_SIDE):
            raise ValueError(
                f"this PAD detector was trained on context crops with margin "
                f"{contract.margin} and at most {contract.max_side} px, but the recognizer "
                f"cuts margin {CROP_MARGIN}, at most {CROP_MAX_SIDE} px: retrain it with "
                "the default PadInput")
        value = detector.threshold if threshold is None else threshold
        if not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(f"the liveness threshold must be a finite number, got {value!r}")
        self.detector = detector
        self.threshold = float(value)

    def describe(self) -> str:
        kind = getattr(self.detector, "kind", type(self.detector).__name__)
        return f"{kind} PAD detector at threshold {self.threshold:.4g}"

    def apply(self, found: Sequence[ImageFaces]) -> list[ImageFaces]:
        """Score every face of every usable image (one batch) and refuse attack images."""
        crops = [f.crop for im in found if im.ok for f in im.faces]
        scores = iter(np.asarray(self.detector.score(crops), np.float64).tolist()
                      if crops else [])
        out = []
        for im in found:
            if not im.ok:
                out.append(im)
                continue
            faces = tuple(dataclasses.replace(f, liveness=next(scores)) for f in im.faces)
            worst = max(f.liveness for f in faces)
            if worst < self.threshold:
                out.append(dataclasses.replace(im, faces=faces))
                continue
            which = "the face" if len(faces) == 1 else f"{len(faces)} faces: the worst"
            out.append(dataclasses.replace(
                im, faces=faces, problem=Problem.PRESENTATION_ATTACK,
                detail=(f"{which} scored {worst:.4f} as a presentation attack, at or above "
                        f"the threshold {self.threshold:.4f} of the {self.describe()}: it "
                        "looks like a photo or a screen, not a live person; present the live "
                        "face to the camera")))
        return out


__all__ = ["LivenessCheck"]
