"""The HTTP API: ``create_app(settings)`` builds the FastAPI app of one worker.

Endpoints (prefix ``/v1``; OpenAPI at ``/openapi.json``, interactive docs at ``/docs``),
with the key scope each needs and the Python API it calls::

    GET     /health                                       -       contract, gallery size
    POST    /verify                                       read    Recognizer.verify
    POST    /embed                                        read    Recognizer.embed
    POST    /collections                                  admin   store.create_collection
    GET     /collections                                  read    store.list_collections
    GET     /collections/{c}                              read    store.get_collection
    DELETE  /collections/{c}                              admin   store.delete_collection
    POST    /collections/{c}/identify                     read    Recognizer.identify
    POST    /collections/{c}/persons                      enroll  store.add_person
    GET     /collections/{c}/persons                      read    store.list_persons
    GET     /collections/{c}/persons/{p}                  read    store.get_person
    DELETE  /collections/{c}/persons/{p}                  enroll  Recognizer.remove
    POST    /collections/{c}/persons/{p}/faces            enroll  Recognizer.enroll
    GET     /collections/{c}/persons/{p}/faces            read    store.faces
    GET     /collections/{c}/persons/{p}/faces/{id}       read    store.faces
    DELETE  /collections/{c}/persons/{p}/faces/{id}       enroll  store.remove_faces
    POST    /cluster                                      read    clustering.cluster_images
    POST    /keys, GET /keys, DELETE /keys/{id}           admin   KeyStore

Status codes: 200 (201 for a creation), 4xx with the error envelope
(:mod:`facemetric.service.errors`) for everything a client can fix, 503 when the gallery
is busy or the model uncalibrated, 500 ``internal_error`` for a bug (logged, never
detailed). Image outcomes follow the Python API: an image that is *readable* but has no
usable face is a normal answer (``problem: "no_face"`` ...). Unreadable images (corrupt,
truncated, empty, too many pixels) are refused with 422 ``unreadable_image`` — verify when
either image is, identify and embed when every image is (embed reports the others per
image) — except by enrollment, which answers per image (partial success, 201) and refuses
with 422 ``nothing_enrolled`` only when no image was accepted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from facemetric import __version__
from facemetric.gallery import GalleryStore, NotFoundError
from facemetric.recognizer import Problem
from facemetric.recognizer.faces import ImageFaces
from facemetric.service import schemas as S
from facemetric.service.engine import ServiceEngine
from facemetric.service.errors import ApiError, install_error_handlers
from facemetric.service.inputs import ImageRequestSpec, read_image_request, read_json
from facemetric.service.keys import ApiKey, InvalidKeyError, Scope, UnknownKeyIdError
from facemetric.service.middleware import TIMING_KEY, GuardMiddleware
from facemetric.service.settings import ServiceSettings

logger = logging.getLogger("facemetric.service")

_T = TypeVar("_T")

_ERROR_DOCS = {
    "400": "malformed request (bad JSON, a key in the URL)",
    "401": "no API key, or an invalid or revoked one",
    "403": "the key's scope or collection does not allow this",
    "404": "no such collection, person, face or key",
    "409": "the name is taken, or the collection was built with another model",
    "413": "the body or the number of images is above the limit",
    "415": "a content type this endpoint does not take",
    "422": "fields that do not match the schema, or images that cannot be used",
    "500": "a bug: the log has the details under the request id",
    "503": "the gallery is busy or the model is not calibrated; retry later",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": S.ErrorEnvelope, "description": text} for code, text in _ERROR_DOCS.items()
}

VERIFY = ImageRequestSpec(S.VerifyRequest, S.VerifyOptions, {"a": False, "b": False})
IDENTIFY = ImageRequestSpec(S.IdentifyRequest, S.IdentifyOptions, {"image": False})
EMBED = ImageRequestSpec(S.EmbedRequest, S.EmbedOptions, {"images": True})
ENROLL = ImageRequestSpec(S.EnrollRequest, S.EnrollOptions, {"images": True}, ("metadata",))
CLUSTER = ImageRequestSpec(S.ClusterRequest, S.ClusterOptions, {"images": True})

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")

CollectionName = Path(min_length=1, max_length=200, description="collection name")
PersonName = Path(min_length=1, max_length=200, description="person name")


def _image_body(spec: ImageRequestSpec) -> dict[str, Any]:
    name = spec.json_model.__name__
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}},
        "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{name}Form"}},
    }}}


def _json_body(model: type[Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _encode_cursor(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode("ascii")


def _decode_cursor(kind: str, cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        text = ""
    if not text.startswith(f"{kind}:"):
        raise ApiError(422, "invalid_cursor",
                       f"invalid cursor {cursor[:80]!r}: pass back the next_cursor of the "
                       f"previous page")
    return text[len(kind) + 1:]


def _collection_out(c: Any) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "version": c.version, "person_count": c.person_count,
            "face_count": c.face_count, "created_at": c.created_at.isoformat(),
            "model": c.contract.fingerprint(), "backbone": c.contract.backbone,
            "embedding_size": c.contract.embedding_size}


def _person_out(p: Any) -> dict[str, Any]:
    return {"id": p.id, "collection": p.collection, "name": p.name, "metadata": p.metadata,
            "face_count": p.face_count, "created_at": p.created_at.isoformat()}


def _face_out(f: Any, person: str) -> dict[str, Any]:
    return {"id": f.id, "person": person,
            "box": dict(zip(("left", "top", "right", "bottom"), f.box, strict=True)),
            "quality": f.quality, "landmark_scheme": f.landmark_scheme,
            "source_sha256": f.source_sha256, "created_at": f.created_at.isoformat()}


def _image_report(im: ImageFaces) -> dict[str, Any]:
    return {"index": im.index, "problem": None if im.problem is None else str(im.problem),
            "detail": im.detail, "faces_detected": im.faces_detected}


def embed_dict(images: list[ImageFaces], fingerprint: str, size: int) -> dict[str, Any]:
    """The ``/v1/embed`` answer for ``Recognizer.embed``'s result."""
    return {"model": fingerprint, "embedding_size": size, "images": [
        {**_image_report(im), "faces": [
            {"box": f.box_dict(), "detection_score": f.detection_score,
             "embedding": [float(v) for v in f.embedding]} for f in im.faces]}
        for im in images]}


def _refuse_unreadable(images: list[ImageFaces], every: bool, details: Any) -> None:
    """422 ``unreadable_image`` when any (``every=False``) or every image is unreadable."""
    bad = [im for im in images if im.problem == Problem.UNREADABLE]
    if bad and (not every or len(bad) == len(images)):
        listing = "; ".join(f"image {im.index}: {im.detail}" for im in bad[:5])
        raise ApiError(422, "unreadable_image",
                       f"cannot read the image(s) ({listing}); send JPEG, PNG or another "
                       f"common format, whole and within the pixel limit", details)


def create_app(settings: ServiceSettings, *, store: GalleryStore | None = None,
               engine: ServiceEngine | None = None) -> FastAPI:
    """The service for one worker process: loads the model, opens the gallery (or serves
    ``store``, any :class:`~facemetric.gallery.GalleryStore`) and the key file, and wires the
    endpoints (module docstring). ``engine`` replaces all of that with a built one.

    Raises:
        FileNotFoundError, ValueError: the model, gallery or key file cannot be used.
    """
    eng = engine if engine is not None else ServiceEngine(settings, store)
    if eng.keys.active_count() == 0:
        logger.warning("no API key exists: every request but /v1/health will be refused "
                       "(401). Create one with `facemetric keys create --scope admin "
                       "--gallery %s`", "GALLERY" if "://" in settings.gallery
                       else settings.gallery)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the event loop's thread pool (every sync handler and image request runs there)
        to_thread.current_default_thread_limiter().total_tokens = settings.max_threads
        yield
        eng.close()

    app = FastAPI(
        title="facemetric recognition service",
        version=__version__,
        description="Verify, identify, enroll and embed faces over HTTP; the same engine as "
                    "the Python API and the CLI. Keys travel in `Authorization: Bearer` or "
                    "`X-API-Key`, never in a URL.",
        docs_url="/docs", redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan,
    )
    app.state.engine = eng
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, max_request_bytes=settings.max_request_bytes)
    store = eng.store

    # ------------------------------------------------------------------ auth

    def authenticate(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header_key: Annotated[str | None, Depends(_api_key)],
    ) -> ApiKey:
        """The request's key (401 when missing or invalid, 400 when two differ)."""
        www = {"WWW-Authenticate": "Bearer"}
        raw_auth = request.headers.get("authorization")
        if raw_auth is not None and bearer is None:
            raise ApiError(401, "invalid_key", "the Authorization header must be "
                           "'Bearer <key>'", headers=www)
        tokens = {t.strip() for t in (bearer.credentials if bearer else None, header_key)
                  if t is not None and t.strip()}
        if len(tokens) > 1:
            raise ApiError(400, "conflicting_keys", "the Authorization and X-API-Key headers "
                           "carry different keys; send one")
        if not tokens:
            raise ApiError(401, "missing_key", "this endpoint needs an API key: send "
                           "'Authorization: Bearer <key>' or 'X-API-Key: <key>' (an admin "
                           "creates keys with `facemetric keys create`)", headers=www)
        try:
            return eng.keys.authenticate(tokens.pop())
        except InvalidKeyError as err:
            raise ApiError(401, "invalid_key", str(err), {"reason": err.reason},
                           headers=www) from None

    def allow(key: ApiKey, scope: Scope, collection: str | None = None) -> None:
        if not key.scope.implies(scope):
            raise ApiError(403, "insufficient_scope",
                           f"this key ({key.id}) has scope '{key.scope}'; this operation "
                           f"needs '{scope}' (or higher)",
                           {"key_scope": str(key.scope), "required": str(scope)})
        if collection is not None and key.collection is not None and key.collection != \
                collection:
            raise ApiError(403, "wrong_collection",
                           f"this key ({key.id}) is bound to collection {key.collection!r} "
                           f"and cannot touch {collection!r}",
                           {"key_collection": key.collection})

    Key = Depends(authenticate)

    admission = asyncio.Semaphore(settings.max_inflight)

    async def images(request: Request, work: Callable[[], _T]) -> _T:
        """Run an image request's ``work`` once one of ``max_inflight`` slots is free —
        waiting without holding a thread, so the thread pool (``max_threads``) stays free
        for quick handlers; the waits for the slot and for a thread count as ``admit``."""
        start = time.perf_counter()
        async with admission:
            handed = time.perf_counter()
            result, timings = await run_in_threadpool(eng.run_images, work, handed)
        timings["admit"] = timings.get("admit", 0.0) + (handed - start)
        request.scope[TIMING_KEY] = timings
        return result

    router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

    # ------------------------------------------------------------------ health

    @router.get("/health", response_model=S.HealthResponse, tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness and what this worker serves: the model contract, the calibrated FARs,
        the gallery's size, the limits, the presentation-attack detector's threshold.
        Needs no key."""
        table = eng.encoder.thresholds
        return {
            "status": "ok",
            "worker": os.getpid(),
            "model": eng.contract.to_dict(),
            "calibrated_fars": None if table is None else list(table.fars),
            "gallery": {"backend": eng.backend, **eng.gallery_size()},
            "limits": {"max_request_bytes": settings.max_request_bytes,
                       "max_images": settings.max_images, "max_pixels": settings.max_pixels},
            "micro_batching": {"enabled": settings.micro_batch, **eng.encoder.stats.to_dict()},
            "liveness": eng.liveness is not None,
            "liveness_threshold": None if eng.plain.liveness is None
            else eng.plain.liveness.threshold,
        }

    # ------------------------------------------------------------------ 1:1 and embed

    @router.post("/verify", response_model=S.VerifyResponse, tags=["recognition"],
                 openapi_extra=_image_body(VERIFY))
    async def verify(request: Request, key: ApiKey = Key) -> dict[str, Any]:
        """Are the faces in images ``a`` and ``b`` the same person? Score (cosine),
        the calibrated threshold with its FAR, the decision (``same``) and the boxes;
        ``same`` is null when an image has no usable face (its ``problem`` says why)."""
        allow(key, Scope.READ)
        opts, files = await read_image_request(request, VERIFY, settings.max_images)
        result = await images(request, lambda: eng.verify(
            files["a"][0], files["b"][0], opts.far, opts.policy, opts.liveness))
        out = result.to_dict()
        _refuse_unreadable([result.a, result.b], every=False, details=out)
        return out

    @router.post("/embed", response_model=S.EmbedResponse, tags=["recognition"],
                 openapi_extra=_image_body(EMBED))
    async def embed(request: Request, key: ApiKey = Key) -> dict[str, Any]:
        """Detect, align and embed: per image its faces (box, detection score, unit
        embedding) or its problem."""
        allow(key, Scope.READ)
        opts, files = await read_image_request(request, EMBED, settings.max_images)
        found = await images(request, lambda: eng.embed(files["images"], opts.policy))
        out = embed_dict(found, eng.contract.fingerprint(), eng.contract.embedding_size)
        _refuse_unreadable(found, every=True, details=out)
        return out

    @router.post("/cluster", response_model=S.ClusterResponse, tags=["recognition"],
                 openapi_extra=_image_body(CLUSTER))
    async def cluster(request: Request, key: ApiKey = Key) -> dict[str, Any]:
        """Group the faces of a batch of photos by person, without a gallery: every face of
        every image is detected and embedded, then clustered at the calibrated threshold of
        ``far``, with two faces of one image never in one cluster (cannot-link) — the rules
        of ``facemetric cluster``. Images without a usable face are listed in
        ``problems``; 422 ``unreadable_image`` when no image can be read."""
        allow(key, Scope.READ)
        opts, files = await read_image_request(request, CLUSTER, settings.max_images)
        result = await images(request, lambda: eng.cluster(
            files["images"], opts.far, opts.method, opts.linkage, opts.min_size,
            opts.neighbours))
        out = result.to_dict()
        unreadable = [p for p in result.problems if p.problem == str(Problem.UNREADABLE)]
        if len(unreadable) == len(files["images"]):
            listing = "; ".join(f"image {p.image}: {p.detail}" for p in unreadable[:5])
            raise ApiError(422, "unreadable_image",
                           f"cannot read any image ({listing}); send JPEG, PNG or another "
                           f"common format, whole and within the pixel limit", out)
        return out

    # ------------------------------------------------------------------ collections

    @router.post("/collections", response_model=S.CollectionOut, status_code=201,
                 tags=["collections"], openapi_extra=_json_body(S.CollectionCreate))
    async def create_collection(request: Request, key: ApiKey = Key) -> dict[str, Any]:
        """Create an empty collection pinned to this service's model."""
        body = await read_json(request, S.CollectionCreate)
        allow(key, Scope.ADMIN, body.name)
        if "/" in body.name:
            raise ApiError(422, "invalid_input", "a collection name cannot contain '/' (it "
                           "is a URL path segment)")
        created = await run_in_threadpool(store.create_collection, body.name, eng.contract)
        return _collection_out(created)

    @router.get("/collections", response_model=S.CollectionPage, tags=["collections"])
    def list_collections(
        key: ApiKey = Key,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, max_length=1000),
    ) -> dict[str, Any]:
        """Collections by name (a key bound to a collection sees only that one)."""
        allow(key, Scope.READ)
        after = None if cursor is None else _decode_cursor("collection", cursor)
        found = [c for c in store.list_collections()
                 if (key.collection is None or c.name == key.collection)
                 and (after is None or c.name > after)]
        page = found[:limit]
        more = len(found) > limit
        return {"items": [_collection_out(c) for c in page],
                "next_cursor": _encode_cursor("collection", page[-1].name) if more else None}

    @router.get("/collections/{collection}", response_model=S.CollectionOut,
                tags=["collections"])
    def get_collection(collection: str = CollectionName, key: ApiKey = Key) -> dict[str, Any]:
        """A collection with its size, version and model."""
        allow(key, Scope.READ, collection)
        return _collection_out(store.get_collection(collection))

    @router.delete("/collections/{collection}", response_model=S.Deleted, tags=["collections"])
    def delete_collection(collection: str = CollectionName, key: ApiKey = Key) -> dict[str, Any]:
        """Delete a collection with all its persons and faces."""
        allow(key, Scope.ADMIN, collection)
        faces = store.get_collection(collection).face_count
        store.delete_collection(collection)
        eng.forget(collection)
        return {"deleted": collection, "faces_removed": faces}

    # ------------------------------------------------------------------ identify

    @router.post("/collections/{collection}/identify", response_model=S.IdentifyResponse,
                 tags=["recognition"], openapi_extra=_image_body(IDENTIFY))
    async def identify(request: Request, collection: str = CollectionName,
                       key: ApiKey = Key) -> dict[str, Any]:
        """Who is in the image? For each face kept by ``policy``: enrolled persons ranked by
        score (up to ``k``) and the answer — the top person when their score reaches the
        threshold at ``far``, else ``unknown`` — with ``fpir_bound`` = persons × far."""
        allow(key, Scope.READ, collection)
        opts, files = await read_image_request(request, IDENTIFY, settings.max_images)
        result = await images(request, lambda: eng.identify(
            collection, files["image"][0], opts.k, opts.far, opts.policy, opts.liveness))
        out = {"collection": collection, **result.to_dict()}
        _refuse_unreadable([result.image], every=True, details=out)
        return out

    # ------------------------------------------------------------------ persons

    @router.post("/collections/{collection}/persons", response_model=S.PersonOut,
                 status_code=201, tags=["persons"], openapi_extra=_json_body(S.PersonCreate))
    async def create_person(request: Request, collection: str = CollectionName,
                            key: ApiKey = Key) -> dict[str, Any]:
        """Create a person without faces (enrolling faces creates one too)."""
        allow(key, Scope.ENROLL, collection)
        body = await read_json(request, S.PersonCreate)
        if "/" in body.name:
            raise ApiError(422, "invalid_input", "a person name cannot contain '/' (it is a "
                           "URL path segment)")
        person = await run_in_threadpool(store.add_person, collection, body.name, body.metadata)
        return _person_out(person)

    @router.get("/collections/{collection}/persons", response_model=S.PersonPage,
                tags=["persons"])
    def list_persons(
        collection: str = CollectionName,
        key: ApiKey = Key,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, max_length=1000),
    ) -> dict[str, Any]:
        """Persons by name, ``limit`` at a time; pass ``next_cursor`` back for the next page
        (persons added or removed meanwhile are never repeated or skipped)."""
        allow(key, Scope.READ, collection)
        persons, after = store.list_persons(collection, after=cursor, limit=limit)
        return {"items": [_person_out(p) for p in persons], "next_cursor": after}

    @router.get("/collections/{collection}/persons/{person}", response_model=S.PersonOut,
                tags=["persons"])
    def get_person(collection: str = CollectionName, person: str = PersonName,
                   key: ApiKey = Key) -> dict[str, Any]:
        """A person with metadata and face count."""
        allow(key, Scope.READ, collection)
        return _person_out(store.get_person(collection, person))

    @router.delete("/collections/{collection}/persons/{person}", response_model=S.Deleted,
                   tags=["persons"])
    def delete_person(collection: str = CollectionName, person: str = PersonName,
                      key: ApiKey = Key) -> dict[str, Any]:
        """Delete a person and all their faces."""
        allow(key, Scope.ENROLL, collection)
        with eng.collection(collection) as rec:
            removed = rec.remove(person)
        return {"deleted": person, "faces_removed": removed}

    # ------------------------------------------------------------------ faces

    @router.post("/collections/{collection}/persons/{person}/faces",
                 response_model=S.EnrollResponse, status_code=201, tags=["faces"],
                 openapi_extra=_image_body(ENROLL))
    async def enroll(request: Request, collection: str = CollectionName,
                     person: str = PersonName, key: ApiKey = Key) -> dict[str, Any]:
        """Enroll photos of a person (created if new): each image is accepted (its
        ``face_id``) or rejected with its reason — unreadable, no_face, several_faces,
        face_too_small, duplicate. Accepted faces are stored in one transaction. 201 when
        at least one was accepted; 422 ``nothing_enrolled`` (same per-image details) when
        none was."""
        allow(key, Scope.ENROLL, collection)
        opts, files = await read_image_request(request, ENROLL, settings.max_images)
        result = await images(request, lambda: eng.enroll(
            collection, person, files["images"], opts.policy, opts.metadata, opts.liveness))
        out = {"collection": collection, **result.to_dict()}
        if result.accepted == 0:
            reasons = sorted({str(o.problem) for o in result.outcomes})
            raise ApiError(422, "nothing_enrolled",
                           f"no image was enrolled ({', '.join(reasons)}); see details for "
                           f"each image's reason", out)
        return out

    def _faces_of(collection: str, person: str) -> list[Any]:
        return store.faces(collection, person)

    @router.get("/collections/{collection}/persons/{person}/faces", response_model=S.FacePage,
                tags=["faces"])
    def list_faces(
        collection: str = CollectionName,
        person: str = PersonName,
        key: ApiKey = Key,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, max_length=1000),
    ) -> dict[str, Any]:
        """A person's faces by id (box, quality, source SHA-256; not the template)."""
        allow(key, Scope.READ, collection)
        after = 0
        if cursor is not None:
            text = _decode_cursor("face", cursor)
            if not text.isdigit():
                raise ApiError(422, "invalid_cursor", "invalid cursor: pass back next_cursor")
            after = int(text)
        faces = [f for f in _faces_of(collection, person) if f.id > after]
        page = faces[:limit]
        more = len(faces) > limit
        return {"items": [_face_out(f, person) for f in page],
                "next_cursor": _encode_cursor("face", str(page[-1].id)) if more else None}

    def _face(collection: str, person: str, face_id: int) -> Any:
        for f in _faces_of(collection, person):
            if f.id == face_id:
                return f
        raise NotFoundError(f"no face {face_id} of person {person!r} in collection "
                            f"{collection!r}")

    @router.get("/collections/{collection}/persons/{person}/faces/{face_id}",
                response_model=S.FaceOut, tags=["faces"])
    def get_face(collection: str = CollectionName, person: str = PersonName,
                 face_id: int = Path(ge=1, le=2**63 - 1), key: ApiKey = Key) -> dict[str, Any]:
        """One face's record."""
        allow(key, Scope.READ, collection)
        return _face_out(_face(collection, person, face_id), person)

    @router.delete("/collections/{collection}/persons/{person}/faces/{face_id}",
                   response_model=S.Deleted, tags=["faces"])
    def delete_face(collection: str = CollectionName, person: str = PersonName,
                    face_id: int = Path(ge=1, le=2**63 - 1), key: ApiKey = Key
                    ) -> dict[str, Any]:
        """Remove one face (the person stays, possibly without faces)."""
        allow(key, Scope.ENROLL, collection)
        with eng.collection(collection):
            _face(collection, person, face_id)
            store.remove_faces(collection, [face_id])
        return {"deleted": str(face_id), "faces_removed": 1}

    # ------------------------------------------------------------------ keys

    @router.post("/keys", response_model=S.KeyCreated, status_code=201, tags=["keys"],
                 openapi_extra=_json_body(S.KeyCreate))
    async def create_key(request: Request, key: ApiKey = Key) -> dict[str, Any]:
        """Create a key; the answer holds it, once. A key bound to a collection creates
        keys bound to the same collection only."""
        allow(key, Scope.ADMIN)
        body = await read_json(request, S.KeyCreate)
        if key.collection is not None and body.collection != key.collection:
            raise ApiError(403, "wrong_collection",
                           f"this key is bound to collection {key.collection!r}: it can only "
                           f"create keys bound to it (set \"collection\": {key.collection!r})")
        try:
            record, secret = await run_in_threadpool(eng.keys.create, body.scope,
                                                     body.collection, body.name)
        except ValueError as err:
            raise ApiError(422, "invalid_input", str(err)) from None
        return {**record.to_dict(), "key": secret}

    @router.get("/keys", response_model=S.KeyPage, tags=["keys"])
    def list_keys(key: ApiKey = Key) -> dict[str, Any]:
        """Every key (never a secret); a bound key sees its collection's keys."""
        allow(key, Scope.ADMIN)
        return {"items": [k.to_dict() for k in eng.keys.list(collection=key.collection)]}

    @router.delete("/keys/{key_id}", response_model=S.KeyOut, tags=["keys"])
    def revoke_key(key_id: str = Path(min_length=1, max_length=64), key: ApiKey = Key
                   ) -> dict[str, Any]:
        """Revoke a key: refused from the next request on, by every worker."""
        allow(key, Scope.ADMIN)
        try:
            target = eng.keys.get(key_id)
            if key.collection is not None and target.collection != key.collection:
                raise UnknownKeyIdError(f"no key with id {key_id!r} in collection "
                                        f"{key.collection!r}")
            return eng.keys.revoke(key_id).to_dict()
        except UnknownKeyIdError as err:
            raise ApiError(404, "not_found", str(err)) from None

    app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


_EXTRA_SCHEMAS = (
    (S.VerifyRequest, VERIFY), (S.IdentifyRequest, IDENTIFY), (S.EmbedRequest, EMBED),
    (S.EnrollRequest, ENROLL), (S.ClusterRequest, CLUSTER), (S.CollectionCreate, None),
    (S.PersonCreate, None), (S.KeyCreate, None),
)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies read by hand (JSON and multipart)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for model, spec in _EXTRA_SCHEMAS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        if spec is not None:
            components[f"{model.__name__}Form"] = S.form_schema(spec.options_model, spec.files)
    app.openapi_schema = doc
    return doc


def create_app_from_env() -> FastAPI:
    """The app of one uvicorn worker, from the settings ``facemetric serve`` put in the
    environment (:data:`~facemetric.service.settings.SETTINGS_ENV`)."""
    from facemetric.service.logs import configure_logging

    configure_logging()
    return create_app(ServiceSettings.from_env())


__all__ = ["ERROR_RESPONSES", "create_app", "create_app_from_env", "embed_dict"]
