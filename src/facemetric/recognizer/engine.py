"""``Recognizer``: verify, identify, enroll and remove — one engine under the CLI and the
REST service.

A recognizer joins a model (any :class:`~facemetric.inference.Encoder` with its contract and
calibrated thresholds), the face pipeline (:mod:`facemetric.recognizer.faces`) and,
optionally, a gallery collection (:mod:`facemetric.gallery`) searched through an in-memory
:class:`~facemetric.index.TemplateIndex` rebuilt from the store on open.

Decisions:

- **verify(a, b, far)**: score = cosine of the two faces' embeddings; same person when
  ``score >= threshold(far)``.
- **identify(image, k, far)**: persons ranked by ``mode`` — ``"max"`` (best template of the
  person) or ``"mean"`` (the normalised mean of the person's templates); the answer is the
  top person when their score reaches ``threshold(far)``, else ``unknown``. The threshold is
  the 1:1 one at ``far``; against ``N`` enrolled persons the chance that someone not enrolled
  is matched to somebody is at most ``N · far`` (reported as ``fpir_bound``), so choose
  ``far`` about ``1/N`` of the false-match rate you can accept.
- **enroll(person, images)**: each image is accepted or rejected with a typed reason
  (unreadable, no face, several faces, face too small, duplicate — the same photo anywhere
  in the collection, or a template within ``duplicate_threshold`` cosine of one of this
  person's); the accepted faces are stored in one transaction, so a person is never
  half-enrolled.

**Retrieval post-processing** (``postprocess=``, a :class:`facemetric.index.PostProcessing`:
query expansion, database-side augmentation, k-reciprocal re-ranking): the probe's
``shortlist_size`` best templates by cosine are reordered, and persons are ranked by their
first template in that order. Each candidate's ``score`` stays the person's best template
cosine (the same number ``person_score="max"`` reports, exact because the shortlist is the
top by cosine), so the calibrated threshold keeps its meaning: the re-ranked top person is
accepted when *their own* cosine reaches ``threshold(far)``. Post-processing reorders
templates, so it needs ``person_score="max"``.

Thresholds are never hard-coded: they come from the model's
:class:`~facemetric.inference.ThresholdTable` (``facemetric calibrate``). A model without one
can still embed and rank, but any accept/reject decision raises a ``ValueError`` that says
how to calibrate.

The in-memory index follows the store: before each search the collection's version is
read and the store's change log since the index's version is applied in place (adds,
removals, renamed persons) — enrollments by another process or worker included; when the
log no longer reaches back (it is trimmed, or the collection was re-embedded) the index is
rebuilt from the store.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemetric.inference.calibration import Threshold, ThresholdTable
from facemetric.inference.contract import ModelContract
from facemetric.inference.default import DEFAULT
from facemetric.inference.encoder import Encoder
from facemetric.recognizer.faces import FacePipeline, ImageFaces, ImageInput, Problem
from facemetric.recognizer.liveness import LivenessCheck
from facemetric.recognizer.results import (
    UNKNOWN,
    Candidate,
    Enrollment,
    EnrollOutcome,
    Identification,
    IdentifiedFace,
    Verification,
)

if TYPE_CHECKING:
    from facemetric.index import PostProcessing

DEFAULT_FAR = 1e-3
"""The false-accept rate a decision uses when the caller names none."""

SCORE_MODES = ("max", "mean")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from facemetric.data.images import decode_image

    return decode_image(data, "stored crop", exif_transpose=False)


class Recognizer:
    """The facade (module docstring).

    Args:
        model: an :class:`Encoder`, or a source for :func:`facemetric.inference.load_model`
            (training run, checkpoint, ``.onnx`` file, ``"dlib"``); by default the
            installed default model (``"default"``, :mod:`facemetric.inference.default`).
        gallery: a :class:`~facemetric.gallery.GalleryStore`, a PostgreSQL URL
            (``postgresql://…``), or a path to an SQLite gallery file (created if missing);
            ``None`` for verify/embed only.
        collection: the collection used (created, pinned to this model's contract, when
            missing; a collection built with another model is refused).
        thresholds: overrides the model's own threshold table.
        person_score: ``"max"`` or ``"mean"`` (module docstring).
        index_backend: ``"exact"`` (default) or an approximate faiss index (``"hnsw"``,
            ``"ivf"``), used above ``approximate_above`` templates; ``index_dtype``
            ``"float32"``, ``"float16"`` or ``"int8"`` for compact templates in memory — see
            :class:`~facemetric.index.TemplateIndex`.
        duplicate_threshold: a new template this close (cosine) to one of the person's
            stored templates is rejected as a duplicate.
        min_face_size, max_pixels, detector: see
            :class:`~facemetric.recognizer.faces.FacePipeline`.
        liveness: an optional presentation-attack detector (a
            :class:`~facemetric.pad.PadDetector` or its saved folder): every face of
            ``verify``/``enroll``/``identify`` is scored, and an image with an attack is
            refused with ``Problem.PRESENTATION_ATTACK`` (their ``liveness`` argument:
            ``None`` = check when a detector is set, ``False`` = skip, ``True`` = require).
        liveness_threshold: overrides the detector's own threshold (attack when
            ``score >= liveness_threshold``); see :mod:`facemetric.recognizer.liveness`.
        postprocess: optional retrieval post-processing of ``identify`` (module docstring).
    """

    def __init__(
        self,
        model: Encoder | str | os.PathLike[str] = DEFAULT,
        gallery: Any = None,
        *,
        collection: str = "default",
        thresholds: ThresholdTable | None = None,
        person_score: str = "max",
        index_backend: str = "exact",
        approximate_above: int = 100_000,
        index_dtype: str = "float32",
        duplicate_threshold: float = 0.995,
        min_face_size: int = 32,
        max_pixels: int | None = None,
        detector: Any = None,
        liveness: Any = None,
        liveness_threshold: float | None = None,
        postprocess: PostProcessing | None = None,
        _reembedding: bool = False,
    ) -> None:
        from facemetric.inference.load import load_model

        self.encoder = model if isinstance(model, Encoder) else load_model(model)
        if person_score not in SCORE_MODES:
            raise ValueError(f"person_score must be one of {SCORE_MODES}, got {person_score!r}")
        self.person_score = person_score
        if postprocess is not None and person_score != "max":
            raise ValueError("post-processing reorders templates and ranks persons by their "
                             "best one: use person_score='max' with postprocess=")
        self.postprocess = postprocess
        self.duplicate_threshold = float(duplicate_threshold)
        table = thresholds if thresholds is not None else self.encoder.thresholds
        if table is not None:
            table.check_model(self.contract.fingerprint(), "the threshold table")
        self.thresholds = table
        kwargs: dict[str, Any] = {"min_face_size": min_face_size, "detector": detector}
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        self.pipeline = FacePipeline(self.encoder, **kwargs)
        if liveness is None and liveness_threshold is not None:
            raise ValueError("liveness_threshold needs a liveness detector: Recognizer(..., "
                             "liveness=facemetric.pad.load_detector(FOLDER))")
        self.liveness = None if liveness is None else LivenessCheck(liveness, liveness_threshold)
        self.collection = collection
        if index_backend not in ("exact", "hnsw", "ivf"):
            raise ValueError(f"index_backend must be 'exact', 'hnsw' or 'ivf', got "
                             f"{index_backend!r}")
        self.index_backend = index_backend
        self.approximate_above = approximate_above
        self.index_dtype = index_dtype
        self.store = _open_store(gallery)
        self._index: Any = None
        self._names: dict[int, str] = {}
        self._counts: dict[int, int] = {}
        self._version: int | None = None
        self._owner_of: dict[int, int] = {}
        self._collection_id: int | None = None
        self._reembedding = _reembedding
        if self.store is not None and not _reembedding:
            self._open_collection()

    @classmethod
    def for_reembedding(
        cls, model: Encoder | str | os.PathLike[str], gallery: Any, collection: str = "default"
    ) -> Recognizer:
        """A recognizer on a *new* model for :meth:`reembed` of a collection pinned to
        another (the contract check that guards every search is what ``reembed`` lifts)."""
        rec = cls(model, gallery, collection=collection, _reembedding=True)
        rec._require_store().get_collection(collection)  # NotFoundError for a missing one
        return rec

    # ---------------------------------------------------------------- basics

    @property
    def contract(self) -> ModelContract:
        """The model's contract (the gallery collection is pinned to it)."""
        return self.encoder.contract

    def threshold(self, far: float | None = None) -> Threshold:
        """The calibrated threshold for ``far`` (default :data:`DEFAULT_FAR`).

        Raises:
            ValueError: the model has no threshold table, or the table cannot resolve ``far``.
        """
        if self.thresholds is None:
            raise ValueError(
                "this model has no calibrated thresholds, so it cannot decide accept/reject: "
                "run `facemetric calibrate MODEL --pairs PAIRS --data ALIGNED` (or "
                "`--folder LABELLED_DIR`) first, or pass thresholds=ThresholdTable"
            )
        return self.thresholds.threshold(DEFAULT_FAR if far is None else far)

    def embed(self, images: Sequence[ImageInput], policy: str = "largest") -> list[ImageFaces]:
        """Detect, align and embed: one :class:`ImageFaces` per image (faces or problem)."""
        return self.pipeline.process(list(images), policy)

    def _live(self, found: list[ImageFaces], liveness: bool | None) -> list[ImageFaces]:
        """The liveness check on ``found`` when asked (``None``: when a detector is set)."""
        if liveness is False or (liveness is None and self.liveness is None):
            return found
        if self.liveness is None:
            raise ValueError("liveness=True but this recognizer has no PAD detector: "
                             "Recognizer(..., liveness=facemetric.pad.load_detector(FOLDER))")
        return self.liveness.apply(found)

    def verify(
        self, a: ImageInput, b: ImageInput, far: float | None = None, policy: str = "largest",
        liveness: bool | None = None,
    ) -> Verification:
        """1:1 (module docstring); ``policy`` must keep one face (``largest``, ``centre`` or
        ``single``)."""
        if policy == "all":
            raise ValueError("verify compares one face per image: use 'largest', 'centre' or "
                             "'single'")
        threshold = self.threshold(far)
        fa, fb = self._live(self.pipeline.process([a, b], policy), liveness)
        if not (fa.ok and fb.ok):
            return Verification(None, threshold, None, fa, fb)
        score = float(np.dot(fa.faces[0].embedding.astype(np.float64),
                             fb.faces[0].embedding.astype(np.float64)))
        return Verification(score, threshold, threshold.accepts(score), fa, fb)

    # ---------------------------------------------------------------- gallery

    def _require_store(self) -> Any:
        if self.store is None:
            raise ValueError("this recognizer has no gallery: Recognizer(model, gallery=PATH)")
        return self.store

    def _open_collection(self) -> None:
        from facemetric.gallery import NotFoundError

        store = self._require_store()
        try:
            store.get_collection(self.collection)
        except NotFoundError:
            store.create_collection(self.collection, self.contract)
        store.check_contract(self.collection, self.contract)
        self._rebuild()

    def _new_index(self) -> Any:
        from facemetric.index import TemplateIndex

        approximate = None if self.index_backend == "exact" else self.index_backend
        return TemplateIndex(self.contract.embedding_size, dtype=self.index_dtype,
                             approximate=approximate, approximate_above=self.approximate_above)

    def _rebuild(self) -> None:
        store = self._require_store()
        snap = store.templates(self.collection)
        index = self._new_index()
        if len(snap.face_ids):
            index.add(snap.face_ids, snap.person_ids, snap.matrix)
        self._owner_of = dict(zip(snap.face_ids.tolist(), snap.person_ids.tolist(), strict=True))
        self._names = {p.id: p.name for p in _all_persons(store, self.collection)}
        ids, counts = np.unique(snap.person_ids, return_counts=True)
        self._counts = {int(i): int(c) for i, c in zip(ids, counts, strict=True)}
        self._index, self._version = index, snap.version
        self._collection_id = snap.collection_id

    def _sync(self) -> None:
        """Bring the index up to the store's version: apply the change log in place (adds,
        removals, renamed persons) or, when it no longer reaches back, rebuild."""
        if self.store is None or self._reembedding:
            return
        store = self.store
        if store.version(self.collection) == self._version:
            return
        try:
            changes = store.changes_since(self.collection, self._version)
        except ValueError:  # a recreated collection: its versions restarted
            self._rebuild()
            return
        if not changes.complete or changes.collection_id != self._collection_id:
            self._rebuild()
            return
        if changes.removed:
            gone = [f for f in changes.removed if f in self._owner_of]
            self._index.remove(np.asarray(gone, np.int64))
            for f in gone:
                owner = self._owner_of.pop(f)
                self._counts[owner] -= 1
        if changes.added:
            snap = store.templates(self.collection, face_ids=list(changes.added))
            fresh = [i for i, f in enumerate(snap.face_ids.tolist()) if f not in self._owner_of]
            if fresh:
                self._index.add(snap.face_ids[fresh], snap.person_ids[fresh], snap.matrix[fresh])
                for f, owner in zip(snap.face_ids[fresh].tolist(),
                                    snap.person_ids[fresh].tolist(), strict=True):
                    self._owner_of[f] = owner
                    self._counts[owner] = self._counts.get(owner, 0) + 1
        if changes.persons or changes.added:
            self._names = {p.id: p.name for p in _all_persons(store, self.collection)}
        self._version = changes.version

    def persons_records(self) -> list[Any]:
        """Every :class:`~facemetric.gallery.Person` of the collection (paged reads)."""
        return _all_persons(self._require_store(), self.collection)

    @property
    def persons(self) -> list[str]:
        """Names of the enrolled persons with at least one face, sorted."""
        self._sync()
        return sorted(self._names[p] for p, c in self._counts.items() if c > 0 and p in self._names)

    def enroll(
        self,
        person: str,
        images: Sequence[ImageInput],
        policy: str = "single",
        metadata: dict[str, Any] | None = None,
        liveness: bool | None = None,
    ) -> Enrollment:
        """Enroll ``images`` of ``person`` (module docstring); one outcome per image."""
        store = self._require_store()
        if not isinstance(person, str) or not person.strip():
            raise ValueError(f"a person needs a non-empty name, got {person!r}")
        if policy == "all":
            raise ValueError("enroll stores one face per image: use 'single' (default), "
                             "'largest' or 'centre'")
        from facemetric.gallery import NewFace, NotFoundError

        found = self._live(self.pipeline.process(list(images), policy), liveness)
        try:
            stored = [f.template for f in store.faces(self.collection, person)]
        except NotFoundError:
            stored = []
        outcomes: dict[int, EnrollOutcome] = {}
        new: list[tuple[int, NewFace]] = []
        seen_sha: dict[str, int] = {}
        kept_templates: list[np.ndarray] = list(stored)
        for im in found:
            if not im.ok:
                assert im.problem is not None
                outcomes[im.index] = EnrollOutcome(
                    im.index, False, problem=im.problem, detail=im.detail,
                    liveness=im.faces[0].liveness if im.faces else None)
                continue
            face = im.faces[0]
            dup = self._duplicate(im, face.embedding, kept_templates, seen_sha)
            if dup:
                outcomes[im.index] = EnrollOutcome(im.index, False, problem=Problem.DUPLICATE,
                                                   detail=dup, box=face.box,
                                                   liveness=face.liveness)
                continue
            seen_sha[im.source_sha256] = im.index
            kept_templates.append(face.embedding)
            new.append((im.index, NewFace(
                template=face.embedding.astype(np.float32),
                crop=_png(face.crop),
                landmarks=tuple((float(x), float(y)) for x, y in face.crop_landmarks),
                landmark_scheme=face.scheme,
                box=face.box,
                source_sha256=im.source_sha256,
                quality=face.detection_score,
            )))
        if new:
            ids = store.add_faces(self.collection, person, [f for _, f in new],
                                  contract=self.contract, metadata=metadata)
            for (i, _), face_id in zip(new, ids, strict=True):
                box = found[i].faces[0].box
                outcomes[i] = EnrollOutcome(i, True, face_id=int(face_id), box=box,
                                            liveness=found[i].faces[0].liveness)
            self._sync()
        return Enrollment(person, tuple(outcomes[i] for i in range(len(found))))

    def _duplicate(self, im: ImageFaces, embedding: np.ndarray, templates: list[np.ndarray],
                   seen: dict[str, int]) -> str:
        store = self._require_store()
        if im.source_sha256 in seen:
            return f"the same photo as image {seen[im.source_sha256]} of this request"
        hits = store.find_source(self.collection, im.source_sha256)
        if hits:
            face_id, owner = hits[0]
            return f"this photo is already enrolled (face {face_id} of {owner.name!r})"
        if templates:
            best = float(np.max(np.stack(templates) @ embedding))
            if best >= self.duplicate_threshold:
                return (f"a near-identical face of this person is already stored (cosine "
                        f"{best:.4f} ≥ {self.duplicate_threshold})")
        return ""

    def remove(self, person: str) -> int:
        """Delete ``person`` and all their faces; returns how many faces were removed.

        Raises:
            facemetric.gallery.NotFoundError: no such person in the collection.
        """
        store = self._require_store()
        count = store.get_person(self.collection, person).face_count
        store.delete_person(self.collection, person)
        self._sync()
        return count

    def identify(
        self,
        image: ImageInput,
        k: int = 5,
        far: float | None = None,
        policy: str = "largest",
        liveness: bool | None = None,
    ) -> Identification:
        """1:N for one image (module docstring); ``policy="all"`` answers for every face."""
        return self.identify_many([image], k=k, far=far, policy=policy, liveness=liveness)[0]

    def identify_many(
        self,
        images: Sequence[ImageInput],
        k: int = 5,
        far: float | None = None,
        policy: str = "largest",
        liveness: bool | None = None,
    ) -> list[Identification]:
        """:meth:`identify` for several images, searched in one batch."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        threshold = self.threshold(far)
        found = self._live(self.pipeline.process(list(images), policy), liveness)
        return self.identify_embeddings(found, k, threshold)

    def identify_embeddings(
        self, found: Sequence[ImageFaces], k: int, threshold: Threshold
    ) -> list[Identification]:
        """Rank enrolled persons for already embedded faces (what ``identify`` does after
        the face pipeline)."""
        self._require_store()
        self._sync()
        faces = [(i, f) for i, im in enumerate(found) if im.ok for f in im.faces]
        if faces and len(self._index):
            queries = np.stack([f.embedding for _, f in faces]).astype(np.float32)
            if self.postprocess is None or self.postprocess.identity:
                hits = self._index.search_owners(queries, k, mode=self.person_score)
                scores, owners = hits.scores.numpy(), hits.ids.numpy()
            else:
                scores, owners = self._reranked_persons(queries, k)
        else:
            scores = np.zeros((len(faces), 0), np.float32)
            owners = np.zeros((len(faces), 0), np.int64)
        persons = sum(1 for c in self._counts.values() if c > 0)
        per_image: dict[int, list[IdentifiedFace]] = {i: [] for i in range(len(found))}
        for row, (i, face) in enumerate(faces):
            cands = tuple(
                Candidate(self._names.get(int(o), f"#{int(o)}"), float(s),
                          self._counts.get(int(o), 0))
                for s, o in zip(scores[row], owners[row], strict=True) if int(o) >= 0
            )
            best = cands[0].person if cands and threshold.accepts(cands[0].score) else UNKNOWN
            per_image[i].append(IdentifiedFace(face, cands, best, threshold, persons))
        return [Identification(im, tuple(per_image[i])) for i, im in enumerate(found)]

    def _reranked_persons(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` persons per query in post-processed template order, each with their
        best template cosine: ``(scores (Q, k), owners (Q, k))``, ``-inf`` / ``-1`` padded."""
        from facemetric.index import TemplateDatabase

        assert self.postprocess is not None
        db = TemplateDatabase(self._index)
        short = db.shortlist(queries, self.postprocess.shortlist_size)
        refined = self.postprocess.apply(queries, short, db)
        ids, cosine = refined.rows.numpy(), refined.cosine.numpy()
        owner_of = self._owner_of
        scores = np.full((len(queries), k), -np.inf, np.float32)
        owners = np.full((len(queries), k), -1, np.int64)
        for q in range(len(queries)):
            best: dict[int, float] = {}  # owner -> best cosine, in re-ranked order
            for t, c in zip(ids[q].tolist(), cosine[q].tolist(), strict=True):
                if t >= 0:
                    o = owner_of[t]
                    best[o] = max(best.get(o, -np.inf), c)
            for j, (o, c) in enumerate(list(best.items())[:k]):
                owners[q, j], scores[q, j] = o, c
        return scores, owners

    def reembed(self, progress: bool = True) -> int:
        """Re-embed every stored face of the collection with *this* recognizer's model from
        its stored context crop (re-aligned to this model's template), and re-pin the
        collection to this model — one transaction, so a failure leaves the old templates.
        Returns the number of faces re-embedded. To move a collection to a new model, open
        it with :meth:`for_reembedding` (``facemetric gallery reembed``)."""
        store = self._require_store()
        from tqdm.auto import tqdm

        new: dict[int, np.ndarray] = {}
        items = list(store.iter_crops(self.collection))
        for item in tqdm(items, desc="re-embed", unit="face", disable=not progress):
            new[item.face_id] = self.pipeline.embed_crop(
                _unpng(item.crop), np.asarray(item.landmarks, np.float64), item.landmark_scheme)
        store.replace_templates(self.collection, self.contract, new)
        self._reembedding = False
        self._rebuild()
        return len(new)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_store(gallery: Any) -> Any:
    """A store given as an object, a PostgreSQL URL (``postgresql://…``) or an SQLite path."""
    if gallery is None:
        return None
    if isinstance(gallery, str) and gallery.startswith(("postgresql://", "postgres://")):
        from facemetric.gallery import PostgresGallery

        return PostgresGallery(gallery)
    if isinstance(gallery, str | os.PathLike):
        from facemetric.gallery import SQLiteGallery

        return SQLiteGallery(Path(gallery))
    return gallery


def _all_persons(store: Any, collection: str) -> list[Any]:
    out: list[Any] = []
    cursor = None
    while True:
        page, cursor = store.list_persons(collection, after=cursor, limit=1000)
        out.extend(page)
        if cursor is None:
            return out


__all__ = ["DEFAULT_FAR", "SCORE_MODES", "Recognizer"]
