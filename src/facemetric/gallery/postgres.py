"""The gallery in a PostgreSQL database (psycopg 3), shared by many workers on many machines.

Install with ``pip install 'facemetric[postgres]'``. ``PostgresGallery(dsn)`` takes a libpq
connection string or URI (``"postgresql://app@db.example/faces"``,
``"host=/run/postgresql dbname=faces"``); the database must exist and be ``UTF8``.

Layout: the gallery owns one PostgreSQL *schema* (namespace; ``schema="public"`` by default)
whose ``meta`` table says ``format = facemetric-gallery`` and ``schema_version``. Opening
looks before it touches: a schema holding other tables and no gallery ``meta`` is refused
(:class:`NotAGalleryError`), a newer schema version too (:class:`SchemaTooNewError`); an
empty (or missing) schema is made a gallery when ``create=True`` — under an advisory lock,
so many workers may open a fresh database at once. Schema (version 1), the SQLite store's
shape in PostgreSQL types::

    meta        (key text PRIMARY KEY, value text)
    collections (id bigint IDENTITY, name text COLLATE "C" UNIQUE, contract_json text,
                 fingerprint text, dim int, version bigint, log_floor bigint,
                 created_at timestamptz, updated_at timestamptz)
    persons     (id bigint IDENTITY, collection_id → collections ON DELETE CASCADE,
                 name text COLLATE "C", metadata jsonb, created_at timestamptz;
                 UNIQUE (collection_id, name), UNIQUE (id, collection_id))
    faces       (id bigint IDENTITY,
                 (person_id, collection_id) → persons (id, collection_id) ON DELETE CASCADE,
                 template bytea (dim float32 little-endian; STORAGE MAIN: kept in the row),
                 landmarks float8[n][2], landmark_scheme text, box_left, box_top, box_right,
                 box_bottom float8, source_sha256 text, quality float8, created_at timestamptz)
    face_crops  (face_id PRIMARY KEY → faces ON DELETE CASCADE,
                 png bytea STORAGE EXTERNAL: PNG is compressed already, never recompressed)
    changes     (collection_id → collections ON DELETE CASCADE, version bigint, kind text,
                 item_id bigint)

Ids come from ``GENERATED ALWAYS AS IDENTITY`` sequences: never reused, even after deletes
or rolled-back transactions (which leave gaps). Names use the ``"C"`` collation, so persons
are listed in code-point order whatever the database's locale. Timestamps are server time,
returned in UTC.

Concurrency (many processes, many machines):

- Every write is one ``READ COMMITTED`` transaction that first locks its collection's row
  (``SELECT … FOR UPDATE``). Writes to one collection are therefore serialised: the
  version is incremented under the lock and the lock is released at commit, so versions
  commit in order and a snapshot that shows version ``v`` shows every version below it with
  its change-log rows — readers never see a gap or an interleaving. Writes to different
  collections run in parallel. Look-ups made after taking the lock (does the person exist?
  which faces does the collection hold?) see every earlier commit, so two workers enrolling
  the same new person never create it twice.
- A writer waits for the lock at most ``timeout`` seconds (``lock_timeout``), then
  :class:`GalleryBusyError`. Serialization failures and deadlocks are retried with
  exponential backoff and jitter until ``timeout``.
- Reads of several statements run in one ``REPEATABLE READ READ ONLY`` transaction: one
  consistent snapshot. :meth:`~PostgresGallery.version` is a single statement.
- A writer killed mid-transaction (``kill -9``, a crash, a lost machine) leaves nothing:
  the server rolls its transaction back when the connection drops. A writer that hangs
  inside a transaction is cut off by the server after ``idle_in_transaction_timeout``
  seconds; TCP keepalives detect a vanished machine.
- Every write sends ``NOTIFY facemetric_gallery`` at commit;
  :meth:`~PostgresGallery.wait_for_change` blocks on it, so a worker can follow changes
  without polling.
- Connections: one per thread (``threading.local``), opened on first use, so threads read
  in parallel; never shared across ``fork`` (a child opens its own and leaves the parent's
  untouched). A connection that breaks (server restart, ``pg_terminate_backend``) is
  replaced: a read is retried on a new connection; a write is retried only when it cannot
  have been committed — if the connection broke *during* ``COMMIT`` the outcome is unknown
  and :class:`GalleryError` says so. Session settings (``search_path``, ``lock_timeout`` …)
  are per connection, so a pooler in front must use session pooling.

Staleness: a recognizer reads :meth:`~PostgresGallery.version` before every search and
applies :meth:`~PostgresGallery.changes_since`, so an enrolment through one worker is
identifiable through every other worker for any search that starts after the enrolment's
``add_faces`` returned (bound 0, at the price of one ``SELECT`` per search).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "PostgresGallery needs psycopg 3: pip install 'facemetric[postgres]' "
        "(or pip install 'psycopg[binary]>=3.2')"
    ) from _err

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

TEMPLATE_DTYPE = np.dtype("<f4")
"""How templates are stored: raw float32, little-endian, ``D * 4`` bytes."""

NOTIFY_CHANNEL = "facemetric_gallery"
"""The channel every write notifies at commit. The payload is JSON:
``{"schema": ..., "collection_id": ..., "version": ...}`` (``version`` −1 when the
collection was deleted)."""

GALLERY_TABLES = ("meta", "collections", "persons", "faces", "face_crops", "changes")

_UPDATE_CHUNK = 4096  # templates per UPDATE of a re-embedding
_FETCH = 2048  # rows per fetch of a bulk read

_SCHEMA = """
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE collections (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text COLLATE "C" NOT NULL UNIQUE,
    contract_json text NOT NULL,
    fingerprint   text NOT NULL,
    dim           integer NOT NULL CHECK (dim > 0),
    version       bigint NOT NULL DEFAULT 0,
    log_floor     bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE persons (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection_id bigint NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    name          text COLLATE "C" NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (collection_id, name),
    UNIQUE (id, collection_id)
);
CREATE TABLE faces (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id       bigint NOT NULL,
    collection_id   bigint NOT NULL,
    template        bytea NOT NULL
        CHECK (octet_length(template) > 0 AND octet_length(template) % 4 = 0),
    landmarks       double precision[] NOT NULL
        CHECK (array_ndims(landmarks) = 2 AND array_length(landmarks, 2) = 2),
    landmark_scheme text NOT NULL,
    box_left        double precision NOT NULL,
    box_top         double precision NOT NULL,
    box_right       double precision NOT NULL,
    box_bottom      double precision NOT NULL,
    source_sha256   text NOT NULL CHECK (source_sha256 ~ '^[0-9a-f]{64}$'),
    quality         double precision NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (person_id, collection_id) REFERENCES persons (id, collection_id)
        ON DELETE CASCADE
);
ALTER TABLE faces ALTER COLUMN template SET STORAGE MAIN;
CREATE INDEX faces_by_person ON faces (person_id, collection_id);
CREATE INDEX faces_by_collection ON faces (collection_id, id);
CREATE INDEX faces_by_source ON faces (collection_id, source_sha256);
CREATE TABLE face_crops (
    face_id bigint PRIMARY KEY REFERENCES faces (id) ON DELETE CASCADE,
    png     bytea NOT NULL
);
ALTER TABLE face_crops ALTER COLUMN png SET STORAGE EXTERNAL;
CREATE TABLE changes (
    collection_id bigint NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    version       bigint NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('face_added', 'face_removed', 'person_changed')),
    item_id       bigint NOT NULL
);
CREATE INDEX changes_by_version ON changes (collection_id, version);
"""

_COLLECTION_COLUMNS = (
    "id, name, contract_json, fingerprint, dim, version, log_floor, created_at"
)

_PERSON_SELECT = (
    "SELECT p.id, c.name, p.name, p.metadata, p.created_at, "
    "(SELECT count(*) FROM faces f WHERE f.person_id = p.id) "
    "FROM persons p JOIN collections c ON c.id = p.collection_id "
)

_T = TypeVar("_T")

# How a transaction runs: one statement outside a transaction, a consistent read, a write.
_SINGLE, _READ, _WRITE = "single", "read", "write"
_BEGIN = {
    _READ: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    _WRITE: "BEGIN ISOLATION LEVEL READ COMMITTED",
}


class _Slot:
    """A thread's connection (weakly tracked, so a finished thread's connection closes)."""

    def __init__(self, conn: psycopg.Connection[Any], pid: int) -> None:
        self.conn = conn
        self.pid = pid


def _close_if_owner(conn: psycopg.Connection[Any], pid: int) -> None:
    # Closing a connection sends "terminate" on its socket: from a forked child that would
    # end the *parent's* session, so only the process that opened it may close it.
    if os.getpid() == pid:
        with contextlib.suppress(Exception):
            conn.close()


def _describe(conninfo: str) -> str:
    """``dbname on host:port`` for messages — never the password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "the PostgreSQL database"
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "local"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or "(default)"
    return f"database {dbname!s} on {host!s}:{port!s}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _landmarks(value: Any) -> tuple[tuple[float, float], ...]:
    return tuple((float(x), float(y)) for x, y in value)


class PostgresGallery(GalleryStore):
    """A :class:`GalleryStore` in a PostgreSQL database (see the module docstring).

    Args:
        dsn: libpq connection string or URI of an existing ``UTF8`` database.
        schema: the PostgreSQL schema (namespace) holding the gallery's tables; created
            when missing and ``create``. One database may hold several galleries in
            several schemas, or a gallery next to other applications' schemas.
        create: make an empty schema a gallery (else :class:`NotFoundError`).
        timeout: seconds a write may wait for other writers of its collection before
            :class:`GalleryBusyError`; also the retry budget of serialization failures.
        change_log_versions: how many versions back :meth:`changes_since` can answer
            precisely; older requests get ``complete=False`` (reload everything).
        connect_timeout: seconds to wait for a new connection (libpq ``connect_timeout``,
            unless the DSN sets one).
        idle_in_transaction_timeout: seconds the server lets one of this store's
            connections sit idle inside a transaction before ending its session (and
            releasing its locks) — the bound on how long a hung writer can block the others.
        application_name: shown in ``pg_stat_activity`` (unless the DSN sets one).

    Raises:
        NotAGalleryError: the schema holds tables that are not a gallery.
        SchemaTooNewError: the gallery was written by a newer facemetric.
        NotFoundError: the database does not exist, or the schema holds no gallery and
            ``create`` is false.
        GalleryError: the server cannot be reached, refuses the login, or the database is
            not ``UTF8``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        create: bool = True,
        timeout: float = 30.0,
        change_log_versions: int = 100_000,
        connect_timeout: float = 10.0,
        idle_in_transaction_timeout: float = 60.0,
        application_name: str = "facemetric",
    ) -> None:
        if not isinstance(dsn, str):
            raise InvalidInputError(
                f"dsn must be a libpq connection string or URI, got {type(dsn).__name__}"
            )
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as err:
            raise InvalidInputError(
                f"invalid PostgreSQL connection string: {_first_line(err)}; pass e.g. "
                f"'postgresql://user@host/dbname' or 'host=... dbname=...'"
            ) from err
        if not isinstance(schema, str) or not schema or len(schema) > 63 or "\x00" in schema:
            raise InvalidInputError(
                f"schema must name a PostgreSQL schema (1 to 63 characters), got {schema!r}"
            )
        if not timeout > 0:
            raise InvalidInputError(f"timeout must be positive seconds, got {timeout!r}")
        if not idle_in_transaction_timeout > 0:
            raise InvalidInputError(
                f"idle_in_transaction_timeout must be positive seconds, got "
                f"{idle_in_transaction_timeout!r}"
            )
        if change_log_versions < 1:
            raise InvalidInputError(
                f"change_log_versions must be at least 1, got {change_log_versions}"
            )
        self._dsn = dsn
        self._where = _describe(dsn)
        self._schema = schema
        self._timeout = float(timeout)
        self._idle_timeout = float(idle_in_transaction_timeout)
        self._log_versions = int(change_log_versions)
        self._connect_args: dict[str, Any] = {}
        if "connect_timeout" not in params:
            self._connect_args["connect_timeout"] = max(2, round(connect_timeout))
        if "application_name" not in params:
            self._connect_args["application_name"] = application_name
        if "keepalives" not in params:  # notice a vanished server (ignored on unix sockets)
            self._connect_args.update(
                keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3
            )
        self._local = threading.local()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._slots_lock = threading.Lock()
        self._inherited: list[_Slot] = []
        self._closed = False
        try:
            self._open_schema(create)
        except BaseException:
            self.close()
            raise

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the gallery."""
        return self._schema

    @property
    def where(self) -> str:
        """``database NAME on HOST:PORT`` (no credentials), as used in messages."""
        return self._where

    # ------------------------------------------------------------------ connections

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, **self._connect_args)
        except psycopg.OperationalError as err:
            text = str(err)
            if "does not exist" in text and "database" in text:
                raise NotFoundError(
                    f"no {self._where}: create it first (createdb, or CREATE DATABASE ... "
                    f"ENCODING 'UTF8'); PostgresGallery creates tables, not databases"
                ) from err
            if "too many clients" in text or "remaining connection slots" in text:
                raise GalleryBusyError(
                    f"{self._where} has no free connection slot ({_first_line(err)}); "
                    f"retry later, raise max_connections or use fewer threads/workers"
                ) from err
            raise GalleryError(
                f"cannot connect to {self._where}: {_first_line(err)}; check the DSN, that "
                f"the server runs and accepts this user"
            ) from err
        try:
            conn.execute(
                sql.SQL(
                    "SET search_path TO {schema}; SET TimeZone TO 'UTC'; "
                    "SET client_encoding TO 'UTF8'; SET lock_timeout TO {lock}; "
                    "SET idle_in_transaction_session_timeout TO {idle}"
                ).format(
                    schema=sql.Identifier(self._schema),
                    lock=sql.Literal(max(1, round(self._timeout * 1000))),
                    idle=sql.Literal(max(1, round(self._idle_timeout * 1000))),
                )
            )
        except BaseException:
            _close_if_owner(conn, os.getpid())
            raise
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise GalleryError(f"the gallery in {self._where} is closed; open it again")
        slot: _Slot | None = getattr(self._local, "slot", None)
        pid = os.getpid()
        if slot is not None:
            if slot.pid == pid and not slot.conn.closed:
                if slot.conn.info.transaction_status == TransactionStatus.IDLE:
                    return slot.conn
                # Left inside a transaction (an interrupt during ROLLBACK): end it, so the
                # next BEGIN never continues a stale transaction; replace it if that fails.
                try:
                    slot.conn.execute("ROLLBACK")
                    return slot.conn
                except psycopg.Error:
                    self._drop_connection(slot.conn)
                    slot = None
            elif slot.pid != pid:
                # A child process after fork: the parent's connection is kept, untouched,
                # for the child's lifetime (closing it would end the parent's session).
                self._inherited.append(slot)
        conn = self._connect()
        slot = _Slot(conn, pid)
        weakref.finalize(slot, _close_if_owner, conn, pid)
        self._local.slot = slot
        with self._slots_lock:
            self._slots.add(slot)
        return conn

    def _drop_connection(self, conn: psycopg.Connection[Any]) -> None:
        """Forget this thread's connection (it broke); the next call opens a new one."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is not None and slot.conn is conn:
            self._local.slot = None
            with self._slots_lock:
                self._slots.discard(slot)
        _close_if_owner(conn, os.getpid())

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`GalleryError`.
        Idempotent."""
        self._closed = True
        with self._slots_lock:
            slots = list(self._slots)
            self._slots.clear()
        for slot in slots:
            _close_if_owner(slot.conn, slot.pid)

    def __enter__(self) -> PostgresGallery:
        return self

    # ------------------------------------------------------------------ transactions

    def _run(self, body: Callable[[psycopg.Connection[Any]], _T], *, mode: str) -> _T:
        """Run ``body`` as one transaction of ``mode`` (:data:`_READ`, :data:`_WRITE`) or
        as a bare statement (:data:`_SINGLE`), mapping PostgreSQL's errors to the gallery's
        and retrying what is safe to retry until ``timeout``."""
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        reconnects = 0
        while True:
            conn = self._connection()
            committing = False
            try:
                if mode == _SINGLE:
                    return body(conn)
                conn.execute(_BEGIN[mode])
                try:
                    result = body(conn)
                    committing = True
                    conn.execute("COMMIT")
                except BaseException:
                    if not conn.closed and not committing:
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
                return result
            except pg_errors.LockNotAvailable as err:
                raise GalleryBusyError(
                    f"the gallery in {self._where} stayed locked by other writers for "
                    f"{self._timeout:g} s; retry later, or open it with a larger timeout"
                ) from err
            except (pg_errors.SerializationFailure, pg_errors.DeadlockDetected) as err:
                now = time.monotonic()
                if now >= deadline:
                    raise GalleryBusyError(
                        f"the gallery in {self._where} kept conflicting with other writers "
                        f"for {self._timeout:g} s ({_first_line(err)}); retry later"
                    ) from err
                time.sleep(min(delay * (0.5 + random.random()), deadline - now))
                delay = min(delay * 2, 0.5)
            except psycopg.OperationalError as err:
                if not (conn.broken or conn.closed):
                    raise GalleryError(
                        f"{self._where} refused the operation: {_first_line(err)}"
                    ) from err
                self._drop_connection(conn)
                if committing and mode == _WRITE:
                    raise GalleryError(
                        f"the connection to {self._where} broke while committing "
                        f"({_first_line(err)}): the change may or may not have been applied; "
                        f"read the gallery to find out before you retry"
                    ) from err
                reconnects += 1
                if reconnects > 2 or time.monotonic() >= deadline:
                    raise GalleryError(
                        f"lost the connection to {self._where} ({_first_line(err)}); nothing "
                        f"was changed by this call. Check the server and retry"
                    ) from err
            except (pg_errors.UndefinedTable, pg_errors.UndefinedColumn) as err:
                raise NotAGalleryError(
                    f"the gallery's tables in schema {self._schema!r} of {self._where} are "
                    f"missing or altered ({_first_line(err)}); it was dropped or damaged"
                ) from err
            except pg_errors.InsufficientPrivilege as err:
                raise GalleryError(
                    f"{self._where} denies this user access to the gallery: "
                    f"{_first_line(err)}; grant it the privileges on schema {self._schema!r}"
                ) from err
            except psycopg.DataError as err:
                raise InvalidInputError(
                    f"PostgreSQL cannot store a value: {_first_line(err)}"
                ) from err
            except psycopg.DatabaseError as err:
                raise GalleryError(f"the gallery refused the change: {_first_line(err)}") from err

    def _notify(self, conn: psycopg.Connection[Any], cid: int, version: int) -> None:
        """Queue the change notification; PostgreSQL delivers it at commit (not on
        rollback), in commit order."""
        payload = json.dumps({"schema": self._schema, "collection_id": cid, "version": version})
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))

    # ------------------------------------------------------------------ opening

    def _tables(self, conn: psycopg.Connection[Any]) -> list[str]:
        rows = conn.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
            "ORDER BY c.relname",
            (self._schema,),
        ).fetchall()
        return [r[0] for r in rows]

    def _open_schema(self, create: bool) -> None:
        conn = self._connection()
        encoding = conn.execute("SHOW server_encoding").fetchone()
        if encoding is None or encoding[0].upper() not in ("UTF8", "UTF-8"):
            raise GalleryError(
                f"{self._where} uses encoding {encoding[0] if encoding else '?'}; a gallery "
                f"needs a UTF8 database (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
            )
        # Look before touching: another application's tables must stay unchanged.
        if not self._tables(conn):
            if not create:
                raise NotFoundError(
                    f"no gallery in schema {self._schema!r} of {self._where}; check the DSN "
                    f"and schema, or open it with create=True to make a new one"
                )
            self._run(self._initialise, mode=_WRITE)
        self._run(self._check_meta, mode=_READ)

    def _initialise(self, conn: psycopg.Connection[Any]) -> None:
        # One initialiser at a time per schema; the others find the tables made.
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"{FORMAT}/{self._schema}",),
        )
        if self._tables(conn):
            return
        if not conn.execute(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (self._schema,)
        ).fetchone():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self._schema)))
        conn.execute(_SCHEMA)  # several statements, no parameters: one simple query
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO meta (key, value) VALUES (%s, %s)",
                [
                    ("format", FORMAT),
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                ],
            )

    def _check_meta(self, conn: psycopg.Connection[Any]) -> None:
        tables = self._tables(conn)
        listed = ", ".join(tables[:10]) + (" ..." if len(tables) > 10 else "")
        if "meta" not in tables:
            raise NotAGalleryError(
                f"schema {self._schema!r} of {self._where} is not a facemetric gallery (tables "
                f"{listed or 'none'}); a gallery needs a schema of its own: pass another "
                f"schema= or database"
            )
        try:
            rows = conn.execute("SELECT key, value FROM meta").fetchall()
        except psycopg.ProgrammingError as err:
            raise NotAGalleryError(
                f"schema {self._schema!r} of {self._where} has a meta table that is not a "
                f"facemetric gallery's ({_first_line(err)})"
            ) from err
        meta = {str(k): str(v) for k, v in rows}
        if meta.get("format") != FORMAT:
            raise NotAGalleryError(
                f"schema {self._schema!r} of {self._where} is not a facemetric gallery "
                f"(meta format {meta.get('format')!r})"
            )
        try:
            version = int(meta["schema_version"])
        except (KeyError, ValueError) as err:
            raise NotAGalleryError(
                f"schema {self._schema!r} of {self._where} has no valid schema_version in its "
                f"meta table"
            ) from err
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"the gallery in schema {self._schema!r} of {self._where} has gallery schema "
                f"version {version}, written by a newer facemetric; this one reads schema "
                f"version {SCHEMA_VERSION}. Upgrade facemetric to open it (nothing was changed)"
            )
        if version < 1:
            raise NotAGalleryError(
                f"schema {self._schema!r} of {self._where} has an invalid schema_version "
                f"{version}"
            )
        missing = [t for t in GALLERY_TABLES if t not in tables]
        if missing:
            raise NotAGalleryError(
                f"the gallery in schema {self._schema!r} of {self._where} lacks the tables "
                f"{', '.join(missing)}: it is damaged; restore it from a backup"
            )

    # ------------------------------------------------------------------ row helpers

    def _collection_row(
        self, conn: psycopg.Connection[Any], name: str, *, lock: bool = False
    ) -> tuple[Any, ...]:
        """The collection's row; with ``lock`` it is locked ``FOR UPDATE`` until the
        transaction ends (every write takes this lock first)."""
        check_name(name, "collection")
        row = conn.execute(
            f"SELECT {_COLLECTION_COLUMNS} FROM collections WHERE name = %s"
            + (" FOR UPDATE" if lock else ""),
            (name,),
        ).fetchone()
        if row is None:
            raise NotFoundError(
                f"no collection {name!r} in {self._where}; list them with list_collections() "
                f"or create it with create_collection()"
            )
        return tuple(row)

    @staticmethod
    def _collection(conn: psycopg.Connection[Any], row: Sequence[Any]) -> Collection:
        cid = row[0]
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM persons WHERE collection_id = %s), "
            "(SELECT count(*) FROM faces WHERE collection_id = %s)",
            (cid, cid),
        ).fetchone()
        assert counts is not None
        return Collection(
            id=cid,
            name=row[1],
            contract=ModelContract.from_json(row[2]),
            created_at=row[7],
            version=row[5],
            person_count=counts[0],
            face_count=counts[1],
        )

    @staticmethod
    def _person(row: Sequence[Any]) -> Person:
        metadata = row[3]
        return Person(
            id=row[0],
            collection=row[1],
            name=row[2],
            metadata=dict(metadata) if isinstance(metadata, dict) else json.loads(metadata),
            created_at=row[4],
            face_count=row[5],
        )

    def _person_row(
        self, conn: psycopg.Connection[Any], cid: int, cname: str, name: str
    ) -> tuple[Any, ...]:
        check_name(name, "person")
        row = conn.execute(
            _PERSON_SELECT + "WHERE p.collection_id = %s AND p.name = %s", (cid, name)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no person {name!r} in collection {cname!r}")
        return tuple(row)

    def _template(self, blob: bytes, dim: int, face_id: int) -> np.ndarray:
        if len(blob) != dim * TEMPLATE_DTYPE.itemsize:
            raise GalleryError(
                f"face {face_id} in {self._where} has a {len(blob)}-byte template where "
                f"{dim} float32 values were expected: the gallery is damaged"
            )
        array = np.frombuffer(blob, dtype=TEMPLATE_DTYPE).astype(np.float32)
        array.setflags(write=False)
        return array

    def _bump(self, conn: psycopg.Connection[Any], cid: int) -> int:
        """Increment the collection's version (its row is locked by this transaction), trim
        the change log to its window and queue the notification."""
        row = conn.execute(
            "UPDATE collections SET version = version + 1, updated_at = now() WHERE id = %s "
            "RETURNING version, log_floor",
            (cid,),
        ).fetchone()
        assert row is not None
        version, floor = row
        if version - floor > self._log_versions:
            floor = version - self._log_versions
            conn.execute(
                "DELETE FROM changes WHERE collection_id = %s AND version <= %s", (cid, floor)
            )
            conn.execute("UPDATE collections SET log_floor = %s WHERE id = %s", (floor, cid))
        self._notify(conn, cid, version)
        return int(version)

    @staticmethod
    def _log(
        conn: psycopg.Connection[Any], cid: int, version: int, kind: str, ids: Sequence[int]
    ) -> None:
        if ids:
            conn.execute(
                "INSERT INTO changes (collection_id, version, kind, item_id) "
                "SELECT %s, %s, %s, unnest(%s::bigint[])",
                (cid, version, kind, list(ids)),
            )

    # ------------------------------------------------------------------ collections

    def create_collection(self, name: str, contract: ModelContract) -> Collection:
        check_name(name, "collection")
        if not isinstance(contract, ModelContract):
            raise InvalidInputError(
                f"contract must be a ModelContract (encoder.contract), got "
                f"{type(contract).__name__}"
            )

        def body(conn: psycopg.Connection[Any]) -> Collection:
            row = conn.execute(
                "INSERT INTO collections (name, contract_json, fingerprint, dim) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                (name, contract.to_json(), contract.fingerprint(), contract.embedding_size),
            ).fetchone()
            if row is None:
                raise AlreadyExistsError(
                    f"collection {name!r} already exists in {self._where}; choose another "
                    f"name or delete it first"
                )
            return self._collection(conn, self._collection_row(conn, name))

        return self._run(body, mode=_WRITE)

    def get_collection(self, name: str) -> Collection:
        return self._run(
            lambda conn: self._collection(conn, self._collection_row(conn, name)), mode=_READ
        )

    def list_collections(self) -> list[Collection]:
        def body(conn: psycopg.Connection[Any]) -> list[Collection]:
            rows = conn.execute(
                f"SELECT {_COLLECTION_COLUMNS} FROM collections ORDER BY name"
            ).fetchall()
            return [self._collection(conn, row) for row in rows]

        return self._run(body, mode=_READ)

    def delete_collection(self, name: str) -> None:
        def body(conn: psycopg.Connection[Any]) -> None:
            cid = self._collection_row(conn, name, lock=True)[0]
            conn.execute("DELETE FROM collections WHERE id = %s", (cid,))
            self._notify(conn, cid, -1)

        self._run(body, mode=_WRITE)

    # ------------------------------------------------------------------ persons

    @staticmethod
    def _metadata(metadata: Mapping[str, Any] | None) -> str:
        meta = metadata_json(metadata)
        if "\\u0000" in meta:
            raise InvalidInputError(
                "person metadata holds a NUL character (\\x00), which PostgreSQL cannot "
                "store in JSON; remove it"
            )
        return meta

    def add_person(
        self, collection: str, name: str, metadata: Mapping[str, Any] | None = None
    ) -> Person:
        check_name(name, "person")
        meta = self._metadata(metadata)

        def body(conn: psycopg.Connection[Any]) -> Person:
            cid = self._collection_row(conn, collection, lock=True)[0]
            if conn.execute(
                "SELECT 1 FROM persons WHERE collection_id = %s AND name = %s", (cid, name)
            ).fetchone():
                raise AlreadyExistsError(
                    f"person {name!r} already exists in collection {collection!r}; add faces "
                    f"to it with add_faces() or choose another name"
                )
            pid = self._insert_person(conn, cid, name, meta)
            self._log(conn, cid, self._bump(conn, cid), "person_changed", [pid])
            return self._person(self._person_row(conn, cid, collection, name))

        return self._run(body, mode=_WRITE)

    @staticmethod
    def _insert_person(conn: psycopg.Connection[Any], cid: int, name: str, meta: str) -> int:
        row = conn.execute(
            "INSERT INTO persons (collection_id, name, metadata) VALUES (%s, %s, %s::jsonb) "
            "RETURNING id",
            (cid, name, meta),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def get_person(self, collection: str, name: str) -> Person:
        def body(conn: psycopg.Connection[Any]) -> Person:
            cid = self._collection_row(conn, collection)[0]
            return self._person(self._person_row(conn, cid, collection, name))

        return self._run(body, mode=_READ)

    def list_persons(
        self, collection: str, after: str | None = None, limit: int = 100
    ) -> tuple[list[Person], str | None]:
        check_limit(limit)
        last = None if after is None else decode_cursor(after)

        def body(conn: psycopg.Connection[Any]) -> tuple[list[Person], str | None]:
            cid = self._collection_row(conn, collection)[0]
            where, args = "WHERE p.collection_id = %s ", [cid]
            if last is not None:
                where += "AND p.name > %s "
                args.append(last)
            rows = conn.execute(
                _PERSON_SELECT + where + "ORDER BY p.name LIMIT %s", (*args, limit + 1)
            ).fetchall()
            persons = [self._person(row) for row in rows[:limit]]
            more = len(rows) > limit
            return persons, encode_cursor(persons[-1].name) if more else None

        return self._run(body, mode=_READ)

    def rename_person(self, collection: str, name: str, new_name: str) -> Person:
        check_name(new_name, "person")

        def body(conn: psycopg.Connection[Any]) -> Person:
            cid = self._collection_row(conn, collection, lock=True)[0]
            pid = self._person_row(conn, cid, collection, name)[0]
            if new_name != name:
                if conn.execute(
                    "SELECT 1 FROM persons WHERE collection_id = %s AND name = %s",
                    (cid, new_name),
                ).fetchone():
                    raise AlreadyExistsError(
                        f"cannot rename {name!r}: person {new_name!r} already exists in "
                        f"collection {collection!r}"
                    )
                conn.execute("UPDATE persons SET name = %s WHERE id = %s", (new_name, pid))
                self._log(conn, cid, self._bump(conn, cid), "person_changed", [pid])
            return self._person(self._person_row(conn, cid, collection, new_name))

        return self._run(body, mode=_WRITE)

    def delete_person(self, collection: str, name: str) -> None:
        def body(conn: psycopg.Connection[Any]) -> None:
            cid = self._collection_row(conn, collection, lock=True)[0]
            pid = self._person_row(conn, cid, collection, name)[0]
            face_ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM faces WHERE person_id = %s ORDER BY id", (pid,)
                )
            ]
            conn.execute("DELETE FROM persons WHERE id = %s", (pid,))
            version = self._bump(conn, cid)
            self._log(conn, cid, version, "face_removed", face_ids)
            self._log(conn, cid, version, "person_changed", [pid])

        self._run(body, mode=_WRITE)

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
        for i, face in enumerate(faces):
            if "\x00" in face.landmark_scheme:
                raise InvalidInputError(
                    f"face {i}'s landmark_scheme holds a NUL character, which PostgreSQL "
                    f"cannot store; name the layout in printable characters"
                )
        meta = self._metadata(metadata)
        rows = [
            (
                face.template.astype(TEMPLATE_DTYPE).tobytes(),
                [list(p) for p in face.landmarks],
                face.landmark_scheme,
                *face.box,
                face.source_sha256,
                face.quality,
                face.crop,
            )
            for face in faces
        ]

        def body(conn: psycopg.Connection[Any]) -> list[int]:
            row = self._collection_row(conn, collection, lock=True)
            cid = row[0]
            check_collection_contract(row[1], row[2], row[3], contract)
            found = conn.execute(
                "SELECT id FROM persons WHERE collection_id = %s AND name = %s",
                (cid, person_name),
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
            ids: list[int] = []
            with conn.cursor() as cur:
                # One statement per face (face row + its crop), sent as one pipeline.
                cur.executemany(
                    "WITH f AS (INSERT INTO faces (person_id, collection_id, template, "
                    "landmarks, landmark_scheme, box_left, box_top, box_right, box_bottom, "
                    "source_sha256, quality) VALUES (%s, %s, %s, %s::float8[], %s, %s, %s, "
                    "%s, %s, %s, %s) RETURNING id) "
                    "INSERT INTO face_crops (face_id, png) SELECT id, %s FROM f "
                    "RETURNING face_id",
                    [(pid, cid, *r) for r in rows],
                    returning=True,
                )
                while True:
                    got = cur.fetchone()
                    assert got is not None
                    ids.append(int(got[0]))
                    if not cur.nextset():
                        break
            version = self._bump(conn, cid)
            self._log(conn, cid, version, "person_changed", created)
            self._log(conn, cid, version, "face_added", ids)
            return ids

        return self._run(body, mode=_WRITE)

    def faces(self, collection: str, person_name: str) -> list[FaceRecord]:
        def body(conn: psycopg.Connection[Any]) -> list[FaceRecord]:
            row = self._collection_row(conn, collection)
            pid = self._person_row(conn, row[0], collection, person_name)[0]
            with conn.cursor(binary=True) as cur:
                rows = cur.execute(
                    "SELECT f.id, f.person_id, f.template, c.png, f.landmarks, "
                    "f.landmark_scheme, f.box_left, f.box_top, f.box_right, f.box_bottom, "
                    "f.source_sha256, f.quality, f.created_at "
                    "FROM faces f JOIN face_crops c ON c.face_id = f.id "
                    "WHERE f.person_id = %s ORDER BY f.id",
                    (pid,),
                ).fetchall()
            return [
                FaceRecord(
                    id=r[0],
                    person_id=r[1],
                    template=self._template(r[2], row[4], r[0]),
                    crop=bytes(r[3]),
                    landmarks=_landmarks(r[4]),
                    landmark_scheme=r[5],
                    box=(r[6], r[7], r[8], r[9]),
                    source_sha256=r[10],
                    quality=r[11],
                    created_at=r[12],
                )
                for r in rows
            ]

        return self._run(body, mode=_READ)

    def find_source(self, collection: str, source_sha256: str) -> list[tuple[int, Person]]:
        sha = check_sha256(source_sha256)

        def body(conn: psycopg.Connection[Any]) -> list[tuple[int, Person]]:
            cid = self._collection_row(conn, collection)[0]
            hits = conn.execute(
                "SELECT id, person_id FROM faces WHERE collection_id = %s "
                "AND source_sha256 = %s ORDER BY id",
                (cid, sha),
            ).fetchall()
            persons: dict[int, Person] = {}
            for _, pid in hits:
                if pid not in persons:
                    found = conn.execute(_PERSON_SELECT + "WHERE p.id = %s", (pid,)).fetchone()
                    assert found is not None
                    persons[pid] = self._person(found)
            return [(face_id, persons[pid]) for face_id, pid in hits]

        return self._run(body, mode=_READ)

    def remove_faces(self, collection: str, face_ids: Sequence[int]) -> None:
        ids = check_ids(face_ids, "face")
        if not ids:
            return

        def body(conn: psycopg.Connection[Any]) -> None:
            cid = self._collection_row(conn, collection, lock=True)[0]
            found = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM faces WHERE collection_id = %s AND id = ANY(%s::bigint[])",
                    (cid, ids),
                )
            }
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError(
                    f"faces {missing[:20]}{' ...' if len(missing) > 20 else ''} are not in "
                    f"collection {collection!r} (removed already, or of another collection); "
                    f"nothing was removed"
                )
            conn.execute("DELETE FROM faces WHERE id = ANY(%s::bigint[])", (ids,))
            self._log(conn, cid, self._bump(conn, cid), "face_removed", ids)

        self._run(body, mode=_WRITE)

    def templates(self, collection: str, face_ids: Sequence[int] | None = None) -> Templates:
        wanted = None if face_ids is None else check_ids(face_ids, "face")

        def body(conn: psycopg.Connection[Any]) -> Templates:
            row = self._collection_row(conn, collection)
            cid, dim = row[0], row[4]
            if wanted is None:
                counted = conn.execute(
                    "SELECT count(*) FROM faces WHERE collection_id = %s", (cid,)
                ).fetchone()
                n = int(counted[0]) if counted else 0
                query = (
                    "SELECT id, person_id, template FROM faces WHERE collection_id = %s "
                    "ORDER BY id"
                )
                args: tuple[Any, ...] = (cid,)
            else:
                n = len(wanted)  # an upper bound; absent ids are dropped below
                query = (
                    "SELECT id, person_id, template FROM faces WHERE collection_id = %s "
                    "AND id = ANY(%s::bigint[]) ORDER BY id"
                )
                args = (cid, wanted)
            face_arr = np.empty(n, dtype=np.int64)
            person_arr = np.empty(n, dtype=np.int64)
            matrix = np.empty((n, dim), dtype=np.float32)
            i = 0
            # A server-side cursor streams the rows (bounded client memory), binary so the
            # templates travel as raw bytes, not hex text.
            with conn.cursor(name="facemetric_templates", binary=True) as cur:
                cur.itersize = _FETCH
                cur.execute(query, args)
                for face_id, pid, blob in cur:
                    if i >= n:  # faces are read in the count's snapshot: cannot happen
                        raise GalleryError(f"{self._where} returned more faces than counted")
                    matrix[i] = self._template(blob, dim, face_id)
                    face_arr[i], person_arr[i] = face_id, pid
                    i += 1
            face_arr, person_arr, matrix = face_arr[:i], person_arr[:i], matrix[:i]
            for array in (face_arr, person_arr, matrix):
                array.setflags(write=False)
            return Templates(cid, row[5], row[3], face_arr, person_arr, matrix)

        return self._run(body, mode=_READ)

    def iter_crops(self, collection: str, batch_size: int = 256) -> Iterator[FaceCrop]:
        check_limit(batch_size)
        last = 0
        while True:

            def body(conn: psycopg.Connection[Any], after: int = last) -> list[FaceCrop]:
                cid = self._collection_row(conn, collection)[0]
                with conn.cursor(binary=True) as cur:
                    rows = cur.execute(
                        "SELECT f.id, f.person_id, c.png, f.landmarks, f.landmark_scheme "
                        "FROM faces f JOIN face_crops c ON c.face_id = f.id "
                        "WHERE f.collection_id = %s AND f.id > %s ORDER BY f.id LIMIT %s",
                        (cid, after, batch_size),
                    ).fetchall()
                return [
                    FaceCrop(
                        face_id=r[0],
                        person_id=r[1],
                        crop=bytes(r[2]),
                        landmarks=_landmarks(r[3]),
                        landmark_scheme=r[4],
                    )
                    for r in rows
                ]

            batch = self._run(body, mode=_READ)
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

        def body(conn: psycopg.Connection[Any]) -> Collection:
            cid = self._collection_row(conn, collection, lock=True)[0]
            present = {
                r[0]
                for r in conn.execute("SELECT id FROM faces WHERE collection_id = %s", (cid,))
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
            items = sorted(blobs.items())
            for start in range(0, len(items), _UPDATE_CHUNK):
                chunk = items[start : start + _UPDATE_CHUNK]
                conn.execute(
                    "UPDATE faces f SET template = v.template "
                    "FROM unnest(%s::bigint[], %s::bytea[]) AS v(id, template) "
                    "WHERE f.id = v.id",
                    ([k for k, _ in chunk], [b for _, b in chunk]),
                )
            version = self._bump(conn, cid)
            conn.execute(
                "UPDATE collections SET contract_json = %s, fingerprint = %s, dim = %s, "
                "log_floor = %s WHERE id = %s",
                (contract.to_json(), contract.fingerprint(), size, version, cid),
            )
            conn.execute("DELETE FROM changes WHERE collection_id = %s", (cid,))
            return self._collection(conn, self._collection_row(conn, collection))

        return self._run(body, mode=_WRITE)

    # ------------------------------------------------------------------ change tracking

    def version(self, collection: str) -> int:
        check_name(collection, "collection")

        def body(conn: psycopg.Connection[Any]) -> int:
            # One statement: it sees every transaction committed before it started.
            row = conn.execute(
                "SELECT version FROM collections WHERE name = %s", (collection,)
            ).fetchone()
            if row is None:
                raise NotFoundError(
                    f"no collection {collection!r} in {self._where}; list them with "
                    f"list_collections() or create it with create_collection()"
                )
            return int(row[0])

        return self._run(body, mode=_SINGLE)

    def changes_since(self, collection: str, version: int) -> Changes:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidInputError(f"version must be a non-negative int, got {version!r}")

        def body(conn: psycopg.Connection[Any]) -> Changes:
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
                "SELECT kind, item_id FROM changes WHERE collection_id = %s AND version > %s",
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

        return self._run(body, mode=_READ)

    def _listener(self) -> psycopg.Connection[Any]:
        """This thread's connection that LISTENs on :data:`NOTIFY_CHANNEL` (kept apart from
        the transactional one so notifications are never consumed by other statements)."""
        if self._closed:
            raise GalleryError(f"the gallery in {self._where} is closed; open it again")
        slot: _Slot | None = getattr(self._local, "listener", None)
        pid = os.getpid()
        if slot is not None and slot.pid == pid and not slot.conn.closed:
            return slot.conn
        if slot is not None and slot.pid != pid:
            self._inherited.append(slot)
        conn = self._connect()
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
        slot = _Slot(conn, pid)
        weakref.finalize(slot, _close_if_owner, conn, pid)
        self._local.listener = slot
        with self._slots_lock:
            self._slots.add(slot)
        return conn

    def wait_for_change(self, collection: str, version: int, timeout: float) -> int:
        """Block until the collection's version differs from ``version`` or ``timeout``
        seconds pass; return the current version (``== version`` on timeout).

        Woken by the ``NOTIFY`` every write sends at commit (typically within a
        millisecond plus one network round trip of the commit), so a worker can keep its
        index fresh without polling: ``v = store.wait_for_change(name, v, 30)`` in a loop,
        then :meth:`changes_since`. The version is read *after* listening starts, so a
        change committed just before the call is never missed. A lost listening connection
        is replaced and the version read again.

        Raises:
            NotFoundError: no such collection (also when it is deleted while waiting).
            InvalidInputError: ``version`` is not a non-negative int or ``timeout`` is
                negative.
        """
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidInputError(f"version must be a non-negative int, got {version!r}")
        if not isinstance(timeout, int | float) or not timeout >= 0:
            raise InvalidInputError(f"timeout must be non-negative seconds, got {timeout!r}")
        check_name(collection, "collection")
        deadline = time.monotonic() + float(timeout)
        while True:
            listener = self._listener()  # listening before the version is read
            for _ in listener.notifies(timeout=0):  # drop what came before this read
                pass
            current = self.version(collection)
            if current != version:
                return current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return current
            try:
                # Any notification (or the timeout) ends the wait; the loop reads the version.
                for _ in listener.notifies(timeout=remaining, stop_after=1):
                    pass
            except psycopg.OperationalError:
                if listener.broken or listener.closed:
                    self._local.listener = None
                    _close_if_owner(listener, os.getpid())
                    continue
                raise

    # ------------------------------------------------------------------ maintenance

    def check(self) -> None:
        """Check what the database's constraints do not: every face has its crop and a
        template of its collection's ``D``, no change-log row is newer than its collection's
        version. Raise :class:`GalleryError` listing the problems, if any."""

        def body(conn: psycopg.Connection[Any]) -> list[str]:
            problems = []
            for face_id, in conn.execute(
                "SELECT f.id FROM faces f LEFT JOIN face_crops c ON c.face_id = f.id "
                "WHERE c.face_id IS NULL ORDER BY f.id LIMIT 10"
            ):
                problems.append(f"face {face_id} has no crop")
            for face_id, length, dim in conn.execute(
                "SELECT f.id, octet_length(f.template), c.dim FROM faces f "
                "JOIN collections c ON c.id = f.collection_id "
                "WHERE octet_length(f.template) <> 4 * c.dim ORDER BY f.id LIMIT 10"
            ):
                problems.append(f"face {face_id} has a {length}-byte template, D={dim}")
            for name, logged, version in conn.execute(
                "SELECT c.name, max(l.version), c.version FROM changes l "
                "JOIN collections c ON c.id = l.collection_id GROUP BY c.id "
                "HAVING max(l.version) > c.version OR min(l.version) <= c.log_floor"
            ):
                problems.append(
                    f"collection {name!r} logs versions up to {logged} but is at {version} "
                    f"(or keeps rows below its log floor)"
                )
            return problems

        problems = self._run(body, mode=_READ)
        if problems:
            raise GalleryError(
                f"the gallery in {self._where} is damaged: {'; '.join(problems[:10])}; "
                f"restore it from a backup"
            )


__all__ = [
    "FORMAT",
    "GALLERY_TABLES",
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "TEMPLATE_DTYPE",
    "PostgresGallery",
]
