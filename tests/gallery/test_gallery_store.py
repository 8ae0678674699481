"""Every gallery operation against each store — a real SQLite file and a real PostgreSQL
server (the ``store``/``backend`` fixtures): round trips, paging, cascades, contract pinning,
dimension checks, versions and the change log, threads, waiting for other writers."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from gallery_worker import COLLECTION, DIM, contract, faces_for
from store_backends import Backend

from facemetric.gallery import (
    AlreadyExistsError,
    ConcurrentChangeError,
    ContractMismatchError,
    DimensionMismatchError,
    GalleryBusyError,
    GalleryError,
    GalleryStore,
    InvalidInputError,
    NewFace,
    NotFoundError,
)
from facemetric.inference.contract import ModelContract

# ------------------------------------------------------------------ collections


def test_collection_round_trip_and_listing(store: GalleryStore, model: ModelContract) -> None:
    before = datetime.now(UTC)
    other = contract(dim=4, weights="b")
    created = store.create_collection("alpha", other)
    assert created.name == "alpha" and created.contract == other
    assert created.version == 0 and created.person_count == 0 and created.face_count == 0
    assert created.created_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= created.created_at <= datetime.now(UTC)
    assert created.embedding_size == 4

    got = store.get_collection("alpha")
    assert got == created
    assert got.contract.fingerprint() == other.fingerprint()
    assert [c.name for c in store.list_collections()] == ["alpha", COLLECTION]
    main = store.get_collection(COLLECTION)
    assert main.contract == model and main.id != created.id

    with pytest.raises(AlreadyExistsError, match="'alpha' already exists"):
        store.create_collection("alpha", model)
    with pytest.raises(NotFoundError, match="no collection 'nope'"):
        store.get_collection("nope")
    with pytest.raises(InvalidInputError, match="leading or trailing whitespace"):
        store.create_collection(" padded", model)
    with pytest.raises(InvalidInputError, match="ModelContract"):
        store.create_collection("beta", "mobilefacenet")  # type: ignore[arg-type]

    store.delete_collection("alpha")
    assert [c.name for c in store.list_collections()] == [COLLECTION]
    with pytest.raises(NotFoundError):
        store.delete_collection("alpha")
    # The id of a deleted collection is not given to the next one.
    assert store.create_collection("alpha", other).id > created.id


def test_check_contract_pins_the_model(store: GalleryStore, model: ModelContract) -> None:
    assert store.check_contract(COLLECTION, model).name == COLLECTION
    # Same fields, another source (an ONNX export of the checkpoint): same embeddings.
    onnx = dataclasses.replace(model, source="onnx")
    assert store.check_contract(COLLECTION, onnx).name == COLLECTION

    other = ModelContract(
        backbone="iresnet50",
        input_size=112,
        template="arcface112",
        embedding_size=DIM,
        weights_sha256=hashlib.sha256(b"other").hexdigest(),
    )
    with pytest.raises(ContractMismatchError) as caught:
        store.check_contract(COLLECTION, other)
    message = str(caught.value)
    assert "mobilefacenet" in message and "iresnet50" in message
    assert model.fingerprint()[:16] in message and other.fingerprint()[:16] in message
    assert "facemetric gallery reembed" in message and "new collection" in message
    assert caught.value.stored == model and caught.value.given == other


# ------------------------------------------------------------------ persons


def test_person_round_trip_rename_delete(store: GalleryStore) -> None:
    meta = {"employee": 17, "tags": ["night shift"], "note": "née Müller", "ok": True}
    alice = store.add_person(COLLECTION, "alice", meta)
    assert alice.name == "alice" and alice.collection == COLLECTION
    assert alice.metadata == meta and alice.face_count == 0
    assert alice.created_at.tzinfo is not None
    assert store.get_person(COLLECTION, "alice") == alice
    assert store.add_person(COLLECTION, "bob").metadata == {}

    with pytest.raises(AlreadyExistsError, match="'alice' already exists"):
        store.add_person(COLLECTION, "alice")
    with pytest.raises(InvalidInputError, match="JSON-safe"):
        store.add_person(COLLECTION, "carol", {"bad": float("nan")})
    with pytest.raises(InvalidInputError, match="JSON-safe"):
        store.add_person(COLLECTION, "carol", {"bad": object()})
    with pytest.raises(InvalidInputError, match="string keys"):
        store.add_person(COLLECTION, "carol", {1: "x"})  # type: ignore[dict-item]
    with pytest.raises(NotFoundError, match="no collection"):
        store.add_person("nope", "carol")

    renamed = store.rename_person(COLLECTION, "alice", "alicia")
    assert (renamed.id, renamed.name, renamed.metadata) == (alice.id, "alicia", meta)
    with pytest.raises(NotFoundError, match="no person 'alice'"):
        store.get_person(COLLECTION, "alice")
    with pytest.raises(AlreadyExistsError, match="'bob' already exists"):
        store.rename_person(COLLECTION, "alicia", "bob")

    store.delete_person(COLLECTION, "alicia")
    with pytest.raises(NotFoundError):
        store.get_person(COLLECTION, "alicia")
    with pytest.raises(NotFoundError):
        store.delete_person(COLLECTION, "alicia")
    # A new person never gets a deleted person's id.
    assert store.add_person(COLLECTION, "alicia").id > alice.id


def test_list_persons_pages_by_name_with_opaque_cursors(store: GalleryStore) -> None:
    names = [f"p{i:02d}" for i in range(23)]
    for name in np.random.default_rng(0).permutation(names):  # inserted out of order
        store.add_person(COLLECTION, str(name))

    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list_persons(COLLECTION, after=cursor, limit=5)
        seen += [p.name for p in page]
        pages += 1
        if cursor is None:
            break
        assert cursor != page[-1].name  # opaque, not the bare name
    assert seen == names and pages == 5

    # Keyset paging: persons added behind the cursor never shift the next page.
    first, cursor = store.list_persons(COLLECTION, limit=10)
    store.add_person(COLLECTION, "a-first")  # sorts before every page read
    store.add_person(COLLECTION, "p10a")  # sorts into the next page
    second, _ = store.list_persons(COLLECTION, after=cursor, limit=3)
    assert [p.name for p in first][-1] == "p09"
    assert [p.name for p in second] == ["p10", "p10a", "p11"]

    # Exactly `limit` persons left: the page is the last one.
    everyone, last = store.list_persons(COLLECTION, limit=25)
    assert len(everyone) == 25 and last is None
    assert store.list_persons(COLLECTION, limit=24)[1] is not None

    with pytest.raises(InvalidInputError, match="invalid cursor"):
        store.list_persons(COLLECTION, after="p05")
    with pytest.raises(InvalidInputError, match="limit"):
        store.list_persons(COLLECTION, limit=0)
    with pytest.raises(InvalidInputError, match="limit"):
        store.list_persons(COLLECTION, limit=100_000)


def test_names_sort_by_code_point_whatever_the_locale(
    store: GalleryStore, model: ModelContract
) -> None:
    # Linguistic collations (the PostgreSQL test databases use ICU en-US) would give
    # a, B, é, Z, Ω; the contract is code-point order, in listings and in cursors.
    names = ["é", "Z", "a", "B", "Ω", "ab", "a b"]
    for name in names:
        store.add_person(COLLECTION, name)
    assert sorted(names) == ["B", "Z", "a", "a b", "ab", "é", "Ω"]
    page, cursor = store.list_persons(COLLECTION, limit=3)
    assert [p.name for p in page] == ["B", "Z", "a"]
    rest, _ = store.list_persons(COLLECTION, after=cursor, limit=10)
    assert [p.name for p in rest] == ["a b", "ab", "é", "Ω"]
    for name in ("Zeta", "alpha", "Beta"):
        store.create_collection(name, model)
    assert [c.name for c in store.list_collections()] == ["Beta", "Zeta", "alpha", COLLECTION]


# ------------------------------------------------------------------ faces


def test_add_faces_round_trips_every_field(store: GalleryStore, model: ModelContract) -> None:
    faces = faces_for("rt", 1)  # 3 faces
    before = datetime.now(UTC)
    ids = store.add_faces(COLLECTION, "dora", faces, contract=model, metadata={"dept": "qa"})
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3

    person = store.get_person(COLLECTION, "dora")
    assert person.face_count == 3 and person.metadata == {"dept": "qa"}
    stored = store.faces(COLLECTION, "dora")
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
    more = store.add_faces(
        COLLECTION, "dora", faces_for("rt", 2)[:1], contract=model, metadata={"ignored": 1}
    )
    person = store.get_person(COLLECTION, "dora")
    assert person.face_count == 4 and person.metadata == {"dept": "qa"}
    assert more[0] > ids[-1]

    with pytest.raises(NotFoundError, match="create_person=True"):
        store.add_faces(COLLECTION, "erin", faces, contract=model, create_person=False)
    with pytest.raises(InvalidInputError, match="at least one face"):
        store.add_faces(COLLECTION, "erin", [], contract=model)
    with pytest.raises(NotFoundError):
        store.get_person(COLLECTION, "erin")


def test_add_faces_refuses_another_model_and_wrong_dimension(
    store: GalleryStore, model: ModelContract
) -> None:
    version = store.version(COLLECTION)
    with pytest.raises(ContractMismatchError, match="reembed"):
        store.add_faces(COLLECTION, "x", faces_for("c", 0), contract=contract(weights="b"))
    # The contract says D=16; templates of 8 values are refused before anything is written.
    short = NewFace(**{**vars(faces_for("c", 0)[0]), "template": np.ones(8, np.float32)})
    with pytest.raises(DimensionMismatchError, match=r"8 values .* D=16"):
        store.add_faces(COLLECTION, "x", [*faces_for("c", 0), short], contract=model)
    # A contract of another dimension is another model: refused as such.
    with pytest.raises(ContractMismatchError):
        store.add_faces(COLLECTION, "x", [short], contract=contract(dim=8))
    assert store.version(COLLECTION) == version
    with pytest.raises(NotFoundError):
        store.get_person(COLLECTION, "x")


def test_add_faces_is_all_or_nothing(
    store: GalleryStore, backend: Backend, model: ModelContract
) -> None:
    # A trigger (planted from outside) makes the database refuse the third crop of a batch:
    # the person created in the same transaction and the first two faces must vanish too.
    backend.plant_third_crop_failure()
    version = store.version(COLLECTION)
    with pytest.raises(GalleryError, match="disk says no"):
        store.add_faces(COLLECTION, "fay", faces_for("aon", 3), contract=model)  # 5 faces
    with pytest.raises(NotFoundError):
        store.get_person(COLLECTION, "fay")
    assert backend.count("faces") == 0 and backend.count("face_crops") == 0
    assert store.version(COLLECTION) == version
    assert store.changes_since(COLLECTION, version).added == ()


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


def test_find_source_reports_duplicates(store: GalleryStore, model: ModelContract) -> None:
    shared = faces_for("dup", 0)[0]
    ids_g = store.add_faces(COLLECTION, "gil", [shared, *faces_for("dup", 1)], contract=model)
    ids_h = store.add_faces(COLLECTION, "hal", [shared], contract=model)
    hits = store.find_source(COLLECTION, shared.source_sha256.upper())
    assert [(face_id, p.name) for face_id, p in hits] == [(ids_g[0], "gil"), (ids_h[0], "hal")]
    assert store.find_source(COLLECTION, hashlib.sha256(b"never").hexdigest()) == []
    with pytest.raises(InvalidInputError, match="64 hex digits"):
        store.find_source(COLLECTION, "zz" * 32)
    # Another collection does not see them.
    store.create_collection("other", model)
    assert store.find_source("other", shared.source_sha256) == []


def test_remove_faces(store: GalleryStore, backend: Backend, model: ModelContract) -> None:
    ids = store.add_faces(COLLECTION, "ivy", faces_for("rm", 3), contract=model)  # 5 faces
    store.create_collection("other", model)
    foreign = store.add_faces("other", "ivy", faces_for("rm", 0), contract=model)

    with pytest.raises(NotFoundError, match="nothing was removed"):
        store.remove_faces(COLLECTION, [ids[0], foreign[0]])
    with pytest.raises(NotFoundError):
        store.remove_faces(COLLECTION, [max(foreign) + 100])
    assert store.get_person(COLLECTION, "ivy").face_count == 5

    store.remove_faces(COLLECTION, [ids[1], ids[3], ids[1]])
    assert [f.id for f in store.faces(COLLECTION, "ivy")] == [ids[0], ids[2], ids[4]]
    store.remove_faces(COLLECTION, [ids[0], ids[2], ids[4]])
    assert store.get_person(COLLECTION, "ivy").face_count == 0  # the person stays
    assert backend.count("face_crops") == len(foreign)
    with pytest.raises(InvalidInputError, match="positive integers"):
        store.remove_faces(COLLECTION, [True])
    # Face ids are never reused, even the highest one deleted.
    newest = store.add_faces(COLLECTION, "ivy", faces_for("rm", 0)[:1], contract=model)
    assert newest[0] > max(foreign)


def test_cascading_deletes(
    store: GalleryStore, backend: Backend, model: ModelContract
) -> None:
    store.add_faces(COLLECTION, "jo", faces_for("cas", 0), contract=model)  # 2 faces
    store.add_faces(COLLECTION, "kim", faces_for("cas", 1), contract=model)  # 3 faces
    store.create_collection("keep", model)
    store.add_faces("keep", "lu", faces_for("cas", 2), contract=model)  # 4 faces

    store.delete_person(COLLECTION, "jo")
    assert backend.count("faces") == 7 and backend.count("face_crops") == 7
    store.delete_collection(COLLECTION)
    assert backend.count("persons") == 1
    assert backend.count("faces") == 4 and backend.count("face_crops") == 4
    kept = {r[0] for r in backend.query("SELECT DISTINCT collection_id FROM changes")}
    assert kept == {store.get_collection("keep").id}
    assert store.get_person("keep", "lu").face_count == 4


# ------------------------------------------------------------------ bulk reads, re-embedding


def test_templates_and_crops_for_index_and_reembedding(
    store: GalleryStore, model: ModelContract
) -> None:
    empty = store.templates(COLLECTION)
    assert empty.matrix.shape == (0, DIM) and empty.face_ids.shape == (0,)

    enrolled = {}
    for i in range(6):
        faces = faces_for("tpl", i)
        for face_id, face in zip(
            store.add_faces(COLLECTION, f"m{i}", faces, contract=model), faces, strict=True
        ):
            enrolled[face_id] = (store.get_person(COLLECTION, f"m{i}").id, face)
    snap = store.templates(COLLECTION)
    assert snap.version == store.version(COLLECTION) and snap.fingerprint == model.fingerprint()
    assert snap.face_ids.dtype == np.int64 and snap.person_ids.dtype == np.int64
    assert snap.matrix.dtype == np.float32 and snap.matrix.shape == (len(enrolled), DIM)
    assert snap.face_ids.tolist() == sorted(enrolled)
    for row, face_id in enumerate(snap.face_ids.tolist()):
        person_id, face = enrolled[face_id]
        assert snap.person_ids[row] == person_id
        np.testing.assert_array_equal(snap.matrix[row], face.template)

    some = sorted(enrolled)[3:6]
    subset = store.templates(COLLECTION, face_ids=[*some, 10**9])  # absent ids are dropped
    assert subset.face_ids.tolist() == some
    np.testing.assert_array_equal(subset.matrix, snap.matrix[3:6])

    crops = list(store.iter_crops(COLLECTION, batch_size=4))  # several batches
    assert [c.face_id for c in crops] == sorted(enrolled)
    for crop in crops:
        person_id, face = enrolled[crop.face_id]
        assert crop.person_id == person_id and crop.crop == face.crop
        assert crop.landmarks == face.landmarks and crop.landmark_scheme == "arcface5"


def test_replace_templates_reembeds_and_repins(
    store: GalleryStore, model: ModelContract
) -> None:
    for i in range(3):
        store.add_faces(COLLECTION, f"n{i}", faces_for("re", i), contract=model)
    new_model = contract(dim=4, weights="new")
    rng = np.random.default_rng(1)
    new = {
        c.face_id: rng.standard_normal(4).astype(np.float32) for c in store.iter_crops(COLLECTION)
    }
    before = store.get_collection(COLLECTION)

    incomplete = dict(list(new.items())[:-1])
    with pytest.raises(ConcurrentChangeError, match="1 faces have none"):
        store.replace_templates(COLLECTION, new_model, incomplete)
    with pytest.raises(ConcurrentChangeError, match="1 are not in it"):
        store.replace_templates(COLLECTION, new_model, {**new, 10**9: new[min(new)]})
    with pytest.raises(DimensionMismatchError, match="D=4"):
        store.replace_templates(COLLECTION, new_model, {**new, min(new): np.ones(16)})
    assert store.get_collection(COLLECTION) == before  # nothing changed

    after = store.replace_templates(COLLECTION, new_model, new)
    assert after.contract == new_model and after.version == before.version + 1
    snap = store.templates(COLLECTION)
    assert snap.matrix.shape == (len(new), 4) and snap.fingerprint == new_model.fingerprint()
    for row, face_id in enumerate(snap.face_ids.tolist()):
        np.testing.assert_array_equal(snap.matrix[row], new[face_id])
    # The old model is now refused, the new one accepted.
    with pytest.raises(ContractMismatchError):
        store.add_faces(COLLECTION, "n0", faces_for("re", 0), contract=model)
    with pytest.raises(ContractMismatchError):
        store.check_contract(COLLECTION, model)
    store.check_contract(COLLECTION, new_model)
    # An index built before the re-embedding must reload everything.
    assert not store.changes_since(COLLECTION, before.version).complete


# ------------------------------------------------------------------ versions and changes


def test_every_change_bumps_the_version_once(store: GalleryStore, model: ModelContract) -> None:
    versions = [store.version(COLLECTION)]

    def step() -> None:
        versions.append(store.version(COLLECTION))
        assert versions[-1] == versions[-2] + 1

    store.add_person(COLLECTION, "o")
    step()
    ids = store.add_faces(COLLECTION, "o", faces_for("ver", 0), contract=model)
    step()
    store.add_faces(COLLECTION, "p", faces_for("ver", 1), contract=model)  # creates p too
    step()
    store.rename_person(COLLECTION, "o", "q")
    step()
    store.remove_faces(COLLECTION, ids[:1])
    step()
    store.delete_person(COLLECTION, "q")
    step()
    # Reads and refused writes change nothing.
    store.templates(COLLECTION)
    list(store.iter_crops(COLLECTION))
    store.list_persons(COLLECTION)
    with pytest.raises(AlreadyExistsError):
        store.add_person(COLLECTION, "p")
    assert store.version(COLLECTION) == versions[-1]
    # Other collections keep their own versions.
    store.create_collection("other", model)
    assert store.version("other") == 0
    assert store.get_collection(COLLECTION).version == versions[-1]


def test_changes_since(store: GalleryStore, model: ModelContract) -> None:
    v0 = store.version(COLLECTION)
    a = store.add_faces(COLLECTION, "r", faces_for("ch", 0), contract=model)  # 2 faces
    v1 = store.version(COLLECTION)
    b = store.add_faces(COLLECTION, "s", faces_for("ch", 1), contract=model)  # 3 faces
    store.remove_faces(COLLECTION, [a[0], b[0]])
    r, s = store.get_person(COLLECTION, "r"), store.get_person(COLLECTION, "s")

    since0 = store.changes_since(COLLECTION, v0)
    assert since0.complete and since0.version == store.version(COLLECTION)
    assert since0.added == (a[1], b[1], b[2]) and since0.removed == ()  # b[0] came and went
    assert since0.persons == (r.id, s.id)
    since1 = store.changes_since(COLLECTION, v1)
    assert since1.added == (b[1], b[2]) and since1.removed == (a[0],)
    assert since1.persons == (s.id,)
    now = store.changes_since(COLLECTION, since0.version)
    assert now.complete and (now.added, now.removed, now.persons) == ((), (), ())
    assert now.collection_id == store.get_collection(COLLECTION).id

    with pytest.raises(InvalidInputError, match="newer than"):
        store.changes_since(COLLECTION, since0.version + 1)


def test_change_log_is_trimmed_to_its_window(backend: Backend, model: ModelContract) -> None:
    with backend.open(change_log_versions=3) as store:
        store.create_collection(COLLECTION, model)
        for i in range(6):
            store.add_person(COLLECTION, f"t{i}")
        assert store.version(COLLECTION) == 6
        assert not store.changes_since(COLLECTION, 2).complete
        recent = store.changes_since(COLLECTION, 3)
        assert recent.complete and len(recent.persons) == 3
        assert backend.count("changes") == 3


# ------------------------------------------------------------------ threads, locks, lifetime


def test_threads_share_one_gallery(store: GalleryStore, model: ModelContract) -> None:
    errors: list[BaseException] = []
    results: dict[str, list[int]] = {}
    faces = {f"u{t}-{i}": faces_for(f"thr{t}", i) for t in range(4) for i in range(10)}

    def work(t: int) -> None:
        try:
            for i in range(10):
                name = f"u{t}-{i}"
                results[name] = store.add_faces(COLLECTION, name, faces[name], contract=model)
                store.templates(COLLECTION)  # reads interleaved with other threads' writes
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
    snap = store.templates(COLLECTION)
    assert sorted(all_ids) == snap.face_ids.tolist()
    for name in results:
        assert store.get_person(COLLECTION, name).face_count == len(faces[name])
    assert store.version(COLLECTION) == 40  # one version per transaction


def test_waits_for_another_writer_then_gives_up(backend: Backend, model: ModelContract) -> None:
    with backend.open(timeout=0.4) as store:
        store.create_collection(COLLECTION, model)
        with backend.writer_holding_the_lock() as release:  # another process's long write
            started = time.monotonic()
            with pytest.raises(GalleryBusyError, match=r"locked by other writers for 0.4 s"):
                store.add_person(COLLECTION, "v")
            assert 0.35 <= time.monotonic() - started < 3.0  # bounded by the timeout
            assert store.get_collection(COLLECTION).person_count == 0  # readers never wait
            # Released while we wait: the write goes through.
            threading.Timer(0.15, release.set).start()
            assert store.add_person(COLLECTION, "v").name == "v"


def test_close_and_reopen(backend: Backend, model: ModelContract) -> None:
    with backend.open(durable=True) as store:  # SQLite: synchronous=FULL
        store.create_collection(COLLECTION, model)
        ids = store.add_faces(COLLECTION, "w", faces_for("re", 2), contract=model)
    with pytest.raises(GalleryError, match="closed"):
        store.get_collection(COLLECTION)
    store.close()  # idempotent
    with backend.open(create=False) as again:
        assert [f.id for f in again.faces(COLLECTION, "w")] == ids
        assert again.get_collection(COLLECTION).contract == model
        assert again.faces(COLLECTION, "w")[0].crop == faces_for("re", 2)[0].crop


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(
    store: GalleryStore, model: ModelContract
) -> None:
    store.add_person(COLLECTION, "parent")  # the parent's connection is open and used
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's connection
        code = 1
        try:
            store.add_faces(COLLECTION, "child", faces_for("fork", 0), contract=model)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get_person(COLLECTION, "child").face_count == 2
    store.add_person(COLLECTION, "parent-again")  # the parent's connection still works
    store.check()
