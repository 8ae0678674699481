"""API keys of the recognition service: scoped, optionally bound to one collection, stored
only as salted hashes.

A key is ``fmk_<id>_<secret>``: ``id`` is 12 public hex digits (the key's name in listings,
logs and ``keys revoke``), ``secret`` 32 random bytes in URL-safe base64 (256 bits, from
:mod:`secrets`). The secret is shown once, when the key is created; the store keeps a
16-byte random salt and ``HMAC-SHA256(salt, secret)``. A fast keyed hash is enough because
the secret is a uniformly random 256-bit string, not a password: guessing it is
infeasible however fast each guess is, while a slow password hash (scrypt, PBKDF2) would
add tens of milliseconds of CPU to *every* request. Comparison is constant-time
(:func:`hmac.compare_digest`).

Scopes form a ladder, each implying the ones below: ``read`` (verify, identify, embed,
list and get) < ``enroll`` (add and remove faces and persons) < ``admin`` (create and
delete collections, manage keys). A key bound to a collection can touch that collection
only (and the collection-free operations its scope allows: verify, embed).

Storage: a small SQLite file of its own (by default beside an SQLite gallery,
``people.db`` → ``people.keys.db``), not a table in the gallery, because

- credentials and biometric data have different lives: a gallery file is copied, backed up,
  handed to another team or re-embedded; its keys must not travel with it;
- the gallery's format and its :class:`~facemetric.gallery.GalleryStore` interface (which
  other backends implement) stay free of a concern that is the service's alone;
- the file is created readable by its owner only (mode ``0600``).

Schema (``meta`` says ``format = facemetric-keys``, ``schema_version = 1``)::

    api_keys (id TEXT PRIMARY KEY, salt BLOB, digest BLOB, scope TEXT, collection TEXT NULL,
              name TEXT, created_at TEXT, revoked_at TEXT NULL)

Revocation takes effect on the next request of every worker: each request reads its key's
row (one indexed read, no cache).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

KEY_PREFIX = "fmk_"
"""Every key starts with this (so a leaked key is easy to recognise and to scan for)."""

FORMAT = "facemetric-keys"
SCHEMA_VERSION = 1

_ID = re.compile(r"[0-9a-f]{12}")
_KEY = re.compile(r"fmk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    salt        BLOB NOT NULL,
    digest      BLOB NOT NULL,
    scope       TEXT NOT NULL CHECK (scope IN ('read', 'enroll', 'admin')),
    collection  TEXT,
    name        TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
)
"""


class Scope(enum.StrEnum):
    """What a key may do; each scope implies the ones before it."""

    READ = "read"
    ENROLL = "enroll"
    ADMIN = "admin"

    @property
    def level(self) -> int:
        return _LEVELS[self]

    def implies(self, other: Scope) -> bool:
        """``True`` when a key of this scope may do what ``other`` allows."""
        return self.level >= other.level


_LEVELS = {Scope.READ: 1, Scope.ENROLL: 2, Scope.ADMIN: 3}


class KeyStoreError(ValueError):
    """Base of the key store's errors (a ``ValueError``: the CLI prints it as one line)."""


class InvalidKeyError(KeyStoreError):
    """A presented key that is malformed, unknown or revoked (``reason`` says which)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class UnknownKeyIdError(KeyStoreError):
    """A key id that names no key (``keys revoke``)."""


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret.

    Attributes:
        id: 12 hex digits, public.
        scope: what it may do.
        collection: the one collection it may touch, or ``None`` for all.
        name: a label for people ("enrollment kiosk 3").
        created_at, revoked_at: UTC times (``revoked_at`` ``None`` while it works).
    """

    id: str
    scope: Scope
    collection: str | None
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, scope: Scope, collection: str | None = None) -> bool:
        """May this key do what ``scope`` allows, on ``collection`` (``None``: an operation
        that touches no collection)?"""
        if not self.scope.implies(scope):
            return False
        return self.collection is None or collection is None or collection == self.collection

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "scope": str(self.scope),
            "collection": self.collection,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
        }


def default_keys_path(gallery: str | os.PathLike[str]) -> Path:
    """The key file beside an SQLite gallery: ``people.db`` → ``people.keys.db``.

    Raises:
        ValueError: ``gallery`` is a database URL (pass the key file explicitly).
    """
    text = str(gallery)
    if "://" in text:
        raise ValueError(
            f"the gallery {_redact_url(text)} is a database URL, so there is no folder to put "
            f"the key file in: pass --keys FILE (a small SQLite file)"
        )
    path = Path(text)
    return path.with_name(f"{path.stem}.keys.db")


def _redact_url(url: str) -> str:
    """``scheme://user:***@host/db``: a URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _now() -> datetime:
    return datetime.now(UTC)


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode("ascii"), hashlib.sha256).digest()


class KeyStore:
    """The key file (module docstring); safe to share between threads and processes (one
    short-lived SQLite connection per call).

    Args:
        path: the SQLite file; created (mode ``0600``) when missing and ``create``.
        create: make a new file when missing (else :class:`FileNotFoundError`).

    Raises:
        ValueError: the file exists but is not a facemetric key file.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(
                    f"no key file {self.path}; create a key first with `facemetric keys create`"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        with self._connect() as conn:
            self._initialise(conn)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            yield conn
        except sqlite3.DatabaseError as err:
            raise KeyStoreError(
                f"{self.path} is not a usable facemetric key file (SQLite says: {err}); pass "
                f"another --keys file"
            ) from err
        finally:
            conn.close()

    def _initialise(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "api_keys" not in tables:
            raise KeyStoreError(
                f"{self.path} is an SQLite database of another kind (tables "
                f"{sorted(tables)}); a key file needs a file of its own"
            )
        if not tables:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise KeyStoreError(f"{self.path} is not a facemetric key file")
        if int(meta.get("schema_version", "0")) > SCHEMA_VERSION:
            raise KeyStoreError(
                f"{self.path} was written by a newer facemetric (key schema "
                f"{meta['schema_version']}); upgrade facemetric"
            )

    # ------------------------------------------------------------------ records

    @staticmethod
    def _record(row: tuple[object, ...]) -> ApiKey:
        return ApiKey(
            id=str(row[0]),
            scope=Scope(str(row[1])),
            collection=None if row[2] is None else str(row[2]),
            name=str(row[3]),
            created_at=datetime.fromisoformat(str(row[4])),
            revoked_at=None if row[5] is None else datetime.fromisoformat(str(row[5])),
        )

    _SELECT = "SELECT id, scope, collection, name, created_at, revoked_at FROM api_keys "

    # ------------------------------------------------------------------ operations

    def create(
        self, scope: Scope | str, collection: str | None = None, name: str = ""
    ) -> tuple[ApiKey, str]:
        """Make a new key; returns its record and the key itself — the only time the secret
        exists outside the caller's hands.

        Raises:
            ValueError: an unknown scope, or an empty/unprintable collection or name.
        """
        try:
            scope = Scope(scope)
        except ValueError:
            raise ValueError(
                f"unknown scope {scope!r}; choose one of {[str(s) for s in Scope]}"
            ) from None
        if collection is not None and (not collection or not collection.isprintable()
                                       or collection != collection.strip()):
            raise ValueError(f"--collection must be a collection's name, got {collection!r}")
        if not isinstance(name, str) or len(name) > 200 or not name.isprintable():
            raise ValueError("a key's name must be printable text of at most 200 characters")
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._connect() as conn:
            for _ in range(8):  # an id collision (48 random bits) is astronomically rare
                key_id = secrets.token_hex(6)
                try:
                    conn.execute(
                        "INSERT INTO api_keys (id, salt, digest, scope, collection, name, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key_id, salt, _digest(salt, secret), str(scope), collection, name,
                         _now().isoformat()),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue
            else:  # pragma: no cover
                raise KeyStoreError("could not draw an unused key id; try again")
            row = conn.execute(self._SELECT + "WHERE id = ?", (key_id,)).fetchone()
        return self._record(row), f"{KEY_PREFIX}{key_id}_{secret}"

    def authenticate(self, token: str) -> ApiKey:
        """The active key ``token`` is.

        Raises:
            InvalidKeyError: malformed, unknown, wrong secret or revoked (``reason``:
                ``"malformed"``, ``"unknown"`` or ``"revoked"``).
        """
        match = _KEY.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            raise InvalidKeyError(
                "malformed",
                "the API key is malformed: a facemetric key looks like fmk_<12 hex>_<43 "
                "characters>, as `facemetric keys create` printed it",
            )
        key_id, secret = match.groups()
        with self._connect() as conn:
            row = conn.execute(
                "SELECT salt, digest FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
            record = conn.execute(self._SELECT + "WHERE id = ?", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(_digest(bytes(row[0]), secret), bytes(row[1])):
            raise InvalidKeyError(
                "unknown", "the API key is not valid (unknown, or mistyped); ask an admin for a key"
            )
        key = self._record(record)
        if not key.active:
            raise InvalidKeyError(
                "revoked", f"the API key {key.id} was revoked; ask an admin for a new key"
            )
        return key

    def get(self, key_id: str) -> ApiKey:
        """The key with this id (revoked or not); :class:`UnknownKeyIdError` if none."""
        if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
            raise UnknownKeyIdError(f"{key_id!r} is not a key id (12 hex digits, see `keys list`)")
        with self._connect() as conn:
            row = conn.execute(self._SELECT + "WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise UnknownKeyIdError(f"no key with id {key_id!r}; list them with `keys list`")
        return self._record(row)

    def list(self, collection: str | None = None, include_revoked: bool = True) -> list[ApiKey]:
        """Keys by creation time (those bound to ``collection`` only, when given)."""
        where, args = "WHERE 1 = 1 ", []
        if collection is not None:
            where += "AND collection = ? "
            args.append(collection)
        if not include_revoked:
            where += "AND revoked_at IS NULL "
        with self._connect() as conn:
            rows = conn.execute(self._SELECT + where + "ORDER BY created_at, id", args).fetchall()
        return [self._record(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent); it is refused from the next request on."""
        self.get(key_id)
        with self._connect() as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (_now().isoformat(), key_id),
            )
        return self.get(key_id)

    def active_count(self) -> int:
        """How many keys work."""
        with self._connect() as conn:
            return int(conn.execute(
                "SELECT count(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0])


def looks_like_key(text: str) -> bool:
    """``True`` when ``text`` contains something shaped like a facemetric key."""
    return KEY_PREFIX in text


__all__ = [
    "KEY_PREFIX",
    "ApiKey",
    "InvalidKeyError",
    "KeyStore",
    "KeyStoreError",
    "Scope",
    "UnknownKeyIdError",
    "default_keys_path",
    "looks_like_key",
]
