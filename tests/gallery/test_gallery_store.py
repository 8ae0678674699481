"""Every gallery operation against a real SQLite file: round trips, paging, cascades,
contract pinning, dimension checks, versions and the change log."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from gallery_worker import COLLECTION, DIM, contract, faces_for

from facemetric.gallery import (
    AlreadyExistsError,
    ConcurrentChangeError,
    ContractMismatchError,
    DimensionMismatchError,
    GalleryBusyError,
    GalleryError,
    InvalidInputError,
    NewFace,
    NotFoundError,
    SQLiteGallery,
)
from facemetric.inference.contract import ModelContract


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ------------------------------------------------------------------ collections


def test_collection_round_trip_and_listing(gallery: SQLiteGallery, model: ModelContract) -> None:
    before = datetime.now(UTC)
    other = contract(dim=4, weights="b")
    created = gallery.create_collection("alpha", other)
    assert created.name == "alpha" and created.contract == other
    assert created.version == 0 and created.person_count == 0 and created.face_count == 0
    assert created.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= created.created_at <= datetime.now(UTC)
    assert created.embedding_size == 4

    got = gallery.get_collection("alpha")
    assert got == created
    assert got.contract.fingerprint() == other.fingerprint()
    assert [c.name for c in gallery.list_collections()] == ["alpha", COLLECTION]
    main = gallery.get_collection(COLLECTION)
    assert main.contract == model and main.id != created.id

    with pytest.raises(AlreadyExistsError, match="'alpha' already exists"):
        gallery.create_collection("alpha", model)
    with pytest.raises(NotFoundError, match="no collection 'nope'"):
        gallery.get_collection("nope")
    with pytest.raises(InvalidInputError, match="leading or trailing whitespace"):
        gallery.create_collection(" padded", model)
    with pytest.raises(InvalidInputError, match="ModelContract"):
        gallery.create_collection("beta", "mobilefacenet")  # type: ignore[arg-type]

    gallery.delete_collection("alpha")
    assert [c.name for c in gallery.list_collections()] == [COLLECTION]
    with pytest.raises(NotFoundError):
        gallery.delete_collection("alpha")
    # The id of a deleted collection is not given to the next one.
    assert gallery.create_collection("alpha", other).id > created.id


def test_check_contract_pins_the_model(gallery: SQLiteGallery, model: ModelContract) -> None:
    assert gallery.check_contract(COLLECTION, model).name == COLLECTION
    # Same fields, another source (an ONNX export of the checkpoint): same embeddings.
    onnx = dataclasses.replace(model, source="onnx")
    assert gallery.check_contract(COLLECTION, onnx).name == COLLECTION

    other = ModelContract(
        backbone="iresnet50",
        input_size=112,
        template="arcface112",
        embedding_size=DIM,
        weights_sha256=hashlib.sha256(b"other").hexdigest(),
    )
    with pytest.raises(ContractMismatchError) as caught:
        gallery.check_contract(COLLECTION, other)
    message = str(caught.value)
    assert "mobilefacenet" in message and "iresnet50" in message
    assert model.fingerprint()[:16] in message and other.fingerprint()[:16] in message
    assert "facemetric gallery reembed" in message and "new collection" in message
    assert caught.value.stored == model and caught.value.given == other


# ------------------------------------------------------------------ persons


def test_person_round_trip_rename_delete(gallery: SQLiteGallery) -> None:
    meta = {"employee": 17, "tags": ["night shift"], "note": "née Müller", "ok": True}
    alice = gallery.add_person(COLLECTION, "alice", meta)
    assert alice.name == "alice" and alice.collection == COLLECTION
    assert alice.metadata == meta and alice.face_count == 0
    assert alice.created_at.tzinfo is not None
    assert gallery.get_person(COLLECTION, "alice") == alice
    assert gallery.add_person(COLLECTION, "bob").metadata == {}

    with pytest.raises(AlreadyExistsError, match="'alice' already exists"):
        gallery.add_person(COLLECTION, "alice")
    with pytest.raises(InvalidInputError, match="JSON-safe"):
        gallery.add_person(COLLECTION, "carol", {"bad": float("nan")})
    with pytest.raises(InvalidInputError, match="JSON-safe"):
        gallery.add_person(COLLECTION, "carol", {"bad": object()})
    with pytest.raises(InvalidInputError, match="string keys"):
        gallery.add_person(COLLECTION, "carol", {1: "x"})  # type: ignore[dict-item]
    with pytest.raises(NotFoundError, match="no collection"):
        gallery.add_person("nope", "carol")

    renamed = gallery.rename_person(COLLECTION, "alice", "alicia")
    assert (renamed.id, renamed.name, renamed.metadata) == (alice.id, "alicia", meta)
    with pytest.raises(NotFoundError, match="no person 'alice'"):
        gallery.get_person(COLLECTION, "alice")
    with pytest.raises(AlreadyExistsError, match="'bob' already exists"):
        gallery.rename_person(COLLECTION, "alicia", "bob")

    gallery.delete_person(COLLECTION, "alicia")
    with pytest.raises(NotFoundError):
        gallery.get_person(COLLECTION, "alicia")
    with pytest.raises(NotFoundError):
        gallery.delete_person(COLLECTION, "alicia")
    # A new person never gets a deleted person's id.
    assert gallery.add_person(COLLECTION, "alicia").id > alice.id


def test_list_persons_pages_by_name_with_opaque_cursors(gallery: SQLiteGallery) -> None:
    names = [f"p{i:02d}" for i in range(23)]
    for name in np.random.default_rng(0).permutation(names):  # inserted out of order
        gallery.add_person(COLLECTION, str(name))

    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = gallery.list_persons(COLLECTION, after=cursor, limit=5)
        seen += [p.name for p in page]
        pages += 1
        if cursor is None:
            break
        assert cursor != page[-1].name  # opaque, not the bare name
    assert seen == names and pages == 5

    # Keyset paging: persons added behind the cursor never shift the next page.
    first, cursor = gallery.list_persons(COLLECTION, limit=10)
    gallery.add_person(COLLECTION, "a-first")  # sorts before every page read
    gallery.add_person(COLLECTION, "p10a")  # sorts into the next page
    second, _ = gallery.list_persons(COLLECTION, after=cursor, limit=3)
    assert [p.name for p in first][-1] == "p09"
    assert [p.name for p in second] == ["p10", "p10a", "p11"]

    # Exactly `limit` persons left: the page is the last one.
    everyone, last = gallery.list_persons(COLLECTION, limit=25)
    assert len(everyone) == 25 and last is None
    assert gallery.list_persons(COLLECTION, limit=24)[1] is not None

    with pytest.raises(InvalidInputError, match="invalid cursor"):
        gallery.list_persons(COLLECTION, after="p05")
    with pytest.raises(InvalidInputError, match="limit"):
        gallery.list_persons(COLLECTION, limit=0)
    with pytest.raises(InvalidInputError, match="limit"):
        gallery.list_persons(COLLECTION, limit=100_000)


# ------------------------------------------------------------------ faces


def test_add_faces_round_trips_every_field(gallery: SQLiteGallery, model: ModelContract) -> None:
    faces = faces_for("rt", 1)  # 3 faces
    before = datetime.now(UTC)
    ids = gallery.add_faces(COLLECTION, "dora", faces, contract=model, metadata={"dept": "qa"})
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3

    person = gallery.get_person(COLLECTION, "dora")
    assert person.face_count == 3 and person.metadata == {"dept": "qa"}
    stored = gallery.faces(COLLECTION, "dora")
    assert [f.id for f in stored] == ids
    for new, old in zip(faces, stored, strict=True):
        assert old.person_id == person.id
        assert old.template.dtype == np.float32 and old.template.shape == (DIM,)
        np.testing.assert_array_equal(old.template, new.template)
        assert not old.template.flags.writeable
        assert old.crop == new.crop and old.crop.startswith(b"\x89PNG")
        assert old.landmarks == new.landmarks and old.landmark_scheme == "arcface5"
        assert old.box == new.box and old.source_sha256 == new.source_sha256
        assert old.quality == new.quality
        assert before - timedelta(seconds=1) <= old.created_at <= datetime.now(UTC)

    # Adding to an existing person keeps its metadata, appends faces.
    more = gallery.add_faces(
        COLLECTION, "dora", faces_for("rt", 2)[:1], contract=model, metadata={"ignored": 1}
    )
    person = gallery.get_person(COLLECTION, "dora")
    assert person.face_count == 4 and person.metadata == {"dept": "qa"}
    assert more[0] > ids[-1]

    with pytest.raises(NotFoundError, match="create_person=True"):
        gallery.add_faces(COLLECTION, "erin", faces, contract=model, create_person=False)
    with pytest.raises(InvalidInputError, match="at least one face"):
        gallery.add_faces(COLLECTION, "erin", [], contract=model)
    with pytest.raises(NotFoundError):
        gallery.get_person(COLLECTION, "erin")


def test_add_faces_refuses_another_model_and_wrong_dimension(
    gallery: SQLiteGallery, model: ModelContract
) -> None:
    version = gallery.version(COLLECTION)
    with pytest.raises(ContractMismatchError, match="reembed"):
        gallery.add_faces(COLLECTION, "x", faces_for("c", 0), contract=contract(weights="b"))
    # The contract says D=16; templates of 8 values are refused before anything is written.
    short = NewFace(**{**vars(faces_for("c", 0)[0]), "template": np.ones(8, np.float32)})
    with pytest.raises(DimensionMismatchError, match=r"8 values .* D=16"):
        gallery.add_faces(COLLECTION, "x", [*faces_for("c", 0), short], contract=model)
    # A contract of another dimension is another model: refused as such.
    with pytest.raises(ContractMismatchError):
        gallery.add_faces(COLLECTION, "x", [short], contract=contract(dim=8))
    assert gallery.version(COLLECTION) == version
    with pytest.raises(NotFoundError):
        gallery.get_person(COLLECTION, "x")


def test_add_faces_is_all_or_nothing(
    gallery: SQLiteGallery, db_path: Path, model: ModelContract
) -> None:
    # A trigger (planted from outside) makes the database refuse the third crop of a batch:
    # the person created in the same transaction and the first two faces must vanish too.
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER third_crop_fails BEFORE INSERT ON face_crops "
            "WHEN (SELECT count(*) FROM face_crops) >= 2 "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    version = gallery.version(COLLECTION)
    with pytest.raises(GalleryError, match="disk says no"):
        gallery.add_faces(COLLECTION, "fay", faces_for("aon", 3), contract=model)  # 5 faces
    with pytest.raises(NotFoundError):
        gallery.get_person(COLLECTION, "fay")
    assert _count(db_path, "faces") == 0 and _count(db_path, "face_crops") == 0
    assert gallery.version(COLLECTION) == version
    assert gallery.changes_since(COLLECTION, version).added == ()


def test_new_face_validation() -> None:
    good = vars(faces_for("v", 0)[0])
    cases = {
        "template": (np.ones((2, 8), np.float32), "1-D"),
        "crop": (b"GIF89a....", "not a PNG"),
        "landmarks": ([], "landmarks"),
        "landmark_scheme": ("", "landmark_scheme"),
        "box": ((10, 10, 5, 20), "left < right"),
        "source_sha256": ("abc", "64 hex digits"),
        "quality": (float("inf"), "finite"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            NewFace(**{**good, name: value})
    with pytest.raises(InvalidInputError, match="NaN"):
        NewFace(**{**good, "template": np.full(8, np.nan)})
    with pytest.raises(InvalidInputError, match="floats"):
        NewFace(**{**good, "template": np.ones(8, np.int64)})
    # float64 input is stored as a private read-only float32 copy.
    source = np.linspace(0, 1, DIM)
    face = NewFace(**{**good, "template": source, "source_sha256": good["source_sha256"].upper()})
    source[0] = 5.0
    assert face.template.dtype == np.float32 and face.template[0] == 0.0
    assert not face.template.flags.writeable
    assert face.source_sha256 == good["source_sha256"]


def test_find_source_reports_duplicates(gallery: SQLiteGallery, model: ModelContract) -> None:
    shared = faces_for("dup", 0)[0]
    ids_g = gallery.add_faces(COLLECTION, "gil", [shared, *faces_for("dup", 1)], contract=model)
    ids_h = gallery.add_faces(COLLECTION, "hal", [shared], contract=model)
    hits = gallery.find_source(COLLECTION, shared.source_sha256.upper())
    assert [(face_id, p.name) for face_id, p in hits] == [(ids_g[0], "gil"), (ids_h[0], "hal")]
    assert gallery.find_source(COLLECTION, hashlib.sha256(b"never").hexdigest()) == []
    with pytest.raises(InvalidInputError, match="64 hex digits"):
        gallery.find_source(COLLECTION, "zz" * 32)
    # Another collection does not see them.
    gallery.create_collection("other", model)
    assert gallery.find_source("other", shared.source_sha256) == []


def test_remove_faces(gallery: SQLiteGallery, db_path: Path, model: ModelContract) -> None:
    ids = gallery.add_faces(COLLECTION, "ivy", faces_for("rm", 3), contract=model)  # 5 faces
    gallery.create_collection("other", model)
    foreign = gallery.add_faces("other", "ivy", faces_for("rm", 0), contract=model)

    with pytest.raises(NotFoundError, match="nothing was removed"):
        gallery.remove_faces(COLLECTION, [ids[0], foreign[0]])
    with pytest.raises(NotFoundError):
        gallery.remove_faces(COLLECTION, [max(foreign) + 100])
    assert gallery.get_person(COLLECTION, "ivy").face_count == 5

    gallery.remove_faces(COLLECTION, [ids[1], ids[3], ids[1]])
    assert [f.id for f in gallery.faces(COLLECTION, "ivy")] == [ids[0], ids[2], ids[4]]
    gallery.remove_faces(COLLECTION, [ids[0], ids[2], ids[4]])
    assert gallery.get_person(COLLECTION, "ivy").face_count == 0  # the person stays
    assert _count(db_path, "face_crops") == len(foreign)
    with pytest.raises(InvalidInputError, match="positive integers"):
        gallery.remove_faces(COLLECTION, [True])
    # Face ids are never reused, even the highest one deleted.
    newest = gallery.add_faces(COLLECTION, "ivy", faces_for("rm", 0)[:1], contract=model)
    assert newest[0] > max(foreign)


def test_cascading_deletes(gallery: SQLiteGallery, db_path: Path, model: ModelContract) -> None:
    gallery.add_faces(COLLECTION, "jo", faces_for("cas", 0), contract=model)  # 2 faces
    gallery.add_faces(COLLECTION, "kim", faces_for("cas", 1), contract=model)  # 3 faces
    gallery.create_collection("keep", model)
    gallery.add_faces("keep", "lu", faces_for("cas", 2), contract=model)  # 4 faces

    gallery.delete_person(COLLECTION, "jo")
    assert _count(db_path, "faces") == 7 and _count(db_path, "face_crops") == 7
    gallery.delete_collection(COLLECTION)
    assert _count(db_path, "persons") == 1
    assert _count(db_path, "faces") == 4 and _count(db_path, "face_crops") == 4
    with sqlite3.connect(db_path) as conn:
        kept = {r[0] for r in conn.execute("SELECT DISTINCT collection_id FROM changes")}
    assert kept == {gallery.get_collection("keep").id}
    assert gallery.get_person("keep", "lu").face_count == 4


# ------------------------------------------------------------------ bulk reads, re-embedding


def test_templates_and_crops_for_index_and_reembedding(
    gallery: SQLiteGallery, model: ModelContract
) -> None:
    empty = gallery.templates(COLLECTION)
    assert empty.matrix.shape == (0, DIM) and empty.face_ids.shape == (0,)

    enrolled = {}
    for i in range(6):
        faces = faces_for("tpl", i)
        for face_id, face in zip(
            gallery.add_faces(COLLECTION, f"m{i}", faces, contract=model), faces, strict=True
        ):
            enrolled[face_id] = (gallery.get_person(COLLECTION, f"m{i}").id, face)
    snap = gallery.templates(COLLECTION)
    assert snap.version == gallery.version(COLLECTION) and snap.fingerprint == model.fingerprint()
    assert snap.face_ids.dtype == np.int64 and snap.person_ids.dtype == np.int64
    assert snap.matrix.dtype == np.float32 and snap.matrix.shape == (len(enrolled), DIM)
    assert snap.face_ids.tolist() == sorted(enrolled)
    for row, face_id in enumerate(snap.face_ids.tolist()):
        person_id, face = enrolled[face_id]
        assert snap.person_ids[row] == person_id
        np.testing.assert_array_equal(snap.matrix[row], face.template)

    some = sorted(enrolled)[3:6]
    subset = gallery.templates(COLLECTION, face_ids=[*some, 10**9])  # absent ids are dropped
    assert subset.face_ids.tolist() == some
    np.testing.assert_array_equal(subset.matrix, snap.matrix[3:6])

    crops = list(gallery.iter_crops(COLLECTION, batch_size=4))  # several batches
    assert [c.face_id for c in crops] == sorted(enrolled)
    for crop in crops:
        person_id, face = enrolled[crop.face_id]
        assert crop.person_id == person_id and crop.crop == face.crop
        assert crop.landmarks == face.landmarks and crop.landmark_scheme == "arcface5"


def test_replace_templates_reembeds_and_repins(
    gallery: SQLiteGallery, model: ModelContract
) -> None:
    for i in range(3):
        gallery.add_faces(COLLECTION, f"n{i}", faces_for("re", i), contract=model)
    new_model = contract(dim=4, weights="new")
    rng = np.random.default_rng(1)
    new = {
        c.face_id: rng.standard_normal(4).astype(np.float32) for c in gallery.iter_crops(COLLECTION)
    }
    before = gallery.get_collection(COLLECTION)

    incomplete = dict(list(new.items())[:-1])
    with pytest.raises(ConcurrentChangeError, match="1 faces have none"):
        gallery.replace_templates(COLLECTION, new_model, incomplete)
    with pytest.raises(ConcurrentChangeError, match="1 are not in it"):
        gallery.replace_templates(COLLECTION, new_model, {**new, 10**9: new[min(new)]})
    with pytest.raises(DimensionMismatchError, match="D=4"):
        gallery.replace_templates(COLLECTION, new_model, {**new, min(new): np.ones(16)})
    assert gallery.get_collection(COLLECTION) == before  # nothing changed

    after = gallery.replace_templates(COLLECTION, new_model, new)
    assert after.contract == new_model and after.version == before.version + 1
    snap = gallery.templates(COLLECTION)
    assert snap.matrix.shape == (len(new), 4) and snap.fingerprint == new_model.fingerprint()
    for row, face_id in enumerate(snap.face_ids.tolist()):
        np.testing.assert_array_equal(snap.matrix[row], new[face_id])
    # The old model is now refused, the new one accepted.
    with pytest.raises(ContractMismatchError):
        gallery.add_faces(COLLECTION, "n0", faces_for("re", 0), contract=model)
    with pytest.raises(ContractMismatchError):
        gallery.check_contract(COLLECTION, model)
    gallery.check_contract(COLLECTION, new_model)
    # An index built before the re-embedding must reload everything.
    assert not gallery.changes_since(COLLECTION, before.version).complete


# ------------------------------------------------------------------ versions and changes


def test_every_change_bumps_the_version_once(gallery: SQLiteGallery, model: ModelContract) -> None:
    versions = [gallery.version(COLLECTION)]

    def step() -> None:
        versions.append(gallery.version(COLLECTION))
        assert versions[-1] == versions[-2] + 1

    gallery.add_person(COLLECTION, "o")
    step()
    ids = gallery.add_faces(COLLECTION, "o", faces_for("ver", 0), contract=model)
    step()
    gallery.add_faces(COLLECTION, "p", faces_for("ver", 1), contract=model)  # creates p too
    step()
    gallery.rename_person(COLLECTION, "o", "q")
    step()
    gallery.remove_faces(COLLECTION, ids[:1])
    step()
    gallery.delete_person(COLLECTION, "q")
    step()
    # Reads and refused writes change nothing.
    gallery.templates(COLLECTION)
    list(gallery.iter_crops(COLLECTION))
    gallery.list_persons(COLLECTION)
    with pytest.raises(AlreadyExistsError):
        gallery.add_person(COLLECTION, "p")
    assert gallery.version(COLLECTION) == versions[-1]
    # Other collections keep their own versions.
    gallery.create_collection("other", model)
    assert gallery.version("other") == 0
    assert gallery.get_collection(COLLECTION).version == versions[-1]


def test_changes_since(gallery: SQLiteGallery, model: ModelContract) -> None:
    v0 = gallery.version(COLLECTION)
    a = gallery.add_faces(COLLECTION, "r", faces_for("ch", 0), contract=model)  # 2 faces
    v1 = gallery.version(COLLECTION)
    b = gallery.add_faces(COLLECTION, "s", faces_for("ch", 1), contract=model)  # 3 faces
    gallery.remove_faces(COLLECTION, [a[0], b[0]])
    r, s = gallery.get_person(COLLECTION, "r"), gallery.get_person(COLLECTION, "s")

    since0 = gallery.changes_since(COLLECTION, v0)
    assert since0.complete and since0.version == gallery.version(COLLECTION)
    assert since0.added == (a[1], b[1], b[2]) and since0.removed == ()  # b[0] came and went
    assert since0.persons == (r.id, s.id)
    since1 = gallery.changes_since(COLLECTION, v1)
    assert since1.added == (b[1], b[2]) and since1.removed == (a[0],)
    assert since1.persons == (s.id,)
    now = gallery.changes_since(COLLECTION, since0.version)
    assert now.complete and (now.added, now.removed, now.persons) == ((), (), ())
    assert now.collection_id == gallery.get_collection(COLLECTION).id

    with pytest.raises(InvalidInputError, match="newer than"):
        gallery.changes_since(COLLECTION, since0.version + 1)


def test_change_log_is_trimmed_to_its_window(db_path: Path, model: ModelContract) -> None:
    with SQLiteGallery(db_path, synchronous="NORMAL", change_log_versions=3) as store:
        store.create_collection(COLLECTION, model)
        for i in range(6):
            store.add_person(COLLECTION, f"t{i}")
        assert store.version(COLLECTION) == 6
        assert not store.changes_since(COLLECTION, 2).complete
        recent = store.changes_since(COLLECTION, 3)
        assert recent.complete and len(recent.persons) == 3
        assert _count(db_path, "changes") == 3


# ------------------------------------------------------------------ threads, locks, lifetime


def test_threads_share_one_gallery(gallery: SQLiteGallery, model: ModelContract) -> None:
    errors: list[BaseException] = []
    results: dict[str, list[int]] = {}
    faces = {f"u{t}-{i}": faces_for(f"thr{t}", i) for t in range(4) for i in range(10)}

    def work(t: int) -> None:
        try:
            for i in range(10):
                name = f"u{t}-{i}"
                results[name] = gallery.add_faces(COLLECTION, name, faces[name], contract=model)
                gallery.templates(COLLECTION)  # reads interleaved with other threads' writes
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    all_ids = [i for ids in results.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == sum(len(f) for f in faces.values())
    snap = gallery.templates(COLLECTION)
    assert sorted(all_ids) == snap.face_ids.tolist()
    for name in results:
        assert gallery.get_person(COLLECTION, name).face_count == len(faces[name])
    assert gallery.version(COLLECTION) == 40  # one version per transaction


def test_waits_for_another_writer_then_gives_up(db_path: Path, model: ModelContract) -> None:
    with SQLiteGallery(db_path, synchronous="NORMAL", timeout=0.4) as store:
        store.create_collection(COLLECTION, model)
        holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
        try:
            started = time.monotonic()
            with pytest.raises(GalleryBusyError, match=r"locked by other writers for 0.4 s"):
                store.add_person(COLLECTION, "v")
            assert 0.35 <= time.monotonic() - started < 3.0  # bounded by the timeout
            assert store.get_collection(COLLECTION).person_count == 0  # readers never wait
            # Released while we wait: the write goes through.
            threading.Timer(0.15, lambda: holder.execute("ROLLBACK")).start()
            assert store.add_person(COLLECTION, "v").name == "v"
        finally:
            holder.close()


def test_close_and_reopen(db_path: Path, model: ModelContract) -> None:
    with SQLiteGallery(db_path) as store:  # default synchronous=FULL
        store.create_collection(COLLECTION, model)
        ids = store.add_faces(COLLECTION, "w", faces_for("re", 2), contract=model)
    with pytest.raises(GalleryError, match="closed"):
        store.get_collection(COLLECTION)
    store.close()  # idempotent
    with SQLiteGallery(db_path, create=False) as again:
        assert [f.id for f in again.faces(COLLECTION, "w")] == ids
        assert again.get_collection(COLLECTION).contract == model
        assert again.faces(COLLECTION, "w")[0].crop == faces_for("re", 2)[0].crop


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(
    gallery: SQLiteGallery, model: ModelContract
) -> None:
    gallery.add_person(COLLECTION, "parent")  # the parent's connection is open and used
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's SQLite connection
        code = 1
        try:
            gallery.add_faces(COLLECTION, "child", faces_for("fork", 0), contract=model)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert gallery.get_person(COLLECTION, "child").face_count == 2
    gallery.add_person(COLLECTION, "parent-again")  # the parent's connection still works
    gallery.check()
