"""The gallery: the durable store of enrolled faces.

:class:`GalleryStore` is the interface (see :mod:`facemetric.gallery.store` for its
guarantees); :class:`SQLiteGallery` keeps a gallery in one SQLite file shared by threads and
processes; :class:`PostgresGallery` (``pip install 'facemetric[postgres]'``, imported on first
use) keeps it in a PostgreSQL database shared by workers on many machines.
"""

from typing import Any

from facemetric.gallery.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteGallery
from facemetric.gallery.store import (
    AlreadyExistsError,
    Changes,
    Collection,
    ConcurrentChangeError,
    ContractMismatchError,
    DimensionMismatchError,
    FaceCrop,
    FaceRecord,
    GalleryBusyError,
    GalleryError,
    GalleryStore,
    InvalidInputError,
    NewFace,
    NotAGalleryError,
    NotFoundError,
    Person,
    SchemaTooNewError,
    Templates,
)

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
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
    "PostgresGallery",
    "SQLiteGallery",
    "SchemaTooNewError",
    "Templates",
]


def __getattr__(name: str) -> Any:
    """``PostgresGallery`` is imported lazily: psycopg is an optional dependency."""
    if name == "PostgresGallery":
        from facemetric.gallery.postgres import PostgresGallery

        return PostgresGallery
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
