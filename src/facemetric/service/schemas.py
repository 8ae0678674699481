"""The JSON the service reads and writes (pydantic models: they validate requests and make
the OpenAPI document at ``/openapi.json``). Field names are snake_case; unknown request
fields are refused (422), so a misspelt option never passes silently.

Image requests come as ``application/json`` with base64 images (the ``*Request`` models)
or as ``multipart/form-data`` with one file part per image and the options as text parts
(the ``*Form`` schemas, generated from the same models). Response bodies mirror the
recognizer's ``to_dict()`` (:mod:`facemetric.recognizer.results`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Base64Image = str
"""An image file (JPEG, PNG, ...) in standard base64, optionally a ``data:`` URL."""

_B64 = {"format": "byte", "contentEncoding": "base64"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


LivenessField = Field(
    default=None, description="check liveness with the service's presentation-attack detector "
                              "(null: when the service has one; an attack is refused with "
                              "problem 'presentation_attack')")

FarField = Field(default=None, ge=1e-12, lt=1.0,
                 description="false-accept rate the decision is made at (default 1e-3); "
                             "must be one the model's threshold table resolves")

# ----------------------------------------------------------------------------- requests


class VerifyOptions(_Strict):
    far: float | None = FarField
    liveness: bool | None = LivenessField
    policy: Literal["largest", "centre", "single"] = Field(
        default="largest", description="which face of each image is compared")


class VerifyRequest(VerifyOptions):
    a: Base64Image = Field(json_schema_extra=_B64, description="the first image, base64")
    b: Base64Image = Field(json_schema_extra=_B64, description="the second image, base64")


class IdentifyOptions(_Strict):
    k: int = Field(default=5, ge=1, le=100, description="candidates per face")
    far: float | None = FarField
    liveness: bool | None = LivenessField
    policy: Literal["largest", "centre", "all"] = Field(
        default="largest", description="'all' answers for every face in the image")


class IdentifyRequest(IdentifyOptions):
    image: Base64Image = Field(json_schema_extra=_B64, description="the probe image, base64")


class EmbedOptions(_Strict):
    policy: Literal["largest", "centre", "all", "single"] = "largest"


class EmbedRequest(EmbedOptions):
    images: list[Base64Image] = Field(min_length=1, json_schema_extra={"items": _B64},
                                      description="images, base64")


class EnrollOptions(_Strict):
    policy: Literal["single", "largest", "centre"] = Field(
        default="single", description="'single' refuses photos with several faces")
    metadata: dict[str, Any] | None = Field(
        default=None, description="JSON facts stored with a person created by this request "
                                  "(multipart: JSON text)")
    liveness: bool | None = LivenessField


class EnrollRequest(EnrollOptions):
    images: list[Base64Image] = Field(min_length=1, json_schema_extra={"items": _B64},
                                      description="photos of the person, base64")


class ClusterOptions(_Strict):
    far: float | None = Field(
        default=None, ge=1e-12, lt=1.0,
        description="false-accept rate whose calibrated threshold decides 'same person' "
                    "(default 1e-3); must be one the model's threshold table resolves")
    method: Literal["agglomerative", "hdbscan"] = Field(
        default="agglomerative", description="constrained average-linkage agglomeration, or "
                                             "HDBSCAN with clusters split for cannot-link")
    linkage: Literal["average", "single", "complete"] = "average"
    min_size: int = Field(default=2, ge=1, le=10_000,
                          description="smaller clusters are reported as unclustered")
    neighbours: int = Field(default=30, ge=1, le=10_000,
                            description="k of the k-NN graph (agglomerative)")


class ClusterRequest(ClusterOptions):
    images: list[Base64Image] = Field(min_length=1, json_schema_extra={"items": _B64},
                                      description="the photos to group, base64")


class CollectionCreate(_Strict):
    name: str = Field(min_length=1, max_length=200, description="unique collection name")


class PersonCreate(_Strict):
    name: str = Field(min_length=1, max_length=200,
                      description="unique within the collection; no '/' (it is a URL segment)")
    metadata: dict[str, Any] | None = None


class KeyCreate(_Strict):
    scope: Literal["read", "enroll", "admin"]
    collection: str | None = Field(default=None, min_length=1, max_length=200,
                                   description="bind the key to this collection")
    name: str = Field(default="", max_length=200, description="a label for people")


# ----------------------------------------------------------------------------- responses


class _Answer(BaseModel):
    """A response mirroring a recognizer ``to_dict()``: fields the recognizer adds later
    pass through (documented here once they are)."""

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody
    request_id: str


class ThresholdOut(BaseModel):
    value: float
    far: float
    impostors: int


class IntBox(BaseModel):
    left: int
    top: int
    right: int
    bottom: int


class FloatBox(BaseModel):
    left: float
    top: float
    right: float
    bottom: float


class ImageReport(_Answer):
    index: int
    problem: str | None
    detail: str
    faces_detected: int
    liveness: list[float | None] | None = Field(
        default=None, description="attack score of each face when liveness was checked")


class VerifyImage(ImageReport):
    box: IntBox | None


class VerifyResponse(_Answer):
    score: float | None
    threshold: ThresholdOut
    same: bool | None
    images: list[VerifyImage]


class CandidateOut(_Answer):
    person: str
    score: float
    templates: int


class IdentifiedFaceOut(_Answer):
    box: IntBox
    liveness: float | None = None
    best: str
    known: bool
    candidates: list[CandidateOut]
    threshold: ThresholdOut
    fpir_bound: float


class IdentifyResponse(ImageReport):
    collection: str
    faces: list[IdentifiedFaceOut]


class EmbeddedFace(_Answer):
    box: IntBox
    detection_score: float
    embedding: list[float]


class EmbeddedImage(ImageReport):
    faces: list[EmbeddedFace]


class EmbedResponse(_Answer):
    model: str = Field(description="fingerprint of the model contract")
    embedding_size: int
    images: list[EmbeddedImage]


class EnrollOutcomeOut(_Answer):
    index: int
    accepted: bool
    face_id: int | None
    problem: str | None
    detail: str
    box: IntBox | None
    liveness: float | None = None


class EnrollResponse(_Answer):
    collection: str
    person: str
    accepted: int
    rejected: int
    images: list[EnrollOutcomeOut]


class ClusteredFaceOut(BaseModel):
    image: int = Field(description="index of the image in the request")
    face: int = Field(description="index of the face within its image")
    box: IntBox
    cluster: int = Field(description="the face's cluster; -1: it fits none")
    score: float | None = Field(description="mean cosine to the other members of its "
                                            "cluster; null when alone")


class ClusterOut(BaseModel):
    cluster: int
    faces: list[int] = Field(description="indices into 'faces'")


class ClusterImageProblem(BaseModel):
    image: int
    problem: str
    detail: str


class ClusterOptionsOut(BaseModel):
    far: float
    method: str
    linkage: str
    min_size: int
    neighbours: int


class ClusterResponse(_Answer):
    faces: list[ClusteredFaceOut]
    clusters: list[ClusterOut] = Field(description="biggest first")
    unclustered: list[int] = Field(description="indices into 'faces' of faces in no cluster")
    problems: list[ClusterImageProblem] = Field(description="images that gave no face")
    threshold: ThresholdOut
    options: ClusterOptionsOut
    refused_merges: int = Field(description="merges refused because they would put two "
                                            "faces of one image together (agglomerative)")
    split_clusters: int = Field(description="HDBSCAN clusters split for holding two faces "
                                            "of one image")


class CollectionOut(BaseModel):
    id: int
    name: str
    version: int
    person_count: int
    face_count: int
    created_at: str
    model: str = Field(description="fingerprint of the model contract it is pinned to")
    backbone: str
    embedding_size: int


class PersonOut(BaseModel):
    id: int
    collection: str
    name: str
    metadata: dict[str, Any]
    face_count: int
    created_at: str


class FaceOut(BaseModel):
    id: int
    person: str
    box: FloatBox
    quality: float
    landmark_scheme: str
    source_sha256: str
    created_at: str


class CollectionPage(BaseModel):
    items: list[CollectionOut]
    next_cursor: str | None


class PersonPage(BaseModel):
    items: list[PersonOut]
    next_cursor: str | None


class FacePage(BaseModel):
    items: list[FaceOut]
    next_cursor: str | None


class KeyOut(BaseModel):
    id: str
    scope: str
    collection: str | None
    name: str
    created_at: str
    revoked_at: str | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown once, never stored")


class KeyPage(BaseModel):
    items: list[KeyOut]


class Deleted(BaseModel):
    deleted: str
    faces_removed: int | None = None


class GalleryHealth(BaseModel):
    backend: str
    collections: int
    persons: int
    faces: int


class HealthResponse(BaseModel):
    status: Literal["ok"]
    worker: int = Field(description="process id of the worker that answered")
    model: dict[str, Any]
    calibrated_fars: list[float] | None
    gallery: GalleryHealth
    limits: dict[str, int]
    micro_batching: dict[str, Any]
    liveness: bool = Field(description="a presentation-attack detector is loaded")
    liveness_threshold: float | None = Field(
        description="its operating point: a face is an attack when its score (the attack "
                    "probability) is at least this; null without a detector")


def form_schema(model: type[BaseModel], files: dict[str, bool]) -> dict[str, Any]:
    """The ``multipart/form-data`` schema of an image request: ``files`` maps each image
    field to whether it repeats; the options are text parts (JSON text for objects)."""
    options = model.model_json_schema()
    props: dict[str, Any] = {}
    for name, many in files.items():
        binary = {"type": "string", "format": "binary"}
        props[name] = {"type": "array", "items": binary, "minItems": 1} if many else binary
    for name, spec in options.get("properties", {}).items():
        if name in files:
            continue
        if "anyOf" in spec and any(s.get("type") == "object" for s in spec["anyOf"]):
            props[name] = {"type": "string", "description": "a JSON object"}
        else:
            props[name] = {k: v for k, v in spec.items() if k != "title"}
    return {"type": "object", "properties": props, "required": list(files),
            "additionalProperties": False}


__all__ = [
    "CandidateOut",
    "ClusterImageProblem",
    "ClusterOptions",
    "ClusterOptionsOut",
    "ClusterOut",
    "ClusterRequest",
    "ClusterResponse",
    "ClusteredFaceOut",
    "CollectionCreate",
    "CollectionOut",
    "CollectionPage",
    "Deleted",
    "EmbedOptions",
    "EmbedRequest",
    "EmbedResponse",
    "EmbeddedFace",
    "EmbeddedImage",
    "EnrollOptions",
    "EnrollOutcomeOut",
    "EnrollRequest",
    "EnrollResponse",
    "ErrorBody",
    "ErrorEnvelope",
    "FaceOut",
    "FacePage",
    "FloatBox",
    "GalleryHealth",
    "HealthResponse",
    "IdentifiedFaceOut",
    "IdentifyOptions",
    "IdentifyRequest",
    "IdentifyResponse",
    "ImageReport",
    "IntBox",
    "KeyCreate",
    "KeyCreated",
    "KeyOut",
    "KeyPage",
    "PersonCreate",
    "PersonOut",
    "PersonPage",
    "ThresholdOut",
    "VerifyImage",
    "VerifyOptions",
    "VerifyRequest",
    "VerifyResponse",
    "form_schema",
]
