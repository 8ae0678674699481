"""What a service process is started with: :class:`ServiceSettings`, and
:func:`open_gallery` (an SQLite path, or a PostgreSQL URL for the PostgreSQL store)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facemetric.recognizer.faces import DEFAULT_MAX_PIXELS

SETTINGS_ENV = "FACEMETRIC_SERVICE_SETTINGS"
"""Environment variable through which ``facemetric serve`` hands the settings (JSON) to
each uvicorn worker process."""

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class ServiceSettings:
    """Everything :func:`~facemetric.service.create_app` needs.

    Attributes:
        model: a model source for :func:`facemetric.inference.load_model` (run folder,
            checkpoint, ``.onnx`` file, ``"dlib"``); loaded once per worker process.
        gallery: an SQLite gallery file (created if missing) or a ``postgresql://`` URL.
        keys: the API key file; ``None``: beside an SQLite gallery (``people.keys.db``).
        thresholds: a threshold table JSON overriding the model's own.
        person_score: ``"max"`` or ``"mean"`` (see :class:`~facemetric.recognizer.Recognizer`).
        min_face_size: smallest accepted face box side, pixels.
        max_pixels: largest accepted image (width × height), checked from the header before
            any pixel is decoded.
        max_request_bytes: largest request body; larger ones are refused (413) from their
            ``Content-Length`` before the body is read, or as soon as a chunked body passes
            the limit.
        max_images: most images in one request.
        max_inflight: most requests of one worker decoding and embedding images at the same
            time (the others wait): bounds memory, since each holds its decoded images.
        max_threads: the worker's handler threads (the size of its thread pool); requests
            beyond it wait without a thread. Each thread that touches a PostgreSQL gallery
            keeps one connection, so this bounds a worker's connections (plus one).
        micro_batch: embed the faces of concurrent requests in one forward pass.
        batch_max_faces: most faces in one micro-batched forward pass.
        batch_wait_ms: how long the first request of a batch waits for others (0: batch only
            the requests that queued while the model was busy — no added latency).
        liveness: a presentation-attack detector folder (``facemetric pad train --out``):
            requests may then ask for a liveness check (see ``Recognizer(liveness=...)``).
        liveness_threshold: overrides the detector's own threshold.
    """

    model: str
    gallery: str
    keys: str | None = None
    thresholds: str | None = None
    person_score: str = "max"
    min_face_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_bytes: int = 20 * 1024 * 1024
    max_images: int = 10
    max_inflight: int = 8
    max_threads: int = 16
    micro_batch: bool = False
    batch_max_faces: int = 64
    batch_wait_ms: float = 0.0
    liveness: str | None = None
    liveness_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.person_score not in ("max", "mean"):
            raise ValueError(f"person_score must be 'max' or 'mean', got {self.person_score!r}")
        for name in ("min_face_size", "max_pixels", "max_request_bytes", "max_images",
                     "max_inflight", "max_threads", "batch_max_faces"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be within 0..1000, got {self.batch_wait_ms}")

    @property
    def keys_path(self) -> Path:
        """The key file (``keys``, or beside an SQLite gallery)."""
        from facemetric.service.keys import default_keys_path

        return Path(self.keys) if self.keys is not None else default_keys_path(self.gallery)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        raw = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown service settings {unknown}; expected {sorted(names)}")
        return cls(**raw)

    @classmethod
    def from_env(cls) -> ServiceSettings:
        """The settings ``facemetric serve`` put in :data:`SETTINGS_ENV`."""
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(
                f"{SETTINGS_ENV} is not set: start the service with `facemetric serve`, or "
                f"build the app with facemetric.service.create_app(ServiceSettings(...))"
            )
        return cls.from_json(text)


def is_postgres_url(gallery: str) -> bool:
    return gallery.startswith(POSTGRES_SCHEMES)


def open_gallery(gallery: str) -> Any:
    """The :class:`~facemetric.gallery.GalleryStore` ``gallery`` names: an SQLite file
    (created if missing), or a ``postgresql://`` URL (``facemetric.gallery.postgres``).

    Raises:
        ValueError: a PostgreSQL URL while this installation has no PostgreSQL store.
    """
    if is_postgres_url(gallery):
        try:
            from facemetric.gallery.postgres import PostgresGallery  # type: ignore[import-not-found]
        except ImportError as err:
            raise ValueError(
                "a postgresql:// gallery needs facemetric's PostgreSQL store "
                f"(facemetric.gallery.postgres), which this installation cannot import ({err}); "
                "use an SQLite gallery file instead"
            ) from err
        return PostgresGallery(gallery)
    from facemetric.gallery import SQLiteGallery

    return SQLiteGallery(Path(gallery))


__all__ = ["SETTINGS_ENV", "ServiceSettings", "is_postgres_url", "open_gallery"]
