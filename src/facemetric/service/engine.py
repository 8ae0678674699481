"""What one worker process holds: the model (loaded once), the shared detector, the gallery
store, the key store, and one :class:`~facemetric.recognizer.Recognizer` per collection in
use — and the locks that make them safe under the web server's threads.

Thread safety:

- detection: one at a time (:class:`~facemetric.service.batching.LockedDetector`);
- embedding: the encoder is called concurrently (or micro-batched);
- a collection's recognizer (its in-memory index, names and counts, updated from the
  store's change log before every search): its ``lock`` is held while it syncs and searches
  and for a whole enrollment, so two enrollments of one collection in this worker never both
  pass the duplicate check with the same photo; detection and embedding of a search run
  outside the lock;
- the store: :class:`~facemetric.gallery.SQLiteGallery` keeps one connection per thread
  and serialises writers across processes; every write is one transaction.

Every answer is the Python API's: the handlers call ``Recognizer.verify``, ``embed``,
``enroll``, ``remove``, and ``identify`` as its two public halves (``pipeline.process``
then ``identify_embeddings``) so that the slow half runs outside the collection lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from facemetric.gallery import GalleryStore, NotFoundError
from facemetric.recognizer import Recognizer
from facemetric.recognizer.results import Enrollment, Identification, Verification
from facemetric.service.batching import (
    LockedDetector,
    ServiceEncoder,
    add_time,
    request_timings,
    reset_timings,
    timed,
)
from facemetric.service.errors import ApiError
from facemetric.service.keys import KeyStore
from facemetric.service.settings import ServiceSettings, is_postgres_url, open_gallery

logger = logging.getLogger("facemetric.service")

_T = TypeVar("_T")


@dataclass
class _Slot:
    recognizer: Recognizer
    lock: threading.RLock


class ServiceEngine:
    """The worker's state (module docstring). Build it once per process.

    Raises:
        FileNotFoundError, ValueError: the model or gallery cannot be opened (the message
            says why).
    """

    def __init__(self, settings: ServiceSettings) -> None:
        from facemetric.align.detect import FaceDetector
        from facemetric.inference import ThresholdTable, load_model

        self.settings = settings
        started = time.perf_counter()
        inner = load_model(settings.model)
        if settings.thresholds is not None:
            inner.thresholds = ThresholdTable.load(settings.thresholds,
                                                   inner.contract.fingerprint())
        self.encoder = ServiceEncoder(inner, micro_batch=settings.micro_batch,
                                      max_faces=settings.batch_max_faces,
                                      wait_s=settings.batch_wait_ms / 1000.0)
        self.detector = LockedDetector(FaceDetector(upsample=1))
        self.store: GalleryStore = open_gallery(settings.gallery)
        self.backend = "postgresql" if is_postgres_url(settings.gallery) else "sqlite"
        self.keys = KeyStore(settings.keys_path)
        self.plain = self._recognizer(None, "default")
        self._slots: dict[str, _Slot] = {}
        self._registry = threading.Lock()
        self._inflight = threading.BoundedSemaphore(settings.max_inflight)
        logger.info("model %s loaded in %.1f s; gallery %s (%s); keys %s",
                    self.encoder.contract.describe(), time.perf_counter() - started,
                    self.backend, "url" if self.backend != "sqlite" else settings.gallery,
                    settings.keys_path)

    @property
    def contract(self) -> Any:
        return self.encoder.contract

    def _recognizer(self, store: GalleryStore | None, collection: str) -> Recognizer:
        s = self.settings
        return Recognizer(self.encoder, store, collection=collection,
                          person_score=s.person_score, min_face_size=s.min_face_size,
                          max_pixels=s.max_pixels, detector=self.detector)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ collections

    @contextmanager
    def collection(self, name: str) -> Iterator[Recognizer]:
        """The collection's recognizer, its lock held for the ``with`` block.

        Raises:
            ApiError: 404 when there is no such collection (it is never created here).
        """
        slot = self._slot(name)
        with slot.lock:
            try:
                yield slot.recognizer
            except NotFoundError:
                self._forget_if_gone(name, slot)
                raise

    def _slot(self, name: str) -> _Slot:
        with self._registry:
            slot = self._slots.get(name)
            if slot is not None:
                return slot
            self.store.get_collection(name)  # NotFoundError → 404, never auto-created
            slot = _Slot(self._recognizer(self.store, name), threading.RLock())
            self._slots[name] = slot
            return slot

    def _forget_if_gone(self, name: str, slot: _Slot) -> None:
        try:
            self.store.get_collection(name)
        except NotFoundError:
            with self._registry:
                if self._slots.get(name) is slot:
                    del self._slots[name]

    def forget(self, name: str) -> None:
        """Drop a deleted collection's recognizer."""
        with self._registry:
            self._slots.pop(name, None)

    # ------------------------------------------------------------------ image work

    def run_images(self, work: Callable[[], _T]) -> tuple[_T, dict[str, float]]:
        """Run ``work`` (in the calling worker thread) with at most ``max_inflight`` image
        requests at once; returns its result and the request's phase timings."""
        reset_timings()
        start = time.perf_counter()
        with self._inflight:
            add_time("queue", time.perf_counter() - start)
            result = work()
        return result, request_timings()

    def threshold(self, rec: Recognizer, far: float | None) -> Any:
        """The calibrated threshold at ``far``, or an :class:`ApiError` saying why not."""
        if rec.thresholds is None:
            raise ApiError(503, "model_not_calibrated",
                           "this model has no calibrated thresholds, so the service cannot "
                           "decide same/different or known/unknown; the operator must run "
                           "`facemetric calibrate` and restart it (embed and enroll still work)")
        try:
            return rec.threshold(far)
        except ValueError as err:
            raise ApiError(422, "far_not_calibrated", str(err),
                           {"calibrated_fars": list(rec.thresholds.fars)}) from err

    def verify(self, a: bytes, b: bytes, far: float | None, policy: str) -> Verification:
        self.threshold(self.plain, far)
        return self.plain.verify(a, b, far=far, policy=policy)

    def embed(self, images: Sequence[bytes], policy: str) -> list[Any]:
        return self.plain.embed(images, policy=policy)

    def identify(self, collection: str, image: bytes, k: int, far: float | None,
                 policy: str) -> Identification:
        slot = self._slot(collection)
        rec = slot.recognizer
        threshold = self.threshold(rec, far)
        found = rec.pipeline.process([image], policy)  # the slow half, outside the lock
        with slot.lock, timed("search"):
            try:
                return rec.identify_embeddings(found, k, threshold)[0]
            except NotFoundError:
                self._forget_if_gone(collection, slot)
                raise

    def enroll(self, collection: str, person: str, images: Sequence[bytes], policy: str,
               metadata: dict[str, Any] | None) -> Enrollment:
        with self.collection(collection) as rec:
            return rec.enroll(person, images, policy=policy, metadata=metadata)

    # ------------------------------------------------------------------ health

    def gallery_size(self) -> dict[str, int]:
        collections = self.store.list_collections()
        return {"collections": len(collections),
                "persons": sum(c.person_count for c in collections),
                "faces": sum(c.face_count for c in collections)}


__all__ = ["ServiceEngine"]
