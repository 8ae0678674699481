"""The gallery: the durable store of enrolled faces, behind one abstract interface.

A gallery holds *collections*. A collection pins the :class:`ModelContract` of the encoder
its templates were computed with; every write of templates states the contract it used and
is refused (:class:`ContractMismatchError`) when it differs, so one collection never mixes
two models. A collection holds *persons* (unique names within it, JSON metadata), and a
person holds *faces*: a template (``(D,)`` float32, ``D`` = the contract's
``embedding_size``), the PNG of a context crop around the face with its landmarks in crop
coordinates (so the face can be re-aligned and re-embedded by another model), the face's
box in the source image, the SHA-256 of the source file (duplicate detection) and a quality
score.

Contract of every :class:`GalleryStore` implementation:

- Every write is one transaction: it happens entirely or not at all, whatever crashes.
  :meth:`~GalleryStore.add_faces` creates the person inside the same transaction, so no
  person is ever visible half-enrolled.
- Ids (collections, persons, faces) are positive integers, never reused, even after deletes.
- Deleting a collection deletes its persons and faces; deleting a person deletes its faces.
- Every change in a collection increments its ``version`` (by one per transaction), so a
  process holding an in-memory index knows when to reload; :meth:`~GalleryStore.changes_since`
  says which faces were added and removed since a version it saw. A version is only
  meaningful with the collection's ``id``: a collection deleted and created again under the
  same name starts again at version 0 with a new id.
- Persons are listed in order of their names' Unicode code points (binary comparison), with
  opaque cursors (keyset paging: persons added or removed while paging never make another
  person appear twice or be skipped).
- Records returned are immutable snapshots (frozen dataclasses, read-only arrays).

Errors are :class:`GalleryError` (a ``ValueError``) subclasses naming what was wrong and what
to do about it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import numpy as np

from facemetric.inference.contract import ModelContract

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The first eight bytes of every PNG file; a face's ``crop`` must start with them."""

MAX_NAME_LENGTH = 200
"""Longest collection or person name accepted (in characters)."""

MAX_PAGE = 1000
"""Largest ``limit`` :meth:`GalleryStore.list_persons` accepts."""

REEMBED_HINT = "re-embed it with `facemetric gallery reembed` or use a new collection"


# --------------------------------------------------------------------------- errors


class GalleryError(ValueError):
    """Base class of every error the gallery raises on purpose."""


class NotFoundError(GalleryError):
    """A collection, person or face that does not exist (or no longer does)."""


class AlreadyExistsError(GalleryError):
    """A collection or person name that is already taken."""


class InvalidInputError(GalleryError):
    """An argument the gallery cannot store: a bad name, face, metadata, cursor or limit."""


class DimensionMismatchError(InvalidInputError):
    """A template whose length is not the model contract's ``embedding_size``."""


class ContractMismatchError(GalleryError):
    """Templates from one model offered to a collection built with another.

    Attributes:
        collection: the collection's name.
        stored: the contract the collection was built with.
        given: the contract the caller is using.
    """

    def __init__(self, collection: str, stored: ModelContract, given: ModelContract) -> None:
        self.collection = collection
        self.stored = stored
        self.given = given
        super().__init__(
            f"collection {collection!r} was built with model {stored.backbone} "
            f"(fingerprint {stored.fingerprint()[:16]}, {stored.describe()}), "
            f"you are using {given.backbone} (fingerprint {given.fingerprint()[:16]}, "
            f"{given.describe()}); {REEMBED_HINT}"
        )


class ConcurrentChangeError(GalleryError):
    """A write based on a view of the collection that another writer has since changed
    (e.g. faces added while a re-embedding was running); read again and retry."""


class NotAGalleryError(GalleryError):
    """A file that is not a facemetric gallery (another format or another application's
    database)."""


class SchemaTooNewError(GalleryError):
    """A gallery written by a newer facemetric, with a schema this version cannot read."""


class GalleryBusyError(GalleryError):
    """Other writers held the database longer than the configured timeout."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Collection:
    """A named set of persons whose templates all come from one model.

    Attributes:
        id: never reused, even after the collection is deleted.
        name: unique in the gallery.
        contract: the model contract every template in the collection was computed with.
        created_at: creation time (UTC, timezone-aware).
        version: incremented by every change in the collection (0 when created).
        person_count, face_count: sizes when the record was read.
    """

    id: int
    name: str
    contract: ModelContract
    created_at: datetime
    version: int
    person_count: int
    face_count: int

    @property
    def embedding_size(self) -> int:
        """``D``: the length of every template in the collection."""
        return self.contract.embedding_size


@dataclass(frozen=True)
class Person:
    """One enrolled identity.

    Attributes:
        id: never reused.
        collection: the name of the collection the person belongs to.
        name: unique within the collection.
        metadata: JSON-safe facts about the person (a copy; changing it changes nothing).
        created_at: creation time (UTC, timezone-aware).
        face_count: number of faces when the record was read.
    """

    id: int
    collection: str
    name: str
    metadata: dict[str, Any] = field(hash=False)
    created_at: datetime
    face_count: int


def as_template(value: Any, what: str) -> np.ndarray:
    """A read-only float32 copy of a 1-D finite float array (:class:`InvalidInputError`
    otherwise); ``what`` names it in the message."""
    array = np.asarray(value)
    if array.ndim != 1 or array.size == 0:
        raise InvalidInputError(
            f"{what} must be a 1-D array of D floats (one embedding), got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(f"{what} must hold floats, got dtype {array.dtype}")
    out = np.array(array, dtype=np.float32)  # a private copy the caller cannot change
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{what} holds NaN or infinite values; embed the face again")
    out.setflags(write=False)
    return out


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{what} must be a number, got {value!r}") from err
    if not math.isfinite(number):
        raise InvalidInputError(f"{what} must be finite, got {number}")
    return number


_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, eq=False)
class NewFace:
    """A face to enrol (:meth:`GalleryStore.add_faces`); fields are checked and normalised
    on construction (:class:`InvalidInputError` on bad values).

    Attributes:
        template: the embedding, ``(D,)`` floats (stored as float32; a read-only copy is kept).
        crop: PNG bytes of a context crop around the face (larger than the aligned face, so
            another model with another alignment can re-embed it).
        landmarks: ``(x, y)`` points in ``crop`` pixel coordinates.
        landmark_scheme: the landmark layout (``"dlib68"``, ``"dlib5"``, ``"arcface5"`` ...).
        box: ``(left, top, right, bottom)`` of the face in the source image, in pixels.
        source_sha256: SHA-256 (hex) of the source image file, for duplicate detection.
        quality: a finite quality score (higher is better; the scale is the caller's).

    Equality is identity (the record holds an array).
    """

    template: np.ndarray
    crop: bytes
    landmarks: tuple[tuple[float, float], ...]
    landmark_scheme: str
    box: tuple[float, float, float, float]
    source_sha256: str
    quality: float

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "template", as_template(self.template, "a face's template"))
        if not isinstance(self.crop, bytes | bytearray | memoryview):
            raise InvalidInputError(f"crop must be PNG bytes, got {type(self.crop).__name__}")
        crop = bytes(self.crop)
        if not crop.startswith(PNG_SIGNATURE):
            raise InvalidInputError(
                "crop is not a PNG file (it does not start with the PNG signature); encode "
                "the context crop as PNG, e.g. PIL.Image.save(buffer, format='PNG')"
            )
        setattr_(self, "crop", crop)
        points = []
        for i, point in enumerate(self.landmarks):
            if len(point) != 2:
                raise InvalidInputError(f"landmark {i} must be an (x, y) pair, got {point!r}")
            points.append(
                (_finite(point[0], f"landmark {i} x"), _finite(point[1], f"landmark {i} y"))
            )
        if not points:
            raise InvalidInputError("a face needs its landmarks (at least one (x, y) point)")
        setattr_(self, "landmarks", tuple(points))
        scheme = self.landmark_scheme
        if not isinstance(scheme, str) or not scheme.strip() or len(scheme) > 64:
            raise InvalidInputError(
                f"landmark_scheme must name the landmark layout (e.g. 'dlib68'), got {scheme!r}"
            )
        if len(self.box) != 4:
            raise InvalidInputError(f"box must be (left, top, right, bottom), got {self.box!r}")
        box = tuple(_finite(v, "a box coordinate") for v in self.box)
        if not (box[0] < box[2] and box[1] < box[3]):
            raise InvalidInputError(
                f"box must be (left, top, right, bottom) with left < right and top < bottom, "
                f"got {box}"
            )
        setattr_(self, "box", box)
        setattr_(self, "source_sha256", check_sha256(self.source_sha256))
        setattr_(self, "quality", _finite(self.quality, "quality"))


@dataclass(frozen=True, eq=False)
class FaceRecord:
    """A stored face: a :class:`NewFace` with its ``id``, owner and creation time.

    ``template`` is read-only float32 ``(D,)``. Equality is identity (the record holds an
    array).
    """

    id: int
    person_id: int
    template: np.ndarray
    crop: bytes
    landmarks: tuple[tuple[float, float], ...]
    landmark_scheme: str
    box: tuple[float, float, float, float]
    source_sha256: str
    quality: float
    created_at: datetime


@dataclass(frozen=True)
class FaceCrop:
    """What re-embedding a face needs (:meth:`GalleryStore.iter_crops`)."""

    face_id: int
    person_id: int
    crop: bytes
    landmarks: tuple[tuple[float, float], ...]
    landmark_scheme: str


@dataclass(frozen=True, eq=False)
class Templates:
    """Every template of a collection at one version (:meth:`GalleryStore.templates`).

    Attributes:
        collection_id, version: the snapshot the arrays come from.
        fingerprint: the contract fingerprint of the model the templates come from.
        face_ids, person_ids: ``(n,)`` int64, face ids ascending.
        matrix: ``(n, D)`` float32, row ``i`` the template of ``face_ids[i]``.
    """

    collection_id: int
    version: int
    fingerprint: str
    face_ids: np.ndarray
    person_ids: np.ndarray
    matrix: np.ndarray


@dataclass(frozen=True)
class Changes:
    """What changed in a collection between two versions (:meth:`GalleryStore.changes_since`).

    Attributes:
        collection_id: the collection (compare it with the one the caller's index was
            built from: a recreated collection restarts its versions).
        since, version: the versions compared (``version`` is the current one).
        complete: ``False`` when the change log no longer reaches back to ``since`` (it is
            trimmed, and a re-embedding changes every template): reload everything with
            :meth:`GalleryStore.templates`; the id lists are then empty.
        added: faces added after ``since`` and still present, ascending.
        removed: faces present at ``since`` and removed since, ascending.
        persons: persons created, renamed or deleted after ``since``, ascending.
    """

    collection_id: int
    since: int
    version: int
    complete: bool
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    persons: tuple[int, ...] = ()


# ---------------------------------------------------------------- checks shared by stores


def check_name(value: Any, what: str) -> str:
    """Return ``value`` if it is an acceptable collection or person name, else raise
    :class:`InvalidInputError`: a string of 1–:data:`MAX_NAME_LENGTH` printable characters
    without leading or trailing whitespace."""
    if not isinstance(value, str):
        raise InvalidInputError(f"a {what} name must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_NAME_LENGTH:
        raise InvalidInputError(
            f"a {what} name must have 1 to {MAX_NAME_LENGTH} characters, got {len(value)}"
        )
    if value != value.strip() or not value.isprintable():
        raise InvalidInputError(
            f"a {what} name must be printable without leading or trailing whitespace, got {value!r}"
        )
    return value


def metadata_json(metadata: Mapping[str, Any] | None) -> str:
    """Serialise person metadata (a JSON object with string keys, finite numbers)."""
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInputError("person metadata must be a dict with string keys")
    try:
        return json.dumps(dict(metadata), sort_keys=True, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidInputError(
            f"person metadata must be JSON-safe (str, int, finite float, bool, None, lists, "
            f"dicts): {err}"
        ) from err


def check_sha256(value: Any) -> str:
    """``value`` as 64 lower-case hex digits, or :class:`InvalidInputError`."""
    sha = value.lower() if isinstance(value, str) else ""
    if not _SHA256.fullmatch(sha):
        raise InvalidInputError(
            f"source_sha256 must be 64 hex digits (hashlib.sha256(file_bytes).hexdigest()), "
            f"got {value!r}"
        )
    return sha


def check_ids(ids: Sequence[int], what: str) -> list[int]:
    """Distinct positive integer ids, ascending (bools and other types are refused)."""
    out = set()
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InvalidInputError(f"{what} ids must be positive integers, got {value!r}")
        out.add(int(value))
    return sorted(out)


def check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"limit must be an int from 1 to {MAX_PAGE}, got {limit!r}")
    return limit


_CURSOR_PREFIX = "person-name:"


def encode_cursor(last_name: str) -> str:
    """The opaque cursor continuing a listing after the person called ``last_name``."""
    raw = (_CURSOR_PREFIX + last_name).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_cursor(cursor: str) -> str:
    """Inverse of :func:`encode_cursor`; :class:`InvalidInputError` for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8")
    except (AttributeError, UnicodeError, binascii.Error, ValueError) as err:
        raise InvalidInputError(
            f"invalid cursor {cursor!r}: pass back the next_cursor list_persons returned"
        ) from err
    if not text.startswith(_CURSOR_PREFIX):
        raise InvalidInputError(
            f"invalid cursor {cursor!r}: pass back the next_cursor list_persons returned"
        )
    return text[len(_CURSOR_PREFIX) :]


def check_new_faces(
    person_name: str, faces: Sequence[NewFace], contract: ModelContract
) -> list[NewFace]:
    """The arguments of :meth:`GalleryStore.add_faces`, checked before any transaction: a
    valid person name, at least one :class:`NewFace`, a :class:`ModelContract`, and every
    template with the contract's ``D`` values (else :class:`DimensionMismatchError`)."""
    check_name(person_name, "person")
    faces = list(faces)
    if not faces:
        raise InvalidInputError("add_faces needs at least one face; use add_person() alone")
    if not isinstance(contract, ModelContract):
        raise InvalidInputError(
            f"contract must be the ModelContract of the encoder that made the templates, "
            f"got {type(contract).__name__}"
        )
    size = contract.embedding_size
    for i, face in enumerate(faces):
        if not isinstance(face, NewFace):
            raise InvalidInputError(f"face {i} must be a NewFace, got {type(face).__name__}")
        if face.template.shape != (size,):
            raise DimensionMismatchError(
                f"face {i}'s template has {face.template.shape[0]} values but the model "
                f"contract ({contract.backbone}) makes D={size}: it was computed by another "
                f"model; embed the face with the collection's model"
            )
    return faces


def check_collection_contract(
    collection: str, contract_json: str, fingerprint: str, contract: ModelContract
) -> None:
    """Raise :class:`ContractMismatchError` unless ``contract`` is the collection's model
    (its stored JSON and fingerprint)."""
    if fingerprint != contract.fingerprint():
        raise ContractMismatchError(collection, ModelContract.from_json(contract_json), contract)


# --------------------------------------------------------------------------- the interface


class GalleryStore(ABC):
    """The operations every gallery backend offers (see the module docstring for the
    guarantees). Collections are addressed by name, persons by (collection, name), faces by
    id. A store is a context manager; :meth:`close` releases it."""

    # -- lifetime

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store cannot be used afterwards. Idempotent."""

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- collections

    @abstractmethod
    def create_collection(self, name: str, contract: ModelContract) -> Collection:
        """Create an empty collection pinned to ``contract``.

        Raises:
            AlreadyExistsError: the name is taken.
        """

    @abstractmethod
    def get_collection(self, name: str) -> Collection:
        """The collection called ``name`` (:class:`NotFoundError` if none)."""

    @abstractmethod
    def list_collections(self) -> list[Collection]:
        """Every collection, by name."""

    @abstractmethod
    def delete_collection(self, name: str) -> None:
        """Delete the collection with its persons and faces (:class:`NotFoundError` if none)."""

    def check_contract(self, collection: str, contract: ModelContract) -> Collection:
        """Return the collection if it was built with ``contract`` (same fingerprint).

        Raises:
            ContractMismatchError: it was built with another model.
            NotFoundError: no such collection.
        """
        found = self.get_collection(collection)
        if found.contract.fingerprint() != contract.fingerprint():
            raise ContractMismatchError(found.name, found.contract, contract)
        return found

    # -- persons

    @abstractmethod
    def add_person(
        self, collection: str, name: str, metadata: Mapping[str, Any] | None = None
    ) -> Person:
        """Create a person without faces (:class:`AlreadyExistsError` if the name is taken)."""

    @abstractmethod
    def get_person(self, collection: str, name: str) -> Person:
        """The person called ``name`` in ``collection`` (:class:`NotFoundError` if none)."""

    @abstractmethod
    def list_persons(
        self, collection: str, after: str | None = None, limit: int = 100
    ) -> tuple[list[Person], str | None]:
        """One page of persons by name: the first ``limit`` after the cursor ``after``
        (``None``: from the start). Returns the page and the cursor of the next page
        (``None`` when this page is the last)."""

    @abstractmethod
    def rename_person(self, collection: str, name: str, new_name: str) -> Person:
        """Rename a person (:class:`AlreadyExistsError` if ``new_name`` is taken)."""

    @abstractmethod
    def delete_person(self, collection: str, name: str) -> None:
        """Delete a person with all its faces."""

    # -- faces

    @abstractmethod
    def add_faces(
        self,
        collection: str,
        person_name: str,
        faces: Sequence[NewFace],
        *,
        contract: ModelContract,
        create_person: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Add ``faces`` (at least one) to a person in one transaction, all or nothing.

        ``contract`` is the model the templates were computed with; it is checked against
        the collection's inside the transaction (so a concurrent re-embedding cannot slip
        in between). With ``create_person`` a missing person is created in the same
        transaction with ``metadata`` (ignored for an existing person).

        Returns:
            the new face ids, in the order of ``faces``.

        Raises:
            ContractMismatchError, DimensionMismatchError, NotFoundError (no collection;
            no person and ``create_person=False``).
        """

    @abstractmethod
    def faces(self, collection: str, person_name: str) -> list[FaceRecord]:
        """Every face of a person, by id."""

    @abstractmethod
    def find_source(self, collection: str, source_sha256: str) -> list[tuple[int, Person]]:
        """Faces of the collection cut from the image with this SHA-256: ``(face id,
        person)`` pairs by face id (empty if the image was never enrolled)."""

    @abstractmethod
    def remove_faces(self, collection: str, face_ids: Sequence[int]) -> None:
        """Remove faces of ``collection`` in one transaction; persons stay (possibly
        without faces).

        Raises:
            NotFoundError: some id is not a face of this collection (nothing is removed).
        """

    @abstractmethod
    def templates(self, collection: str, face_ids: Sequence[int] | None = None) -> Templates:
        """Templates of the collection (or of those ``face_ids`` that are still in it),
        read from one consistent snapshot, for building or updating a search index."""

    @abstractmethod
    def iter_crops(self, collection: str, batch_size: int = 256) -> Iterator[FaceCrop]:
        """Every face's crop and landmarks, by face id, read ``batch_size`` at a time, for
        re-embedding with another model. Faces added while iterating may be included."""

    @abstractmethod
    def replace_templates(
        self,
        collection: str,
        contract: ModelContract,
        templates: Mapping[int, np.ndarray],
    ) -> Collection:
        """Replace every template of the collection and re-pin it to ``contract``, in one
        transaction (the outcome of re-embedding with a new model).

        Raises:
            ConcurrentChangeError: ``templates`` does not cover exactly the collection's
                faces (faces were added or removed meanwhile; nothing is changed).
            DimensionMismatchError: a template is not ``contract.embedding_size`` long.
        """

    # -- change tracking

    @abstractmethod
    def version(self, collection: str) -> int:
        """The collection's current version."""

    @abstractmethod
    def changes_since(self, collection: str, version: int) -> Changes:
        """Faces added and removed after ``version`` (see :class:`Changes`).

        Raises:
            InvalidInputError: ``version`` is newer than the collection's (it was probably
                deleted and created again: reload).
        """


__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_PAGE",
    "PNG_SIGNATURE",
    "AlreadyExistsError",
    "Changes",
    "Collection",
    "ConcurrentChangeError",
    "ContractMismatchError",
    "DimensionMismatchError",
    "FaceCrop",
    "FaceRecord",
    "GalleryBusyError",
    "GalleryError",
    "GalleryStore",
    "InvalidInputError",
    "NewFace",
    "NotAGalleryError",
    "NotFoundError",
    "Person",
    "SchemaTooNewError",
    "Templates",
    "as_template",
    "check_collection_contract",
    "check_ids",
    "check_limit",
    "check_name",
    "check_new_faces",
    "check_sha256",
    "decode_cursor",
    "encode_cursor",
    "metadata_json",
]
