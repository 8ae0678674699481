"""The model as the service shares it between threads: a detector behind a lock, an encoder
that can micro-batch, and per-request timings of both.

- :class:`LockedDetector`: dlib does not promise safe concurrent calls on one model, so one
  thread detects at a time (parallelism comes from worker processes).
- :class:`ServiceEncoder`: wraps the loaded :class:`~facemetric.inference.Encoder` and runs
  one forward pass at a time (dlib's network is not safe to call from two threads, and a
  CPU forward pass already uses every core). Without micro-batching each call runs alone,
  exactly the Python API's computation, the others waiting their turn. With it, calls from
  concurrent requests are merged: a request arriving while a forward pass runs queues; when
  the pass ends, one of the queued requests runs *all* queued faces (up to ``max_faces``)
  in one pass and hands each request its rows. Nothing waits when the model is idle
  (unless ``wait_s`` > 0 asks the first request to wait for company).
- :func:`timed` / :func:`request_timings`: per-thread accumulators, so a request can report
  how long it spent detecting, embedding and queueing (the ``Server-Timing`` header).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facemetric.inference.encoder import Encoder, as_face_batch

_local = threading.local()


def reset_timings() -> None:
    """Start a request's timings on this thread."""
    _local.timings = {}


def request_timings() -> dict[str, float]:
    """Seconds this thread's request has spent per phase since :func:`reset_timings`."""
    return dict(getattr(_local, "timings", {}))


def add_time(phase: str, seconds: float) -> None:
    """Add ``seconds`` to this thread's ``phase`` (ignored outside a request)."""
    timings = getattr(_local, "timings", None)
    if timings is not None:
        timings[phase] = timings.get(phase, 0.0) + seconds


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Add the time spent in the ``with`` block to this thread's ``phase``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add_time(phase, time.perf_counter() - start)


class LockedDetector:
    """One detection at a time on a shared :class:`~facemetric.align.detect.FaceDetector`
    (the only method the face pipeline calls is :meth:`detect`)."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[Any]:
        start = time.perf_counter()
        with self._lock:
            add_time("queue", time.perf_counter() - start)
            with timed("detect"):
                return list(self.detector.detect(image))


@dataclass(eq=False)
class _Job:
    faces: np.ndarray
    done: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None

    def value(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class BatchStats:
    """How micro-batching went: forward passes run and the faces and requests they held."""

    passes: int = 0
    faces: int = 0
    requests: int = 0
    largest: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, faces: int, requests: int) -> None:
        with self.lock:
            self.passes += 1
            self.faces += faces
            self.requests += requests
            self.largest = max(self.largest, requests)

    def to_dict(self) -> dict[str, float]:
        with self.lock:
            return {"passes": self.passes, "faces": self.faces, "requests": self.requests,
                    "largest": self.largest,
                    "requests_per_pass": self.requests / self.passes if self.passes else 0.0}


class ServiceEncoder(Encoder):
    """The loaded encoder, timed, and micro-batched when ``micro_batch`` (module docstring).

    Args:
        inner: the encoder :func:`~facemetric.inference.load_model` returned.
        micro_batch: merge concurrent calls into one forward pass.
        max_faces: most faces in one merged pass (a single larger call runs alone).
        wait_s: how long the first call of a batch waits for others.
    """

    def __init__(self, inner: Encoder, *, micro_batch: bool = False, max_faces: int = 64,
                 wait_s: float = 0.0) -> None:
        if max_faces < 1 or wait_s < 0:
            raise ValueError(f"max_faces must be positive and wait_s non-negative, got "
                             f"{max_faces}, {wait_s}")
        self.inner = inner
        self.contract = inner.contract
        self.thresholds = inner.thresholds
        self.micro_batch = micro_batch
        self.max_faces = max_faces
        self.wait_s = wait_s
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._busy = False
        self._alone = threading.Lock()

    def _forward(self, faces: np.ndarray) -> np.ndarray:
        return self.inner._forward(faces)

    def embed_faces(
        self, faces: np.ndarray | Sequence[np.ndarray], batch_size: int = 64
    ) -> np.ndarray:
        """``inner.embed_faces`` — directly, or merged with concurrent calls."""
        if not self.micro_batch:
            start = time.perf_counter()
            with self._alone:
                add_time("queue", time.perf_counter() - start)
                with timed("embed"):
                    return self.inner.embed_faces(faces, batch_size)
        with timed("embed"):
            batch = as_face_batch(faces)
            if len(batch) == 0:
                return self.inner.embed_faces(batch, batch_size)
            return self._merged(batch)

    def _merged(self, faces: np.ndarray) -> np.ndarray:
        job = _Job(faces)
        with self._cond:
            self._queue.append(job)
        while True:
            with self._cond:
                while self._busy and not job.done:
                    self._cond.wait()
                if job.done:
                    return job.value()
                self._busy = True
                if self.wait_s > 0:
                    self._cond.wait(self.wait_s)  # others queue meanwhile (we stay busy)
                batch = self._take(job)
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _take(self, job: _Job) -> list[_Job]:
        """``job`` and the oldest queued jobs after it, up to ``max_faces`` faces."""
        batch = [job]
        total = len(job.faces)
        rest = []
        for other in self._queue:
            if other is job:
                continue
            if total + len(other.faces) <= self.max_faces:
                batch.append(other)
                total += len(other.faces)
            else:
                rest.append(other)
        self._queue = rest
        return batch

    def _run(self, batch: list[_Job]) -> None:
        try:
            faces = batch[0].faces if len(batch) == 1 else np.concatenate(
                [j.faces for j in batch])
            out = self.inner.embed_faces(faces, batch_size=max(1, len(faces)))
            start = 0
            for j in batch:
                j.result = out[start:start + len(j.faces)]
                start += len(j.faces)
            self.stats.add(len(faces), len(batch))
        except BaseException as err:
            for j in batch:
                j.error = err
            raise
        finally:
            for j in batch:
                j.done = True


__all__ = ["BatchStats", "LockedDetector", "ServiceEncoder", "add_time", "request_timings",
           "reset_timings", "timed"]
