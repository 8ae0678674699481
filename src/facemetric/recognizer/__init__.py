"""Recognition in use: ``Recognizer(model, gallery)`` verifies, identifies, enrolls and
removes, with calibrated thresholds and per-image answers (see
:mod:`facemetric.recognizer.engine`)."""

from facemetric.recognizer.engine import DEFAULT_FAR, SCORE_MODES, Recognizer
from facemetric.recognizer.faces import (
    DEFAULT_MAX_PIXELS,
    POLICIES,
    FacePipeline,
    FoundFace,
    ImageFaces,
    ImageInput,
    Problem,
    context_crop,
)
from facemetric.recognizer.results import (
    UNKNOWN,
    Candidate,
    Enrollment,
    EnrollOutcome,
    Identification,
    IdentifiedFace,
    Verification,
)

__all__ = [
    "DEFAULT_FAR",
    "DEFAULT_MAX_PIXELS",
    "POLICIES",
    "SCORE_MODES",
    "UNKNOWN",
    "Candidate",
    "EnrollOutcome",
    "Enrollment",
    "FacePipeline",
    "FoundFace",
    "Identification",
    "IdentifiedFace",
    "ImageFaces",
    "ImageInput",
    "Problem",
    "Recognizer",
    "Verification",
    "context_crop",
]
