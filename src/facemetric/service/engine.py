"""What one worker process holds: the model (loaded once), the shared detector, the gallery
store, the key store, and one recognizer per collection in use — and the locks that make
them safe under the web server's threads.

Thread safety:

- detection: one at a time (:class:`~facemetric.service.batching.LockedDetector`);
- the network: one forward pass at a time, or micro-batched
  (:class:`~facemetric.service.batching.ServiceEncoder`);
- a collection's recognizer (:class:`LockedRecognizer`): its in-memory index, names and
  counts — brought up to date from the store's change log before every search — are used
  under its lock: for the search of an identification (after detection and embedding, which
  run outside it), and for a whole enrollment, so two enrollments of one collection in this
  worker never both pass the duplicate check with the same photo;
- the store: :class:`~facemetric.gallery.SQLiteGallery` keeps one connection per thread and
  serialises writers across processes; every write is one transaction.

Every answer is the Python API's: the handlers call the public ``Recognizer`` methods
(``verify``, ``embed``, ``identify``, ``enroll``, ``remove``) and
:func:`facemetric.clustering.cluster_images` with the request's options.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


class LockedRecognizer(Recognizer):
    """A :class:`~facemetric.recognizer.Recognizer` whose gallery-facing methods hold
    ``self.lock`` (a re-entrant lock): the search half of ``identify``
    (``identify_embeddings``), ``enroll``, ``remove`` and ``persons``. Detection and
    embedding of ``identify`` stay outside the lock, so searches of one collection overlap
    their slow parts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lock = threading.RLock()
        super().__init__(*args, **kwargs)

    def identify_embeddings(self, found: Any, k: int, threshold: Any) -> list[Any]:
        start = time.perf_counter()
        with self.lock:
            add_time("queue", time.perf_counter() - start)
            with timed("search"):
                return super().identify_embeddings(found, k, threshold)

    def enroll(self, *args: Any, **kwargs: Any) -> Enrollment:
        with self.lock:
            return super().enroll(*args, **kwargs)

    def remove(self, person: str) -> int:
        with self.lock:
            return super().remove(person)

    @property
    def persons(self) -> list[str]:
        with self.lock:
            return list(Recognizer.persons.fget(self))  # type: ignore[attr-defined]


class ServiceEngine:
    """The worker's state (module docstring). Build it once per process.

    Args:
        settings: what to load and the limits.
        store: any :class:`~facemetric.gallery.GalleryStore` to serve instead of opening
            ``settings.gallery`` (the engine closes it on :meth:`close`).

    Raises:
        FileNotFoundError, ValueError: the model or gallery cannot be opened (the message
            says why).
    """

    def __init__(self, settings: ServiceSettings, store: GalleryStore | None = None) -> None:
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
        self.store: GalleryStore = open_gallery(settings.gallery) if store is None else store
        if store is not None:
            self.backend = type(store).__name__
        else:
            self.backend = "postgresql" if is_postgres_url(settings.gallery) else "sqlite"
        self.keys = KeyStore(settings.keys_path)
        self.liveness = None
        if settings.liveness is not None:
            from facemetric.pad import load_detector

            self.liveness = load_detector(settings.liveness)
        self.plain = self._recognizer(None, "default")
        self._recognizers: dict[str, LockedRecognizer] = {}
        self._registry = threading.Lock()
        self._inflight = threading.BoundedSemaphore(settings.max_inflight)
        logger.info("model %s loaded in %.1f s; gallery %s (%s); keys %s",
                    self.encoder.contract.describe(), time.perf_counter() - started,
                    self.backend, "url" if self.backend != "sqlite" else settings.gallery,
                    settings.keys_path)

    @property
    def contract(self) -> Any:
        return self.encoder.contract

    def _recognizer(self, store: GalleryStore | None, collection: str) -> LockedRecognizer:
        s = self.settings
        return LockedRecognizer(self.encoder, store, collection=collection,
                                person_score=s.person_score, min_face_size=s.min_face_size,
                                max_pixels=s.max_pixels, detector=self.detector,
                                liveness=self.liveness,
                                liveness_threshold=s.liveness_threshold)

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ collections

    def recognizer(self, name: str) -> LockedRecognizer:
        """The collection's recognizer (built on first use from the store).

        Raises:
            NotFoundError: no such collection (it is never created here: 404).
        """
        with self._registry:
            rec = self._recognizers.get(name)
            if rec is None:
                self.store.get_collection(name)
                rec = self._recognizer(self.store, name)
                self._recognizers[name] = rec
            return rec

    @contextmanager
    def collection(self, name: str) -> Iterator[LockedRecognizer]:
        """The collection's recognizer for a ``with`` block; a collection found deleted
        meanwhile (by another worker) is forgotten, and its :class:`NotFoundError` (404)
        raised."""
        rec = self.recognizer(name)
        try:
            yield rec
        except NotFoundError:
            try:
                self.store.get_collection(name)
            except NotFoundError:
                self.forget(name)
            raise

    def forget(self, name: str) -> None:
        """Drop a deleted collection's recognizer."""
        with self._registry:
            self._recognizers.pop(name, None)

    # ------------------------------------------------------------------ image work

    def run_images(self, work: Callable[[], _T], submitted: float | None = None
                   ) -> tuple[_T, dict[str, float]]:
        """Run ``work`` (in the calling worker thread) with at most ``max_inflight`` image
        requests at once; returns its result and the request's phase timings in seconds:
        ``admit`` (waiting for a slot — and for a thread, from ``submitted``, the
        ``time.perf_counter()`` at which the caller handed the work to the thread pool),
        ``engine`` (the recognizer call, which includes ``queue`` — waiting for the
        detector or the network —, ``detect``, ``embed`` and ``search``)."""
        reset_timings()
        start = time.perf_counter() if submitted is None else submitted
        with self._inflight:
            add_time("admit", time.perf_counter() - start)
            with timed("engine"):
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
        except (ValueError, OverflowError) as err:
            raise ApiError(422, "far_not_calibrated", str(err),
                           {"calibrated_fars": list(rec.thresholds.fars)}) from err

    def check_liveness(self, liveness: bool | None) -> None:
        if liveness and self.liveness is None:
            raise ApiError(422, "liveness_unavailable",
                           "this service has no presentation-attack detector, so it cannot "
                           "check liveness; the operator starts it with --liveness FOLDER")

    def verify(self, a: bytes, b: bytes, far: float | None, policy: str,
               liveness: bool | None = None) -> Verification:
        self.threshold(self.plain, far)
        self.check_liveness(liveness)
        return self.plain.verify(a, b, far=far, policy=policy, liveness=liveness)

    def embed(self, images: Sequence[bytes], policy: str) -> list[Any]:
        return self.plain.embed(images, policy=policy)

    def identify(self, collection: str, image: bytes, k: int, far: float | None,
                 policy: str, liveness: bool | None = None) -> Identification:
        with self.collection(collection) as rec:
            self.threshold(rec, far)
            self.check_liveness(liveness)
            return rec.identify(image, k=k, far=far, policy=policy, liveness=liveness)

    def enroll(self, collection: str, person: str, images: Sequence[bytes], policy: str,
               metadata: dict[str, Any] | None, liveness: bool | None = None) -> Enrollment:
        self.check_liveness(liveness)
        with self.collection(collection) as rec:
            return rec.enroll(person, images, policy=policy, metadata=metadata,
                              liveness=liveness)

    def cluster(self, images: Sequence[bytes], far: float | None, method: str, linkage: str,
                min_size: int, neighbours: int) -> Any:
        """:func:`facemetric.clustering.cluster_images` with these options (``far`` None:
        the clustering default)."""
        from facemetric.clustering import DEFAULT_CLUSTER_FAR, ClusterOptions, cluster_images

        far = DEFAULT_CLUSTER_FAR if far is None else far
        self.threshold(self.plain, far)
        options = ClusterOptions(far=far, method=method, linkage=linkage, min_size=min_size,
                                 neighbours=neighbours)
        return cluster_images(self.plain, images, options)

    # ------------------------------------------------------------------ health

    def gallery_size(self) -> dict[str, int]:
        collections = self.store.list_collections()
        return {"collections": len(collections),
                "persons": sum(c.person_count for c in collections),
                "faces": sum(c.face_count for c in collections)}


__all__ = ["LockedRecognizer", "ServiceEngine"]
