"""What the recognizer answers: plain frozen dataclasses, each with ``to_dict()`` for JSON.

Every decision carries its score, the threshold it was compared with and the false-accept
rate that threshold was calibrated at (and on how many impostor comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facemetric.inference.calibration import Threshold
from facemetric.recognizer.faces import FoundFace, ImageFaces, Problem

UNKNOWN = "unknown"
"""``IdentifiedFace.best`` when no enrolled person reaches the threshold (open set)."""


def _threshold_dict(t: Threshold) -> dict[str, Any]:
    return {"value": t.value, "far": t.far, "impostors": t.impostors}


def _image_dict(image: ImageFaces) -> dict[str, Any]:
    return {
        "index": image.index,
        "problem": None if image.problem is None else str(image.problem),
        "detail": image.detail,
        "faces_detected": image.faces_detected,
        "liveness": [f.liveness for f in image.faces] if any(
            f.liveness is not None for f in image.faces) else None,
    }


@dataclass(frozen=True, eq=False)
class Verification:
    """1:1: are the faces of ``a`` and ``b`` the same person?

    ``same`` is ``None`` (and ``score`` too) when either image gave no usable face; its
    ``problem`` says why.
    """

    score: float | None
    threshold: Threshold
    same: bool | None
    a: ImageFaces
    b: ImageFaces

    @property
    def box_a(self) -> tuple[int, int, int, int] | None:
        return self.a.faces[0].box if self.a.ok else None

    @property
    def box_b(self) -> tuple[int, int, int, int] | None:
        return self.b.faces[0].box if self.b.ok else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "threshold": _threshold_dict(self.threshold),
            "same": self.same,
            "images": [
                {**_image_dict(im), "box": None if not im.ok else im.faces[0].box_dict()}
                for im in (self.a, self.b)
            ],
        }


@dataclass(frozen=True)
class Candidate:
    """An enrolled person and the probe's score against them."""

    person: str
    score: float
    templates: int


@dataclass(frozen=True, eq=False)
class IdentifiedFace:
    """One probe face: its ranked candidates (persons, best first) and the answer.

    ``best`` is the top candidate's name when its score reaches the threshold, else
    :data:`UNKNOWN`. ``fpir_bound`` = ``min(1, persons · far)``: the union bound on the
    chance that a face of someone *not* enrolled is matched to somebody.
    """

    face: FoundFace
    candidates: tuple[Candidate, ...]
    best: str
    threshold: Threshold
    persons: int

    @property
    def fpir_bound(self) -> float:
        return min(1.0, self.persons * self.threshold.far)

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": self.face.box_dict(),
            "liveness": self.face.liveness,
            "best": self.best,
            "known": self.best != UNKNOWN,
            "candidates": [
                {"person": c.person, "score": c.score, "templates": c.templates}
                for c in self.candidates
            ],
            "threshold": _threshold_dict(self.threshold),
            "fpir_bound": self.fpir_bound,
        }


@dataclass(frozen=True, eq=False)
class Identification:
    """1:N for one image: an :class:`IdentifiedFace` per face kept by the policy, or the
    image's problem."""

    image: ImageFaces
    faces: tuple[IdentifiedFace, ...]

    @property
    def best(self) -> str | None:
        """The first face's answer (``None`` when the image gave no face)."""
        return self.faces[0].best if self.faces else None

    def to_dict(self) -> dict[str, Any]:
        return {**_image_dict(self.image), "faces": [f.to_dict() for f in self.faces]}


@dataclass(frozen=True)
class EnrollOutcome:
    """One image of an enrollment: accepted (``face_id``) or rejected (``problem``)."""

    index: int
    accepted: bool
    face_id: int | None = None
    problem: Problem | None = None
    detail: str = ""
    box: tuple[int, int, int, int] | None = None
    liveness: float | None = None
    """The face's attack score when the recognizer checked liveness."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "accepted": self.accepted,
            "face_id": self.face_id,
            "problem": None if self.problem is None else str(self.problem),
            "detail": self.detail,
            "box": None if self.box is None else dict(zip(
                ("left", "top", "right", "bottom"), self.box, strict=True)),
            "liveness": self.liveness,
        }


@dataclass(frozen=True)
class Enrollment:
    """The outcome of ``enroll(person, images)``: one :class:`EnrollOutcome` per image."""

    person: str
    outcomes: tuple[EnrollOutcome, ...]

    @property
    def accepted(self) -> int:
        return sum(o.accepted for o in self.outcomes)

    @property
    def rejected(self) -> int:
        return len(self.outcomes) - self.accepted

    def to_dict(self) -> dict[str, Any]:
        return {"person": self.person, "accepted": self.accepted, "rejected": self.rejected,
                "images": [o.to_dict() for o in self.outcomes]}


__all__ = [
    "UNKNOWN",
    "Candidate",
    "EnrollOutcome",
    "Enrollment",
    "Identification",
    "IdentifiedFace",
    "Verification",
]
