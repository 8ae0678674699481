"""Real processes on one PostgreSQL gallery: four workers enrolling into one collection at
once while a follower tracks every version through notifications and the change log, and
``kill -9`` of a writer in the middle of its transaction (see ``gallery_worker.py`` for the
workers' protocol)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
import psycopg
import pytest
from gallery_worker import COLLECTION, contract, face_count, faces_for
from test_gallery_processes import _expect_line, _records, _worker

from facemetric.gallery import GalleryBusyError, NotFoundError, PostgresGallery

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def _rows(dsn: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return list(conn.execute(statement, args).fetchall())


class _Follower(threading.Thread):
    """Another worker's view: waits for each change (NOTIFY), applies ``changes_since`` to
    its own set of face ids, and checks every step."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.steps: list[tuple[int, int, int]] = []  # (since, version, added)
        self.faces: set[int] = set()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with PostgresGallery(self.dsn) as store:
                version = 0
                while not self.stop.is_set():
                    store.wait_for_change(COLLECTION, version, 0.5)
                    changes = store.changes_since(COLLECTION, version)
                    if changes.version == version:
                        continue
                    assert changes.complete and changes.version > version
                    assert changes.removed == () and not set(changes.added) & self.faces
                    # Everything the log announces is readable in the store.
                    got = store.templates(COLLECTION, face_ids=list(changes.added))
                    assert got.face_ids.tolist() == list(changes.added)
                    self.faces |= set(changes.added)
                    self.steps.append((version, changes.version, len(changes.added)))
                    version = changes.version
        except BaseException as err:  # reported by the test
            self.errors.append(err)


def test_four_processes_enrol_at_once_and_a_follower_sees_every_version(pg_dsn: str) -> None:
    with PostgresGallery(pg_dsn) as store:
        store.create_collection(COLLECTION, contract())
    workers, count, shared = ("a", "b", "c", "d"), 40, 12
    follower = _Follower(pg_dsn)
    follower.start()
    options = ("--wait-go", "--shared", str(shared))
    with (
        _worker(pg_dsn, "a", count, *options) as a,
        _worker(pg_dsn, "b", count, *options) as b,
        _worker(pg_dsn, "c", count, *options) as c,
        _worker(pg_dsn, "d", count, *options) as d,
    ):
        procs = dict(zip(workers, (a, b, c, d), strict=True))
        for proc in procs.values():
            _expect_line(proc, "ready")
        for proc in procs.values():  # all start enrolling at the same moment
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = {w: proc.communicate(timeout=80) for w, proc in procs.items()}
    for w, proc in procs.items():
        out, err = outputs[w]
        assert proc.returncode == 0 and out.splitlines()[-1] == "done", err[-2000:]
    records = {w: _records(outputs[w][0]) for w in workers}
    assert all(len(r) == count + shared for r in records.values())
    transactions = len(workers) * (count + shared)

    # They really ran at the same time: every worker committed before another finished.
    spans = [(r[0]["t"], r[-1]["t"]) for r in records.values()]
    assert max(s for s, _ in spans) < min(e for _, e in spans)

    ids = [i for r in records.values() for rec in r for i in rec["ids"]]
    assert len(ids) == len(set(ids))  # no id handed out twice
    assert len(ids) == len(workers) * (sum(face_count(i) for i in range(count)) + shared)

    with PostgresGallery(pg_dsn, create=False) as store:
        snap = store.templates(COLLECTION)
        assert snap.face_ids.tolist() == sorted(ids)  # nothing lost, nothing extra
        assert snap.version == transactions  # one version per transaction
        assert store.get_collection(COLLECTION).person_count == len(workers) * count + shared
        for k in range(shared):  # created by whichever came first, extended by the others
            assert store.get_person(COLLECTION, f"shared{k:04d}").face_count == len(workers)
        row = {face_id: r for r, face_id in enumerate(snap.face_ids.tolist())}
        for w in workers:
            for i, record in enumerate(records[w][:count]):
                person = store.get_person(COLLECTION, record["person"])
                assert person.face_count == face_count(i)
                for face_id, face in zip(record["ids"], faces_for(w, i), strict=True):
                    assert snap.person_ids[row[face_id]] == person.id
                    np.testing.assert_array_equal(snap.matrix[row[face_id]], face.template)
        full = store.changes_since(COLLECTION, 0)
        assert full.complete and list(full.added) == sorted(ids)
        store.check()

    # The change log: versions 1..N, each holding exactly one transaction's faces.
    logged: dict[int, set[int]] = defaultdict(set)
    for version, item in _rows(
        pg_dsn, "SELECT version, item_id FROM changes WHERE kind = 'face_added'"
    ):
        logged[version].add(item)
    assert sorted(logged) == list(range(1, transactions + 1))
    batches = sorted(sorted(rec["ids"]) for r in records.values() for rec in r)
    assert sorted(sorted(v) for v in logged.values()) == batches

    # The follower saw strictly increasing versions, never a gap in the log, and ends
    # with exactly the store's faces.
    deadline = time.monotonic() + 10
    while (not follower.steps or follower.steps[-1][1] < transactions) and (
        time.monotonic() < deadline and not follower.errors
    ):
        time.sleep(0.05)
    follower.stop.set()
    follower.join(5)
    assert follower.errors == []
    assert follower.faces == set(ids)
    versions = [v for _, v, _ in follower.steps]
    assert len(versions) > 1  # it followed the enrolment as it went, not only at the end
    assert versions == sorted(set(versions)) and versions[-1] == transactions
    assert all(since == prev for (since, _, _), prev in
               zip(follower.steps[1:], versions[:-1], strict=True))


def _check_complete_or_absent(dsn: str, count: int, prefix: str) -> set[int]:
    """Every person of the enrolment either has all its faces, exactly as enrolled, or is
    absent; returns the indices present."""
    present = set()
    with PostgresGallery(dsn, create=False) as store:
        for i in range(count):
            try:
                stored = store.faces(COLLECTION, f"{prefix}{i:04d}")
            except NotFoundError:
                continue
            present.add(i)
            expected = faces_for(prefix, i, side=48)
            assert len(stored) == len(expected), f"person {i} half-enrolled"
            for got, want in zip(stored, expected, strict=True):
                np.testing.assert_array_equal(got.template, want.template)
                assert got.crop == want.crop and got.source_sha256 == want.source_sha256
        store.check()
    return present


def _backend(dsn: str, application: str) -> list[tuple[Any, ...]]:
    return _rows(
        dsn,
        "SELECT pid, state, backend_xid IS NOT NULL FROM pg_stat_activity "
        "WHERE application_name = %s",
        (application,),
    )


def test_kill_9_of_a_writer_mid_transaction_then_resume(pg_dsn: str) -> None:
    with PostgresGallery(pg_dsn) as store:
        store.create_collection(COLLECTION, contract())
    count, stall = 30, 10
    options = ("--side", "48")  # ~7 kB crops

    # 1. Killed while stalled inside person 10's transaction, its faces and crops inserted.
    with _worker(pg_dsn, "p", count, *options, "--stall-at", str(stall)) as proc:
        _expect_line(proc, "ready")
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "stalled":
                break
        else:
            pytest.fail("the worker ended without stalling")
        # The server holds the worker's open transaction, which has written rows.
        [(backend_pid, state, wrote)] = _backend(pg_dsn, "facemetric-worker-p")
        assert state == "idle in transaction" and wrote
        with PostgresGallery(pg_dsn, timeout=0.5) as other:
            # Readers are not blocked and do not see the uncommitted person ...
            assert other.version(COLLECTION) == stall
            with pytest.raises(NotFoundError):
                other.get_person(COLLECTION, f"p{stall:04d}")
            # ... while writers of the collection wait for its lock.
            with pytest.raises(GalleryBusyError, match="locked by other writers"):
                other.add_person(COLLECTION, "meanwhile")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    # The server notices the dead client and rolls its transaction back.
    deadline = time.monotonic() + 10
    while _backend(pg_dsn, "facemetric-worker-p") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _backend(pg_dsn, "facemetric-worker-p") == []
    assert _rows(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                 (backend_pid,)) == [(0,)]
    present = _check_complete_or_absent(pg_dsn, count, "p")
    assert present == set(range(stall))
    with PostgresGallery(pg_dsn, create=False) as store:
        assert store.version(COLLECTION) == stall  # the killed transaction left no version
        assert _rows(pg_dsn, "SELECT max(version) FROM changes") == [(stall,)]
        store.add_person(COLLECTION, "meanwhile")  # the lock is free again

    # 2. Re-run: skips the complete persons, enrols the rest.
    with _worker(pg_dsn, "p", count, *options) as proc:
        out, err = proc.communicate(timeout=80)
    assert proc.returncode == 0 and out.splitlines()[-1] == "done", err[-2000:]
    begun = [int(line.split()[1]) for line in out.splitlines() if line.startswith("begin")]
    assert begun == list(range(len(present), count))  # nothing enrolled twice
    assert _check_complete_or_absent(pg_dsn, count, "p") == set(range(count))
    with PostgresGallery(pg_dsn, create=False) as store:
        snap = store.templates(COLLECTION)
        assert len(snap.face_ids) == sum(face_count(i) for i in range(count))
        assert len(set(snap.face_ids.tolist())) == len(snap.face_ids)
        assert snap.version == count + 1  # 30 persons and "meanwhile"
        changes = store.changes_since(COLLECTION, 0)
        assert changes.complete and list(changes.added) == snap.face_ids.tolist()
