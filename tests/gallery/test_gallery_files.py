"""The gallery file itself: what is stored (raw float32, JSON, no pickle), how it is
configured, and refusal of files that are not galleries or are too new."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from gallery_worker import COLLECTION, DIM, faces_for

import facemetric.gallery
from facemetric.gallery import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    GalleryError,
    NotAGalleryError,
    NotFoundError,
    SchemaTooNewError,
    SQLiteGallery,
)
from facemetric.inference.contract import ModelContract

GALLERY_SOURCES = Path(facemetric.gallery.__file__).parent


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_pickle_in_the_gallery_package() -> None:
    sources = sorted(GALLERY_SOURCES.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "store.py", "sqlite.py"}
    forbidden = {"pickle", "cPickle", "_pickle", "dill", "shelve", "joblib", "cloudpickle"}
    for source in sources:
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = {node.func.id} if node.func.id == "__import__" else set()
                assert not names, f"{source.name}:{node.lineno} uses __import__"
            else:
                continue
            assert not names & forbidden, f"{source.name}:{node.lineno} imports {names}"


def test_stored_values_are_raw_float32_and_json(
    gallery: SQLiteGallery, db_path: Path, model: ModelContract
) -> None:
    faces = faces_for("raw", 2)
    ids = gallery.add_faces(COLLECTION, "ana", faces, contract=model, metadata={"k": [1, 2]})
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            "SELECT f.id, f.template, typeof(f.template), f.landmarks_json, c.png "
            "FROM faces f JOIN face_crops c ON c.face_id = f.id ORDER BY f.id"
        ).fetchall()
        contract_json, fingerprint, dim = conn.execute(
            "SELECT contract_json, fingerprint, dim FROM collections WHERE name = ?",
            (COLLECTION,),
        ).fetchone()
        metadata = conn.execute("SELECT metadata_json FROM persons").fetchone()[0]
        stamps = [r[0] for r in conn.execute("SELECT created_at FROM faces")]
    assert [r[0] for r in rows] == ids
    for (_, blob, kind, landmarks, crop), face in zip(rows, faces, strict=True):
        assert kind == "blob" and len(blob) == 4 * DIM
        # Exactly the little-endian float32 bytes: no header, no serialiser framing.
        assert blob == face.template.astype("<f4").tobytes()
        assert json.loads(landmarks) == [list(p) for p in face.landmarks]
        assert crop == face.crop
    assert ModelContract.from_json(contract_json) == model
    assert fingerprint == model.fingerprint() and dim == DIM
    assert json.loads(metadata) == {"k": [1, 2]}
    assert all(s.endswith("+00:00") and "T" in s for s in stamps)  # UTC ISO-8601


def test_file_is_a_versioned_wal_gallery(db_path: Path, model: ModelContract) -> None:
    with SQLiteGallery(db_path) as store:
        store.create_collection(COLLECTION, model)
        with sqlite3.connect(db_path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            autoinc = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'"
            ).fetchone()[0]
        assert meta["format"] == "facemetric-gallery"
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert autoinc == 1  # AUTOINCREMENT: ids are never reused
        store.check()  # integrity_check and foreign_key_check pass


def test_many_threads_create_one_gallery_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "g.db"  # folder created too
    errors: list[BaseException] = []
    opened: list[SQLiteGallery] = []
    barrier = threading.Barrier(4)

    def open_it() -> None:
        barrier.wait()
        try:
            opened.append(SQLiteGallery(path, synchronous="NORMAL"))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(opened) == 4
    for store in opened:
        assert store.list_collections() == []
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM meta WHERE key = 'format'").fetchone()[0] == 1


def test_random_bytes_are_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "noise.db"
    path.write_bytes(np.random.default_rng(0).bytes(8192))
    digest = _digest(path)
    with pytest.raises(NotAGalleryError, match="not an SQLite database"):
        SQLiteGallery(path)
    assert _digest(path) == digest and sorted(os.listdir(tmp_path)) == ["noise.db"]


def test_damaged_sqlite_file_is_refused(tmp_path: Path, model: ModelContract) -> None:
    path = tmp_path / "g.db"
    with SQLiteGallery(path) as store:
        store.create_collection(COLLECTION, model)
    data = bytearray(path.read_bytes())
    data[16:100] = bytes(84)  # valid signature, header wiped
    path.write_bytes(bytes(data))
    with pytest.raises(NotAGalleryError, match="not a facemetric gallery"):
        SQLiteGallery(path)


def test_another_applications_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('x')")
    conn.close()
    digest = _digest(path)
    with pytest.raises(NotAGalleryError, match=r"not a facemetric gallery .*customers"):
        SQLiteGallery(path)
    assert _digest(path) == digest  # not even switched to WAL
    assert sorted(os.listdir(tmp_path)) == ["shop.db"]

    other = tmp_path / "tagged.db"
    with sqlite3.connect(other) as conn:
        conn.execute("PRAGMA application_id = 1234")
    conn.close()
    with pytest.raises(NotAGalleryError, match="0x4d2"):
        SQLiteGallery(other)


def test_newer_schema_is_refused_with_upgrade_advice(db_path: Path, model: ModelContract) -> None:
    with SQLiteGallery(db_path) as store:
        store.create_collection(COLLECTION, model)
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()
    with pytest.raises(SchemaTooNewError, match=r"schema version 2.*newer.*Upgrade facemetric"):
        SQLiteGallery(db_path)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = 'something-else' WHERE key = 'format'")
    conn.close()
    with pytest.raises(NotAGalleryError, match="something-else"):
        SQLiteGallery(db_path)


def test_missing_file_without_create_and_folders(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="create=True"):
        SQLiteGallery(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(NotAGalleryError, match="is a folder"):
        SQLiteGallery(tmp_path)
    with pytest.raises(GalleryError, match="synchronous"):
        SQLiteGallery(tmp_path / "x.db", synchronous="OFF")
