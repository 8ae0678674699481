"""One test, both stores: what a store-generic gallery test needs beyond the
:class:`GalleryStore` interface (raw row counts, a failing trigger, another writer holding the
lock), for the SQLite file and the PostgreSQL database."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gallery_worker import COLLECTION

from facemetric.gallery import GalleryStore, SQLiteGallery


class Backend:
    """What a store-generic test needs beyond the :class:`GalleryStore` interface."""

    name: str
    target: str  # what gallery_worker.py takes: a file path or a DSN

    def open(self, *, durable: bool = False, **options: Any) -> GalleryStore:
        """A store on this backend's gallery (``durable``: SQLite's ``synchronous=FULL``)."""
        raise NotImplementedError

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        """Rows of a statement run on a connection of its own (committed)."""
        raise NotImplementedError

    def count(self, table: str) -> int:
        return int(self.query(f"SELECT count(*) FROM {table}")[0][0])

    def plant_third_crop_failure(self) -> None:
        """A trigger that makes the database refuse the third face crop ever inserted with
        the message 'disk says no'."""
        raise NotImplementedError

    @contextlib.contextmanager
    def writer_holding_the_lock(self) -> Iterator[threading.Event]:
        """Another writer holding the lock every write of ``"main"`` needs, until the
        yielded event is set (from any thread) or the block ends."""
        raise NotImplementedError
        yield  # pragma: no cover


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.target = str(path)

    def open(self, *, durable: bool = False, **options: Any) -> GalleryStore:
        options.setdefault("synchronous", "FULL" if durable else "NORMAL")
        return SQLiteGallery(self.path, **options)

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                return conn.execute(statement).fetchall()
        finally:
            conn.close()

    def plant_third_crop_failure(self) -> None:
        self.query(
            "CREATE TRIGGER third_crop_fails BEFORE INSERT ON face_crops "
            "WHEN (SELECT count(*) FROM face_crops) >= 2 "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )

    @contextlib.contextmanager
    def writer_holding_the_lock(self) -> Iterator[threading.Event]:
        holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
        release = threading.Event()
        waiter = threading.Thread(target=lambda: (release.wait(), holder.execute("ROLLBACK")))
        waiter.start()
        try:
            yield release
        finally:
            release.set()
            waiter.join()
            holder.close()


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.target = dsn

    def open(self, *, durable: bool = False, **options: Any) -> GalleryStore:
        from facemetric.gallery import PostgresGallery

        return PostgresGallery(self.dsn, **options)

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(statement)
            return list(cursor.fetchall()) if cursor.description else []

    def plant_third_crop_failure(self) -> None:
        self.query(
            "CREATE FUNCTION third_crop_fails() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF (SELECT count(*) FROM face_crops) >= 2 THEN "
            "RAISE EXCEPTION 'disk says no'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER third_crop_fails BEFORE INSERT ON face_crops "
            "FOR EACH ROW EXECUTE FUNCTION third_crop_fails()"
        )

    @contextlib.contextmanager
    def writer_holding_the_lock(self) -> Iterator[threading.Event]:
        import psycopg

        holder = psycopg.connect(self.dsn, autocommit=True)
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM collections WHERE name = %s FOR UPDATE", (COLLECTION,))
        release = threading.Event()
        waiter = threading.Thread(target=lambda: (release.wait(), holder.execute("ROLLBACK")))
        waiter.start()
        try:
            yield release
        finally:
            release.set()
            waiter.join()
            holder.close()
