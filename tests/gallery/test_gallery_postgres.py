"""The PostgreSQL gallery itself, on a real throwaway server: what is stored and how, which
databases are refused (untouched), many workers opening one fresh database, lost
connections, change notifications, and the staleness bound of two recognizers (two workers)
sharing one gallery."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import torch
from gallery_worker import COLLECTION, DIM, contract, faces_for
from pg_cluster import PostgresCluster

from facemetric.gallery import (
    GalleryError,
    InvalidInputError,
    NewFace,
    NotAGalleryError,
    NotFoundError,
    PostgresGallery,
    SchemaTooNewError,
)
from facemetric.gallery.postgres import FORMAT, NOTIFY_CHANNEL, SCHEMA_VERSION
from facemetric.inference import ModelContract, ThresholdTable, TorchEncoder
from facemetric.inference.calibration import CalibrationEntry
from facemetric.recognizer import Recognizer


def _rows(dsn: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement, args)
        return list(cursor.fetchall()) if cursor.description else []


def _catalog(dsn: str) -> list[tuple[Any, ...]]:
    """Every schema and relation of the database outside the system catalogs."""
    return _rows(
        dsn,
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
        "ORDER BY 1, 2",
    ) + _rows(dsn, "SELECT nspname, '', '' FROM pg_namespace ORDER BY 1")


@pytest.fixture
def pg(pg_dsn: str, model: ModelContract) -> Any:
    with PostgresGallery(pg_dsn) as store:
        store.create_collection(COLLECTION, model)
        yield store


# ------------------------------------------------------------------ what is stored


def test_stored_values_are_raw_float32_bytea_and_native_types(
    pg: PostgresGallery, pg_dsn: str, model: ModelContract
) -> None:
    faces = faces_for("raw", 2)
    ids = pg.add_faces(COLLECTION, "ana", faces, contract=model, metadata={"k": [1, 2]})
    rows = _rows(
        pg_dsn,
        "SELECT f.id, f.template, f.landmarks, c.png, f.box_left, f.source_sha256 "
        "FROM faces f JOIN face_crops c ON c.face_id = f.id ORDER BY f.id",
    )
    assert [r[0] for r in rows] == ids
    for (_, blob, landmarks, crop, left, sha), face in zip(rows, faces, strict=True):
        # Exactly the little-endian float32 bytes: no header, no serialiser framing.
        assert bytes(blob) == face.template.astype("<f4").tobytes() and len(blob) == 4 * DIM
        assert [tuple(p) for p in landmarks] == list(face.landmarks)  # float8[n][2], exact
        assert bytes(crop) == face.crop
        assert left == face.box[0] and sha == face.source_sha256
    contract_json, fingerprint, dim = _rows(
        pg_dsn, "SELECT contract_json, fingerprint, dim FROM collections"
    )[0]
    assert ModelContract.from_json(contract_json) == model
    assert fingerprint == model.fingerprint() and dim == DIM
    assert _rows(pg_dsn, "SELECT metadata FROM persons")[0][0] == {"k": [1, 2]}  # jsonb

    types = dict(
        ((r[0], r[1]), r[2:])
        for r in _rows(
            pg_dsn,
            "SELECT table_name, column_name, data_type, is_identity, identity_generation, "
            "collation_name FROM information_schema.columns WHERE table_schema = 'public'",
        )
    )
    for table in ("collections", "persons", "faces"):  # ids are never reused
        assert types[(table, "id")] == ("bigint", "YES", "ALWAYS", None)
    assert types[("faces", "template")][0] == "bytea"
    assert types[("face_crops", "png")][0] == "bytea"
    assert types[("faces", "landmarks")][0] == "ARRAY"
    assert types[("persons", "metadata")][0] == "jsonb"
    assert types[("faces", "created_at")][0] == "timestamp with time zone"
    assert types[("persons", "name")][3] == "C" and types[("collections", "name")][3] == "C"
    storage = dict(
        _rows(
            pg_dsn,
            "SELECT attrelid::regclass::text || '.' || attname, attstorage::text "
            "FROM pg_attribute WHERE attname IN ('template', 'png') AND attnum > 0",
        )
    )
    assert storage == {"faces.template": "m", "face_crops.png": "e"}  # MAIN, EXTERNAL
    meta = dict(_rows(pg_dsn, "SELECT key, value FROM meta"))
    assert meta["format"] == FORMAT and meta["schema_version"] == str(SCHEMA_VERSION)
    stamp = pg.faces(COLLECTION, "ana")[0].created_at
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    pg.check()


def test_nul_characters_are_refused_before_anything_is_written(
    pg: PostgresGallery, model: ModelContract
) -> None:
    with pytest.raises(InvalidInputError, match="NUL"):
        pg.add_person(COLLECTION, "nul", {"note": "a\x00b"})
    face = NewFace(**{**vars(faces_for("nul", 0)[0]), "landmark_scheme": "dlib\x005"})
    with pytest.raises(InvalidInputError, match="NUL"):
        pg.add_faces(COLLECTION, "nul", [face], contract=model)
    assert pg.version(COLLECTION) == 0


# ------------------------------------------------------------------ opening


def test_many_workers_create_one_gallery_at_once(pg_dsn: str) -> None:
    errors: list[BaseException] = []
    opened: list[PostgresGallery] = []
    barrier = threading.Barrier(6)

    def open_it() -> None:
        barrier.wait()
        try:
            opened.append(PostgresGallery(pg_dsn))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(opened) == 6
    for store in opened:
        assert store.list_collections() == []
        store.close()
    assert _rows(pg_dsn, "SELECT count(*) FROM meta WHERE key = 'format'") == [(1,)]


def test_another_applications_database_is_refused_untouched(pg_dsn: str) -> None:
    _rows(pg_dsn, "CREATE TABLE customers (id serial PRIMARY KEY, name text)")
    _rows(pg_dsn, "INSERT INTO customers (name) VALUES ('x')")
    before = _catalog(pg_dsn)
    with pytest.raises(NotAGalleryError, match=r"not a facemetric gallery .*customers"):
        PostgresGallery(pg_dsn)
    assert _catalog(pg_dsn) == before  # nothing created, nothing changed
    # Another application's table called "meta" is not mistaken for a gallery's.
    _rows(pg_dsn, "CREATE SCHEMA shop; CREATE TABLE shop.meta (k int)")
    with pytest.raises(NotAGalleryError, match="meta table"):
        PostgresGallery(pg_dsn, schema="shop")
    # A schema of its own makes the database shareable.
    with PostgresGallery(pg_dsn, schema="faces") as store:
        store.create_collection("c", contract())
    with PostgresGallery(pg_dsn, schema="faces", create=False) as again:
        assert [c.name for c in again.list_collections()] == ["c"]
    assert _rows(pg_dsn, "SELECT count(*) FROM customers") == [(1,)]


def test_newer_or_foreign_schema_is_refused_with_advice(pg: PostgresGallery, pg_dsn: str) -> None:
    pg.close()
    _rows(pg_dsn, "UPDATE meta SET value = %s WHERE key = 'schema_version'",
          (str(SCHEMA_VERSION + 1),))
    with pytest.raises(SchemaTooNewError, match=r"schema version 2.*newer.*Upgrade facemetric"):
        PostgresGallery(pg_dsn)
    _rows(pg_dsn, "UPDATE meta SET value = 'something-else' WHERE key = 'format'")
    with pytest.raises(NotAGalleryError, match="something-else"):
        PostgresGallery(pg_dsn)


def test_missing_database_empty_schema_bad_dsn_and_no_server(
    pg_cluster: PostgresCluster, pg_dsn: str, tmp_path: Path
) -> None:
    with pytest.raises(NotFoundError, match=r"no database nowhere_db .*createdb"):
        PostgresGallery(pg_cluster.dsn("nowhere_db"))
    before = _catalog(pg_dsn)
    with pytest.raises(NotFoundError, match="create=True"):
        PostgresGallery(pg_dsn, create=False)
    assert _catalog(pg_dsn) == before
    with pytest.raises(InvalidInputError, match="connection string"):
        PostgresGallery("host=x dbname")
    with pytest.raises(InvalidInputError, match="timeout"):
        PostgresGallery(pg_dsn, timeout=0)
    # No server there; the password never appears in the message.
    dsn = f"host={tmp_path} port=1 dbname=faces user=app password=s3cret-pw connect_timeout=2"
    with pytest.raises(GalleryError, match="cannot connect to database faces") as caught:
        PostgresGallery(dsn)
    assert "s3cret-pw" not in str(caught.value)


def test_a_database_that_is_not_utf8_is_refused(pg_cluster: PostgresCluster) -> None:
    with pg_cluster.admin() as conn:
        conn.execute(
            "CREATE DATABASE latin TEMPLATE template0 ENCODING 'SQL_ASCII' LOCALE 'C'"
        )
    with pytest.raises(GalleryError, match="needs a UTF8 database"):
        PostgresGallery(pg_cluster.dsn("latin"))


# ------------------------------------------------------------------ connections


def test_a_lost_connection_is_replaced(pg: PostgresGallery, pg_dsn: str, model: ModelContract):
    ids = pg.add_faces(COLLECTION, "kit", faces_for("lost", 0), contract=model)
    # The server ends every session of this store (an administrator, a failover ...).
    terminate = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'facemetric' AND pid <> pg_backend_pid()"
    )
    killed = _rows(pg_dsn, terminate)
    assert killed and all(r[0] for r in killed)
    assert [f.id for f in pg.faces(COLLECTION, "kit")] == ids  # read: retried transparently
    _rows(pg_dsn, terminate)
    # A write whose connection broke before COMMIT is retried on a new one: applied once.
    more = pg.add_faces(COLLECTION, "kit", faces_for("lost", 1)[:1], contract=model)
    assert pg.get_person(COLLECTION, "kit").face_count == len(ids) + len(more)
    assert pg.version(COLLECTION) == 2


def test_a_connection_left_inside_a_transaction_is_never_reused_as_is(
    pg: PostgresGallery, pg_dsn: str
) -> None:
    # As after an interrupt that also broke the ROLLBACK: the thread's connection is still
    # inside a transaction holding an uncommitted row.
    conn = pg._connection()
    conn.execute("BEGIN")
    conn.execute("INSERT INTO meta (key, value) VALUES ('stale', 'x')")
    pg.add_person(COLLECTION, "fresh")  # its own transaction, not a continuation
    assert _rows(pg_dsn, "SELECT count(*) FROM meta WHERE key = 'stale'") == [(0,)]
    assert pg.get_person(COLLECTION, "fresh").name == "fresh"


def test_threads_have_their_own_connections(pg: PostgresGallery, pg_dsn: str) -> None:
    opened, finish = threading.Barrier(5), threading.Barrier(5)

    def sessions() -> int:
        return _rows(
            pg_dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'facemetric'",
        )[0][0]

    def work() -> None:
        pg.version(COLLECTION)
        opened.wait()
        finish.wait()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    opened.wait()
    assert sessions() == 5  # the main thread's and one per worker thread
    finish.wait()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 5
    while sessions() > 1 and time.monotonic() < deadline:  # a finished thread's closes
        time.sleep(0.05)
    assert sessions() == 1
    pg.close()
    while sessions() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == 0  # close() closed the rest


# ------------------------------------------------------------------ notifications


def test_wait_for_change_wakes_on_another_workers_commit(
    pg: PostgresGallery, pg_dsn: str, model: ModelContract
) -> None:
    v0 = pg.version(COLLECTION)
    started = time.monotonic()
    assert pg.wait_for_change(COLLECTION, v0, 0.3) == v0  # nothing happened: times out
    assert 0.25 <= time.monotonic() - started < 2.0

    woke: dict[str, float] = {}

    def waiter() -> None:
        version = pg.wait_for_change(COLLECTION, v0, 20)
        woke["at"], woke["version"] = time.monotonic(), version

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)  # the waiter is listening
    with PostgresGallery(pg_dsn) as other:  # another worker
        other.add_faces(COLLECTION, "nia", faces_for("wake", 0), contract=model)
        committed = time.monotonic()
    thread.join(10)
    assert woke["version"] == v0 + 1
    assert woke["at"] - committed < 1.0  # woken by NOTIFY, not by the 20 s timeout
    # A version already behind returns at once; an unknown collection is an error.
    assert pg.wait_for_change(COLLECTION, v0, 5) == v0 + 1
    with pytest.raises(NotFoundError):
        pg.wait_for_change("nope", 0, 0.1)
    with pytest.raises(InvalidInputError, match="timeout"):
        pg.wait_for_change(COLLECTION, 0, -1)
    payloads = []
    with psycopg.connect(pg_dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        pg.add_person(COLLECTION, "ola")
        payloads = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=1)]
    collection_id = pg.get_collection(COLLECTION).id
    assert payloads == [{"schema": "public", "collection_id": collection_id, "version": v0 + 2}]


# ------------------------------------------------------------------ the staleness bound


class _PixelProjection(torch.nn.Module):
    """A fixed random projection of the mean-centred aligned face: deterministic, and
    different faces get different embeddings."""

    def __init__(self, side: int = 24, dim: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("w", torch.randn(3 * side * side, dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return (x - x.mean(1, keepdim=True)) @ self.w


def _encoder() -> TorchEncoder:
    contract = ModelContract(backbone="pixel_projection", input_size=24, template="arcface112",
                             embedding_size=32, weights_sha256=hashlib.sha256(b"pp").hexdigest())
    return TorchEncoder(_PixelProjection().eval(), contract, channels_last=False)


@pytest.mark.data
def test_an_enrolment_through_one_worker_is_identified_through_another_at_once(
    pg_dsn: str, lfw_root: Path
) -> None:
    """Two recognizers (two workers, two stores, two connections) on one PostgreSQL gallery:
    whatever one enrols is identifiable through the other by the very next search."""
    encoder = _encoder()
    table = ThresholdTable(encoder.contract.fingerprint(),
                           (CalibrationEntry(1e-3, 0.5, 0, 1000),), "test", 1000, 0)
    photos = lfw_root / "lfw-deepfunneled"
    people = [p for p in sorted(photos.iterdir()) if p.is_dir()][:3]
    with PostgresGallery(pg_dsn) as store_a, PostgresGallery(pg_dsn) as store_b:
        enrolling = Recognizer(encoder, store_a, thresholds=table)
        searching = Recognizer(encoder, store_b, thresholds=table)
        for person in people:
            first = sorted(person.glob("*.jpg"))[0]
            before = searching.identify(first, policy="centre").faces[0].candidates
            assert person.name not in [c.person for c in before]
            assert enrolling.enroll(person.name, [first], policy="centre").accepted == 1
            # No sleep, no refresh call: the next search through the other worker sees it.
            found = searching.identify(first, policy="centre").faces[0]
            assert found.candidates[0].person == person.name
            assert found.candidates[0].score == pytest.approx(1.0, abs=1e-5)
            assert person.name in searching.persons
        enrolling.remove(people[0].name)
        assert people[0].name not in searching.persons  # removals propagate the same way
        assert np.isfinite(searching.identify(
            sorted(people[1].glob("*.jpg"))[0], policy="centre").faces[0].candidates[0].score)
