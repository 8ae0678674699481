"""Fixtures of the gallery tests.

- ``gallery`` / ``db_path``: an SQLite gallery file with the empty collection ``"main"``
  (tests of the SQLite file itself).
- ``store`` / ``backend``: the same, once per store — SQLite and PostgreSQL — for the tests
  of the :class:`GalleryStore` contract. ``backend`` gives each test what it needs beyond
  the interface (raw row counts, a trigger, another writer holding the lock).
- ``pg_cluster`` (session): a throwaway PostgreSQL server (``pg_cluster.py``) started on
  first use; ``pg_dsn``: a fresh database in it. Without PostgreSQL on the machine the
  PostgreSQL tests are skipped — unless ``FACEMETRIC_REQUIRE_DATA=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from gallery_worker import COLLECTION, contract
from pg_cluster import (
    REQUIRE_ENV,
    ClusterUnavailableError,
    PostgresCluster,
    psycopg_missing,
    start_cluster,
)
from store_backends import Backend, PostgresBackend, SQLiteBackend

from facemetric.gallery import GalleryStore, SQLiteGallery
from facemetric.inference.contract import ModelContract

STORES = ("sqlite", "postgres")

# Without psycopg (outside CI) the PostgreSQL-only modules cannot even be imported: leave them
# out; the postgres runs of the shared store tests then skip, saying why (pg_cluster).
collect_ignore = (
    ["test_gallery_postgres.py", "test_gallery_postgres_processes.py"]
    if psycopg_missing() and os.environ.get(REQUIRE_ENV) != "1"
    else []
)


@pytest.fixture
def model() -> ModelContract:
    return contract()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gallery.db"


@pytest.fixture
def gallery(db_path: Path, model: ModelContract) -> Iterator[SQLiteGallery]:
    """A gallery (``synchronous=NORMAL``: these tests do not cut the power) holding the
    empty collection ``"main"`` pinned to ``model``."""
    with SQLiteGallery(db_path, synchronous="NORMAL") as store:
        store.create_collection(COLLECTION, model)
        yield store


# ------------------------------------------------------------------ PostgreSQL


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of the test session's own (socket only, in a temporary folder)."""
    try:
        cluster = start_cluster()
    except ClusterUnavailableError as err:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but unavailable: {err}")
        pytest.skip(f"PostgreSQL unavailable: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: PostgresCluster) -> str:
    """The DSN of a new, empty database (linguistic default collation, UTF8)."""
    return pg_cluster.create_database()


# ------------------------------------------------------------------ one test, both stores


@pytest.fixture(params=STORES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each store in turn; the PostgreSQL one starts the session's cluster on first use."""
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "gallery.db")
    return PostgresBackend(request.getfixturevalue("pg_dsn"))


@pytest.fixture
def store(backend: Backend, model: ModelContract) -> Iterator[GalleryStore]:
    """A store of ``backend`` holding the empty collection ``"main"`` pinned to ``model``."""
    with backend.open() as opened:
        opened.create_collection(COLLECTION, model)
        yield opened
