"""The gallery in one SQLite file (stdlib :mod:`sqlite3`), shared by threads and processes.

File: an SQLite 3 database whose ``PRAGMA application_id`` is :data:`APPLICATION_ID` and
whose ``meta`` table says ``format = facemetric-gallery`` and ``schema_version``. Opening
refuses anything else (:class:`NotAGalleryError`) and a newer schema
(:class:`SchemaTooNewError`) *before* changing the file. Schema (version 1)::

    meta        (key TEXT PRIMARY KEY, value TEXT)
    collections (id INTEGER PRIMARY KEY AUTOINCREMENT, name UNIQUE, contract_json,
                 fingerprint, dim, version, log_floor, created_at, updated_at)
    persons     (id INTEGER PRIMARY KEY AUTOINCREMENT,
                 collection_id → collections ON DELETE CASCADE, name, metadata_json,
                 created_at; UNIQUE (collection_id, name))
    faces       (id INTEGER PRIMARY KEY AUTOINCREMENT,
                 (person_id, collection_id) → persons (id, collection_id) ON DELETE CASCADE,
                 template BLOB (dim float32 little-endian), landmarks_json, landmark_scheme,
                 box_left, box_top, box_right, box_bottom, source_sha256, quality, created_at)
    face_crops  (face_id PRIMARY KEY → faces ON DELETE CASCADE, png BLOB)
    changes     (collection_id → collections ON DELETE CASCADE, version, kind, item_id)

Crops live in their own table so that reading every template (an index rebuild) walks
small rows, not megabytes of PNG. ``faces.collection_id`` repeats the person's collection
(enforced by the composite foreign key) so templates and duplicate look-ups of a collection
are one index range. ``changes`` logs, per version, the faces added and removed and the
persons changed; rows at or below ``collections.log_floor`` have been dropped (log trimmed
to the last ``change_log_versions`` versions, or reset by a re-embedding). Timestamps are
UTC ISO-8601 with microseconds (``2026-05-09T07:35:25.123456+00:00``).

Durability and concurrency:

- ``journal_mode=WAL``: readers never block the writer nor each other; one writer at a
  time. WAL needs a local file system (not NFS/SMB).
- ``synchronous=FULL`` by default: each commit ``fsync``-s the WAL, so an enrolment the
  caller was told succeeded survives a power cut, not only a process crash (``NORMAL`` is
  crash-safe and consistent too but may lose the last commits on power loss). Enrolment
  speed is bounded by face detection and embedding, far slower than one ``fsync`` per
  transaction; pass ``synchronous="NORMAL"`` for bulk imports that can be redone.
- Every write is one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so
  a transaction never fails half-way because another one wrote first). While another
  process writes, SQLite's busy handler waits (``busy_timeout``); a ``database is locked``
  that still escapes is retried with exponential backoff and jitter until ``timeout``
  seconds have passed, then :class:`GalleryBusyError` is raised. Reads of several
  statements run in one deferred transaction: a consistent snapshot.
- Threads: one connection per thread (``threading.local``), opened on first use, so
  threads read in parallel; SQLite serialises their writes as it does processes'. A
  connection is never used by two threads, and never across ``fork`` (a child process
  opens its own). :meth:`SQLiteGallery.close` closes every thread's connection; call it
  once no thread uses the gallery any more.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from facemetric.gallery.store import (
    AlreadyExistsError,
    Changes,
    Collection,
    ConcurrentChangeError,
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
    as_template,
    check_collection_contract,
    check_ids,
    check_limit,
    check_name,
    check_new_faces,
    check_sha256,
    decode_cursor,
    encode_cursor,
    metadata_json,
)
from facemetric.inference.contract import ModelContract

SCHEMA_VERSION = 1
"""Schema version this module writes and reads."""

FORMAT = "facemetric-gallery"
"""Value of ``meta.format`` in every gallery."""

APPLICATION_ID = 0x464D474C
"""``PRAGMA application_id`` of a gallery file (ASCII ``FMGL``)."""

TEMPLATE_DTYPE = np.dtype("<f4")
"""How templates are stored: raw float32, little-endian, ``D * 4`` bytes."""

_SQLITE_HEADER = b"SQLite format 3\x00"
_SYNC_MODES = ("FULL", "NORMAL")
_IN_CHUNK = 500  # ids per "IN (...)" list, well under SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE collections (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    contract_json TEXT NOT NULL,
    fingerprint   TEXT NOT NULL,
    dim           INTEGER NOT NULL CHECK (dim > 0),
    version       INTEGER NOT NULL DEFAULT 0,
    log_floor     INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE TABLE persons (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    metadata_json TEXT NOT NULL DEFAULT '{}',
    created_at    TEXT NOT NULL,
    UNIQUE (collection_id, name),
    UNIQUE (id, collection_id)
);
CREATE TABLE faces (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id       INTEGER NOT NULL,
    collection_id   INTEGER NOT NULL,
    template        BLOB NOT NULL CHECK (length(template) > 0 AND length(template) % 4 = 0),
    landmarks_json  TEXT NOT NULL,
    landmark_scheme TEXT NOT NULL,
    box_left        REAL NOT NULL,
    box_top         REAL NOT NULL,
    box_right       REAL NOT NULL,
    box_bottom      REAL NOT NULL,
    source_sha256   TEXT NOT NULL,
    quality         REAL NOT NULL,
    created_at      TEXT NOT NULL,
    FOREIGN KEY (person_id, collection_id) REFERENCES persons (id, collection_id)
        ON DELETE CASCADE
);
CREATE INDEX faces_by_person ON faces (person_id, collection_id);
CREATE INDEX faces_by_collection ON faces (collection_id);
CREATE INDEX faces_by_source ON faces (collection_id, source_sha256);
CREATE TABLE face_crops (
    face_id INTEGER PRIMARY KEY REFERENCES faces (id) ON DELETE CASCADE,
    png     BLOB NOT NULL
);
CREATE TABLE changes (
    collection_id INTEGER NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    version       INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('face_added', 'face_removed', 'person_changed')),
    item_id       INTEGER NOT NULL
);
CREATE INDEX changes_by_version ON changes (collection_id, version);
"""

_T = TypeVar("_T")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _is_busy(err: sqlite3.OperationalError) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    message = str(err).lower()
    return "locked" in message or "busy" in message


def _chunks(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _IN_CHUNK):
        yield ids[start : start + _IN_CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class _Slot:
    """A thread's connection (weakly tracked, so a finished thread's connection closes)."""

    def __init__(self, conn: sqlite3.Connection, pid: int) -> None:
        self.conn = conn
        self.pid = pid


class SQLiteGallery(GalleryStore):
    """A :class:`GalleryStore` in the SQLite file ``path`` (see the module docstring).

    Args:
        path: the database file; created (with its folder) when missing and ``create``.
        create: create a new gallery when ``path`` does not exist (else
            :class:`NotFoundError`).
        timeout: seconds a transaction may wait for other writers before
            :class:`GalleryBusyError`.
        synchronous: ``"FULL"`` (default, durable across power loss) or ``"NORMAL"``.
        change_log_versions: how many versions back :meth:`changes_since` can answer
            precisely; older requests get ``complete=False`` (reload everything).

    Raises:
        NotAGalleryError: the file is not a gallery (another format or application).
        SchemaTooNewError: the gallery was written by a newer facemetric.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        timeout: float = 30.0,
        synchronous: str = "FULL",
        change_log_versions: int = 100_000,
    ) -> None:
        self._path = Path(path)
        if synchronous not in _SYNC_MODES:
            raise InvalidInputError(
                f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}"
            )
        if not timeout > 0:
            raise InvalidInputError(f"timeout must be positive seconds, got {timeout!r}")
        if change_log_versions < 1:
            raise InvalidInputError(
                f"change_log_versions must be at least 1, got {change_log_versions}"
            )
        self._timeout = float(timeout)
        self._synchronous = synchronous
        self._log_versions = int(change_log_versions)
        self._local = threading.local()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._slots_lock = threading.Lock()
        self._inherited: list[_Slot] = []
        self._closed = False
        self._check_file(create)
        try:
            self._open_schema(self._connection())
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # ------------------------------------------------------------------ connections

    def _check_file(self, create: bool) -> None:
        if self._path.is_dir():
            raise NotAGalleryError(f"{self._path} is a folder; a gallery is one SQLite file")
        if not self._path.exists():
            if not create:
                raise NotFoundError(
                    f"no gallery at {self._path}; check the path, or open it with create=True "
                    f"to make a new one"
                )
            self._path.parent.mkdir(parents=True, exist_ok=True)
            return
        with open(self._path, "rb") as handle:
            head = handle.read(len(_SQLITE_HEADER))
        if head and head != _SQLITE_HEADER:
            raise NotAGalleryError(
                f"{self._path} is not a facemetric gallery: it is not an SQLite database "
                f"(wrong file header); pass the gallery's .db file"
            )

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise GalleryError(f"the gallery {self._path} is closed; open it again")
        slot: _Slot | None = getattr(self._local, "slot", None)
        pid = os.getpid()
        if slot is not None:
            if slot.pid == pid:
                return slot.conn
            # A child process after fork: SQLite forbids using the parent's connection, and
            # closing it here could disturb the parent's locks, so it is kept, untouched,
            # for the child's lifetime.
            self._inherited.append(slot)
        conn = sqlite3.connect(
            self._path,
            timeout=min(self._timeout, 5.0),
            isolation_level=None,  # transactions are explicit
            check_same_thread=False,  # only so close() may close it from another thread
        )
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.DatabaseError as err:
            conn.close()
            raise self._not_a_gallery(err) from err
        slot = _Slot(conn, pid)
        self._local.slot = slot
        with self._slots_lock:
            self._slots.add(slot)
        return conn

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`GalleryError`."""
        self._closed = True
        with self._slots_lock:
            slots = list(self._slots)
            self._slots.clear()
        pid = os.getpid()
        for slot in slots:
            if slot.pid == pid:
                with contextlib.suppress(sqlite3.Error):
                    slot.conn.close()

    def __enter__(self) -> SQLiteGallery:
        return self

    def _not_a_gallery(self, err: sqlite3.DatabaseError) -> NotAGalleryError:
        return NotAGalleryError(
            f"{self._path} is not a facemetric gallery (SQLite says: {err}); it may be "
            f"another kind of file or damaged"
        )

    # ------------------------------------------------------------------ transactions

    def _run(self, body: Callable[[sqlite3.Connection], _T], *, write: bool) -> _T:
        """Run ``body`` in one transaction (``BEGIN IMMEDIATE`` when writing), retrying the
        whole transaction while the database is locked, until ``timeout``."""
        conn = self._connection()
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
                return result
            except sqlite3.OperationalError as err:
                if not _is_busy(err):
                    raise
                now = time.monotonic()
                if now >= deadline:
                    raise GalleryBusyError(
                        f"the gallery {self._path} stayed locked by other writers for "
                        f"{self._timeout:g} s; retry later, or open it with a larger timeout"
                    ) from err
                time.sleep(min(delay * (0.5 + random.random()), deadline - now))
                delay = min(delay * 2, 0.5)
            except sqlite3.IntegrityError as err:
                raise GalleryError(f"the gallery refused the change: {err}") from err
            except sqlite3.DatabaseError as err:
                if type(err) is not sqlite3.DatabaseError:  # e.g. ProgrammingError
                    raise
                raise self._not_a_gallery(err) from err

    # ------------------------------------------------------------------ opening

    def _open_schema(self, conn: sqlite3.Connection) -> None:
        # Look before touching: another application's database must stay unchanged.
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            if app_id == 0 and tables:
                # Another opener may have committed its initialisation between the two reads
                # (tables and application_id commit together): look at the header again.
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise self._not_a_gallery(err) from err
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise NotAGalleryError(
                f"{self._path} is an SQLite database but not a facemetric gallery "
                f"(application_id {app_id:#x}, tables {', '.join(sorted(tables)) or 'none'}); "
                f"a gallery needs a file of its own"
            )
        if app_id == 0:  # empty database: make it a gallery (WAL first, outside a transaction)
            self._run_pragma(conn, "PRAGMA journal_mode = WAL")
            self._run(self._initialise, write=True)
        self._run(self._check_meta, write=False)
        mode = self._run_pragma(conn, "PRAGMA journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise GalleryError(
                f"cannot use write-ahead logging for {self._path} (journal mode {mode}); "
                f"put the gallery on a local file system"
            )

    def _run_pragma(self, conn: sqlite3.Connection, pragma: str) -> Any:
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return conn.execute(pragma).fetchone()[0]
            except sqlite3.OperationalError as err:
                if not _is_busy(err) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01 + 0.02 * random.random())

    def _initialise(self, conn: sqlite3.Connection) -> None:
        # Another process may have initialised the file since we looked: check again.
        if conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
            return
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise NotAGalleryError(f"{self._path} gained tables of another application")
        # Statement by statement: executescript() would COMMIT the open transaction first.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)), ("created_at", _now())],
        )
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _check_meta(self, conn: sqlite3.Connection) -> None:
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as err:
            raise NotAGalleryError(
                f"{self._path} claims to be a facemetric gallery but has no meta table: {err}"
            ) from err
        if meta.get("format") != FORMAT:
            raise NotAGalleryError(
                f"{self._path} is not a facemetric gallery (meta format {meta.get('format')!r})"
            )
        try:
            version = int(meta["schema_version"])
        except (KeyError, ValueError) as err:
            raise NotAGalleryError(
                f"{self._path} has no valid schema_version in its meta table"
            ) from err
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{self._path} has gallery schema version {version}, written by a newer "
                f"facemetric; this one reads schema version {SCHEMA_VERSION}. Upgrade "
                f"facemetric to open it (nothing was changed)"
            )
        if version < 1:
            raise NotAGalleryError(f"{self._path} has an invalid schema_version {version}")

    # ------------------------------------------------------------------ row helpers

    def _collection_row(self, conn: sqlite3.Connection, name: str) -> tuple[Any, ...]:
        check_name(name, "collection")
        row = conn.execute(
            "SELECT id, name, contract_json, fingerprint, dim, version, log_floor, created_at "
            "FROM collections WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            raise NotFoundError(
                f"no collection {name!r} in {self._path}; list them with list_collections() "
                f"or create it with create_collection()"
            )
        return row

    @staticmethod
    def _collection(conn: sqlite3.Connection, row: Sequence[Any]) -> Collection:
        cid = row[0]
        persons = conn.execute(
            "SELECT count(*) FROM persons WHERE collection_id = ?", (cid,)
        ).fetchone()[0]
        faces = conn.execute(
            "SELECT count(*) FROM faces WHERE collection_id = ?", (cid,)
        ).fetchone()[0]
        return Collection(
            id=cid,
            name=row[1],
            contract=ModelContract.from_json(row[2]),
            created_at=_time(row[7]),
            version=row[5],
            person_count=persons,
            face_count=faces,
        )

    _PERSON_SELECT = (
        "SELECT p.id, c.name, p.name, p.metadata_json, p.created_at, "
        "(SELECT count(*) FROM faces f WHERE f.person_id = p.id) "
        "FROM persons p JOIN collections c ON c.id = p.collection_id "
    )

    @staticmethod
    def _person(row: Sequence[Any]) -> Person:
        return Person(
            id=row[0],
            collection=row[1],
            name=row[2],
            metadata=json.loads(row[3]),
            created_at=_time(row[4]),
            face_count=row[5],
        )

    def _person_row(self, conn: sqlite3.Connection, cid: int, cname: str, name: str) -> Any:
        check_name(name, "person")
        row = conn.execute(
            self._PERSON_SELECT + "WHERE p.collection_id = ? AND p.name = ?", (cid, name)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no person {name!r} in collection {cname!r}")
        return row

    def _template(self, blob: bytes, dim: int, face_id: int) -> np.ndarray:
        if len(blob) != dim * TEMPLATE_DTYPE.itemsize:
            raise GalleryError(
                f"face {face_id} in {self._path} has a {len(blob)}-byte template where "
                f"{dim} float32 values were expected: the database is damaged"
            )
        array = np.frombuffer(blob, dtype=TEMPLATE_DTYPE).astype(np.float32)
        array.setflags(write=False)
        return array

    def _bump(self, conn: sqlite3.Connection, cid: int) -> int:
        """Increment the collection's version; trim the change log to its window."""
        version, floor = conn.execute(
            "SELECT version + 1, log_floor FROM collections WHERE id = ?", (cid,)
        ).fetchone()
        conn.execute(
            "UPDATE collections SET version = ?, updated_at = ? WHERE id = ?",
            (version, _now(), cid),
        )
        if version - floor > self._log_versions:
            floor = version - self._log_versions
            conn.execute(
                "DELETE FROM changes WHERE collection_id = ? AND version <= ?", (cid, floor)
            )
            conn.execute("UPDATE collections SET log_floor = ? WHERE id = ?", (floor, cid))
        return version

    @staticmethod
    def _log(
        conn: sqlite3.Connection, cid: int, version: int, kind: str, ids: Sequence[int]
    ) -> None:
        conn.executemany(
            "INSERT INTO changes (collection_id, version, kind, item_id) VALUES (?, ?, ?, ?)",
            [(cid, version, kind, i) for i in ids],
        )

    # ------------------------------------------------------------------ collections

    def create_collection(self, name: str, contract: ModelContract) -> Collection:
        check_name(name, "collection")
        if not isinstance(contract, ModelContract):
            raise InvalidInputError(
                f"contract must be a ModelContract (encoder.contract), got "
                f"{type(contract).__name__}"
            )

        def body(conn: sqlite3.Connection) -> Collection:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
                raise AlreadyExistsError(
                    f"collection {name!r} already exists in {self._path}; choose another name "
                    f"or delete it first"
                )
            now = _now()
            conn.execute(
                "INSERT INTO collections (name, contract_json, fingerprint, dim, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    name,
                    contract.to_json(),
                    contract.fingerprint(),
                    contract.embedding_size,
                    now,
                    now,
                ),
            )
            return self._collection(conn, self._collection_row(conn, name))

        return self._run(body, write=True)

    def get_collection(self, name: str) -> Collection:
        return self._run(
            lambda conn: self._collection(conn, self._collection_row(conn, name)), write=False
        )

    def list_collections(self) -> list[Collection]:
        def body(conn: sqlite3.Connection) -> list[Collection]:
            rows = conn.execute(
                "SELECT id, name, contract_json, fingerprint, dim, version, log_floor, "
                "created_at FROM collections ORDER BY name"
            ).fetchall()
            return [self._collection(conn, row) for row in rows]

        return self._run(body, write=False)

    def delete_collection(self, name: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            cid = self._collection_row(conn, name)[0]
            conn.execute("DELETE FROM collections WHERE id = ?", (cid,))

        self._run(body, write=True)

    # ------------------------------------------------------------------ persons

    def add_person(
        self, collection: str, name: str, metadata: Mapping[str, Any] | None = None
    ) -> Person:
        check_name(name, "person")
        meta = metadata_json(metadata)

        def body(conn: sqlite3.Connection) -> Person:
            cid = self._collection_row(conn, collection)[0]
            if conn.execute(
                "SELECT 1 FROM persons WHERE collection_id = ? AND name = ?", (cid, name)
            ).fetchone():
                raise AlreadyExistsError(
                    f"person {name!r} already exists in collection {collection!r}; add faces "
                    f"to it with add_faces() or choose another name"
                )
            pid = self._insert_person(conn, cid, name, meta)
            self._log(conn, cid, self._bump(conn, cid), "person_changed", [pid])
            return self._person(self._person_row(conn, cid, collection, name))

        return self._run(body, write=True)

    def _insert_person(self, conn: sqlite3.Connection, cid: int, name: str, meta: str) -> int:
        cursor = conn.execute(
            "INSERT INTO persons (collection_id, name, metadata_json, created_at) "
            "VALUES (?, ?, ?, ?)",
            (cid, name, meta, _now()),
        )
        return int(cursor.lastrowid or 0)

    def get_person(self, collection: str, name: str) -> Person:
        def body(conn: sqlite3.Connection) -> Person:
            cid = self._collection_row(conn, collection)[0]
            return self._person(self._person_row(conn, cid, collection, name))

        return self._run(body, write=False)

    def list_persons(
        self, collection: str, after: str | None = None, limit: int = 100
    ) -> tuple[list[Person], str | None]:
        check_limit(limit)
        last = None if after is None else decode_cursor(after)

        def body(conn: sqlite3.Connection) -> tuple[list[Person], str | None]:
            cid = self._collection_row(conn, collection)[0]
            where, args = "WHERE p.collection_id = ? ", [cid]
            if last is not None:
                where += "AND p.name > ? "
                args.append(last)
            rows = conn.execute(
                self._PERSON_SELECT + where + "ORDER BY p.name LIMIT ?", (*args, limit + 1)
            ).fetchall()
            persons = [self._person(row) for row in rows[:limit]]
            more = len(rows) > limit
            return persons, encode_cursor(persons[-1].name) if more else None

        return self._run(body, write=False)

    def rename_person(self, collection: str, name: str, new_name: str) -> Person:
        check_name(new_name, "person")

        def body(conn: sqlite3.Connection) -> Person:
            cid = self._collection_row(conn, collection)[0]
            pid = self._person_row(conn, cid, collection, name)[0]
            if new_name != name:
                if conn.execute(
                    "SELECT 1 FROM persons WHERE collection_id = ? AND name = ?", (cid, new_name)
                ).fetchone():
                    raise AlreadyExistsError(
                        f"cannot rename {name!r}: person {new_name!r} already exists in "
                        f"collection {collection!r}"
                    )
                conn.execute("UPDATE persons SET name = ? WHERE id = ?", (new_name, pid))
                self._log(conn, cid, self._bump(conn, cid), "person_changed", [pid])
            return self._person(self._person_row(conn, cid, collection, new_name))

        return self._run(body, write=True)

    def delete_person(self, collection: str, name: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            cid = self._collection_row(conn, collection)[0]
            pid = self._person_row(conn, cid, collection, name)[0]
            face_ids = [
                r[0] for r in conn.execute("SELECT id FROM faces WHERE person_id = ?", (pid,))
            ]
            conn.execute("DELETE FROM persons WHERE id = ?", (pid,))
            version = self._bump(conn, cid)
            self._log(conn, cid, version, "face_removed", face_ids)
            self._log(conn, cid, version, "person_changed", [pid])

        self._run(body, write=True)

    # ------------------------------------------------------------------ faces

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
        faces = check_new_faces(person_name, faces, contract)
        meta = metadata_json(metadata)
        blobs = [face.template.astype(TEMPLATE_DTYPE).tobytes() for face in faces]

        def body(conn: sqlite3.Connection) -> list[int]:
            row = self._collection_row(conn, collection)
            cid = row[0]
            check_collection_contract(row[1], row[2], row[3], contract)
            found = conn.execute(
                "SELECT id FROM persons WHERE collection_id = ? AND name = ?", (cid, person_name)
            ).fetchone()
            created = []
            if found is not None:
                pid = found[0]
            elif create_person:
                pid = self._insert_person(conn, cid, person_name, meta)
                created.append(pid)
            else:
                raise NotFoundError(
                    f"no person {person_name!r} in collection {collection!r}; create it with "
                    f"add_person() or pass create_person=True"
                )
            now = _now()
            ids = []
            for face, blob in zip(faces, blobs, strict=True):
                cursor = conn.execute(
                    "INSERT INTO faces (person_id, collection_id, template, landmarks_json, "
                    "landmark_scheme, box_left, box_top, box_right, box_bottom, source_sha256, "
                    "quality, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        pid,
                        cid,
                        blob,
                        json.dumps([list(p) for p in face.landmarks]),
                        face.landmark_scheme,
                        *face.box,
                        face.source_sha256,
                        face.quality,
                        now,
                    ),
                )
                face_id = int(cursor.lastrowid or 0)
                conn.execute(
                    "INSERT INTO face_crops (face_id, png) VALUES (?, ?)", (face_id, face.crop)
                )
                ids.append(face_id)
            version = self._bump(conn, cid)
            self._log(conn, cid, version, "person_changed", created)
            self._log(conn, cid, version, "face_added", ids)
            return ids

        return self._run(body, write=True)

    def faces(self, collection: str, person_name: str) -> list[FaceRecord]:
        def body(conn: sqlite3.Connection) -> list[FaceRecord]:
            row = self._collection_row(conn, collection)
            pid = self._person_row(conn, row[0], collection, person_name)[0]
            rows = conn.execute(
                "SELECT f.id, f.person_id, f.template, c.png, f.landmarks_json, "
                "f.landmark_scheme, f.box_left, f.box_top, f.box_right, f.box_bottom, "
                "f.source_sha256, f.quality, f.created_at "
                "FROM faces f JOIN face_crops c ON c.face_id = f.id "
                "WHERE f.person_id = ? ORDER BY f.id",
                (pid,),
            ).fetchall()
            return [
                FaceRecord(
                    id=r[0],
                    person_id=r[1],
                    template=self._template(r[2], row[4], r[0]),
                    crop=bytes(r[3]),
                    landmarks=tuple((float(x), float(y)) for x, y in json.loads(r[4])),
                    landmark_scheme=r[5],
                    box=(r[6], r[7], r[8], r[9]),
                    source_sha256=r[10],
                    quality=r[11],
                    created_at=_time(r[12]),
                )
                for r in rows
            ]

        return self._run(body, write=False)

    def find_source(self, collection: str, source_sha256: str) -> list[tuple[int, Person]]:
        sha = check_sha256(source_sha256)

        def body(conn: sqlite3.Connection) -> list[tuple[int, Person]]:
            cid = self._collection_row(conn, collection)[0]
            hits = conn.execute(
                "SELECT id, person_id FROM faces WHERE collection_id = ? AND source_sha256 = ? "
                "ORDER BY id",
                (cid, sha),
            ).fetchall()
            persons: dict[int, Person] = {}
            for _, pid in hits:
                if pid not in persons:
                    persons[pid] = self._person(
                        conn.execute(self._PERSON_SELECT + "WHERE p.id = ?", (pid,)).fetchone()
                    )
            return [(face_id, persons[pid]) for face_id, pid in hits]

        return self._run(body, write=False)

    def remove_faces(self, collection: str, face_ids: Sequence[int]) -> None:
        ids = check_ids(face_ids, "face")
        if not ids:
            return

        def body(conn: sqlite3.Connection) -> None:
            cid = self._collection_row(conn, collection)[0]
            found: set[int] = set()
            for chunk in _chunks(ids):
                found.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM faces WHERE collection_id = ? AND id IN "
                        f"({_marks(len(chunk))})",
                        (cid, *chunk),
                    )
                )
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError(
                    f"faces {missing[:20]}{' ...' if len(missing) > 20 else ''} are not in "
                    f"collection {collection!r} (removed already, or of another collection); "
                    f"nothing was removed"
                )
            for chunk in _chunks(ids):
                conn.execute(f"DELETE FROM faces WHERE id IN ({_marks(len(chunk))})", tuple(chunk))
            self._log(conn, cid, self._bump(conn, cid), "face_removed", ids)

        self._run(body, write=True)

    def templates(self, collection: str, face_ids: Sequence[int] | None = None) -> Templates:
        wanted = None if face_ids is None else check_ids(face_ids, "face")

        def body(conn: sqlite3.Connection) -> Templates:
            row = self._collection_row(conn, collection)
            cid, dim = row[0], row[4]
            if wanted is None:
                n = conn.execute(
                    "SELECT count(*) FROM faces WHERE collection_id = ?", (cid,)
                ).fetchone()[0]
                queries: list[tuple[str, tuple[Any, ...]]] = [
                    (
                        "SELECT id, person_id, template FROM faces WHERE collection_id = ? "
                        "ORDER BY id",
                        (cid,),
                    )
                ]
            else:
                n = len(wanted)  # an upper bound; absent ids are dropped below
                queries = [
                    (
                        f"SELECT id, person_id, template FROM faces WHERE collection_id = ? "
                        f"AND id IN ({_marks(len(chunk))}) ORDER BY id",
                        (cid, *chunk),
                    )
                    for chunk in _chunks(wanted)
                ]
            face_arr = np.empty(n, dtype=np.int64)
            person_arr = np.empty(n, dtype=np.int64)
            matrix = np.empty((n, dim), dtype=np.float32)
            i = 0
            for sql, args in queries:
                cursor = conn.execute(sql, args)
                while rows := cursor.fetchmany(1024):
                    for face_id, pid, blob in rows:
                        matrix[i] = self._template(blob, dim, face_id)
                        face_arr[i], person_arr[i] = face_id, pid
                        i += 1
            face_arr, person_arr, matrix = face_arr[:i], person_arr[:i], matrix[:i]
            for array in (face_arr, person_arr, matrix):
                array.setflags(write=False)
            return Templates(cid, row[5], row[3], face_arr, person_arr, matrix)

        return self._run(body, write=False)

    def iter_crops(self, collection: str, batch_size: int = 256) -> Iterator[FaceCrop]:
        check_limit(batch_size)
        last = 0
        while True:

            def body(conn: sqlite3.Connection, after: int = last) -> list[FaceCrop]:
                cid = self._collection_row(conn, collection)[0]
                rows = conn.execute(
                    "SELECT f.id, f.person_id, c.png, f.landmarks_json, f.landmark_scheme "
                    "FROM faces f JOIN face_crops c ON c.face_id = f.id "
                    "WHERE f.collection_id = ? AND f.id > ? ORDER BY f.id LIMIT ?",
                    (cid, after, batch_size),
                ).fetchall()
                return [
                    FaceCrop(
                        face_id=r[0],
                        person_id=r[1],
                        crop=bytes(r[2]),
                        landmarks=tuple((float(x), float(y)) for x, y in json.loads(r[3])),
                        landmark_scheme=r[4],
                    )
                    for r in rows
                ]

            batch = self._run(body, write=False)
            yield from batch
            if len(batch) < batch_size:
                return
            last = batch[-1].face_id

    def replace_templates(
        self,
        collection: str,
        contract: ModelContract,
        templates: Mapping[int, np.ndarray],
    ) -> Collection:
        if not isinstance(contract, ModelContract):
            raise InvalidInputError(
                f"contract must be the new encoder's ModelContract, got {type(contract).__name__}"
            )
        size = contract.embedding_size
        blobs: dict[int, bytes] = {}
        for face_id in check_ids(list(templates), "face"):
            template = as_template(templates[face_id], f"the new template of face {face_id}")
            if template.shape != (size,):
                raise DimensionMismatchError(
                    f"the new template of face {face_id} has {template.shape[0]} values but "
                    f"the new contract ({contract.backbone}) makes D={size}"
                )
            blobs[face_id] = template.astype(TEMPLATE_DTYPE).tobytes()

        def body(conn: sqlite3.Connection) -> Collection:
            cid = self._collection_row(conn, collection)[0]
            present = {
                r[0] for r in conn.execute("SELECT id FROM faces WHERE collection_id = ?", (cid,))
            }
            missing = sorted(present - blobs.keys())
            extra = sorted(blobs.keys() - present)
            if missing or extra:
                raise ConcurrentChangeError(
                    f"the new templates do not cover collection {collection!r} exactly: "
                    f"{len(missing)} faces have none (e.g. {missing[:10]}: added after the "
                    f"crops were read?) and {len(extra)} are not in it (e.g. {extra[:10]}: "
                    f"removed meanwhile?); embed the current faces (iter_crops) and call "
                    f"again. Nothing was changed"
                )
            conn.executemany(
                "UPDATE faces SET template = ? WHERE id = ?",
                [(blob, face_id) for face_id, blob in blobs.items()],
            )
            version = self._bump(conn, cid)
            conn.execute(
                "UPDATE collections SET contract_json = ?, fingerprint = ?, dim = ?, "
                "log_floor = ? WHERE id = ?",
                (contract.to_json(), contract.fingerprint(), size, version, cid),
            )
            conn.execute("DELETE FROM changes WHERE collection_id = ?", (cid,))
            return self._collection(conn, self._collection_row(conn, collection))

        return self._run(body, write=True)

    # ------------------------------------------------------------------ change tracking

    def version(self, collection: str) -> int:
        return self._run(lambda conn: self._collection_row(conn, collection)[5], write=False)

    def changes_since(self, collection: str, version: int) -> Changes:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidInputError(f"version must be a non-negative int, got {version!r}")

        def body(conn: sqlite3.Connection) -> Changes:
            row = self._collection_row(conn, collection)
            cid, current, floor = row[0], row[5], row[6]
            if version > current:
                raise InvalidInputError(
                    f"version {version} is newer than collection {collection!r}'s ({current}): "
                    f"it was probably deleted and created again; reload it with templates()"
                )
            if version < floor:
                return Changes(cid, version, current, complete=False)
            added: set[int] = set()
            removed: set[int] = set()
            persons: set[int] = set()
            for kind, item in conn.execute(
                "SELECT kind, item_id FROM changes WHERE collection_id = ? AND version > ?",
                (cid, version),
            ):
                if kind == "face_added":
                    added.add(item)
                elif kind == "face_removed":
                    removed.add(item)
                else:
                    persons.add(item)
            both = added & removed  # came and went after `version`: never seen by the caller
            return Changes(
                cid,
                version,
                current,
                complete=True,
                added=tuple(sorted(added - both)),
                removed=tuple(sorted(removed - both)),
                persons=tuple(sorted(persons)),
            )

        return self._run(body, write=False)

    # ------------------------------------------------------------------ maintenance

    def check(self) -> None:
        """Run SQLite's ``integrity_check`` and ``foreign_key_check``; raise
        :class:`GalleryError` listing the problems, if any."""

        def body(conn: sqlite3.Connection) -> list[str]:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if problems == ["ok"]:
                problems = []
            problems += [
                f"row {r[1]} of {r[0]} points to a missing {r[2]}"
                for r in conn.execute("PRAGMA foreign_key_check")
            ]
            return problems

        problems = self._run(body, write=False)
        if problems:
            raise GalleryError(
                f"{self._path} is damaged: {'; '.join(problems[:10])}; restore it from a backup"
            )


__all__ = ["APPLICATION_ID", "FORMAT", "SCHEMA_VERSION", "TEMPLATE_DTYPE", "SQLiteGallery"]
