"""The gallery: the durable store of enrolled faces.

:class:`GalleryStore` is the interface (see :mod:`facemetric.gallery.store` for its
guarantees); :class:`SQLiteGallery` keeps a gallery in one SQLite file shared by threads and
processes.
"""

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
    "SQLiteGallery",
    "SchemaTooNewError",
    "Templates",
]
