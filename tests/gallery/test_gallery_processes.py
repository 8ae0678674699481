"""Real processes on one gallery file: two concurrent enrolments, and kill -9 in the middle
of a bulk enrolment (see ``gallery_worker.py`` for the worker's protocol)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from gallery_worker import COLLECTION, contract, face_count, faces_for

from facemetric.gallery import NotFoundError, SQLiteGallery

WORKER = Path(__file__).with_name("gallery_worker.py")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")


@contextmanager
def _worker(db: Path, prefix: str, count: int, *options: str) -> Iterator[subprocess.Popen[str]]:
    """A worker process, killed by a watchdog if it outlives 90 s (a hung test)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(db), prefix, str(count), *options],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(90, proc.kill)
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _expect_line(proc: subprocess.Popen[str], wanted: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != wanted:
        err = proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
        pytest.fail(f"worker said {line!r}, expected {wanted!r}; stderr: {err[-2000:]}")


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        result = conn.execute("PRAGMA integrity_check").fetchall()
    conn.close()
    return ",".join(r[0] for r in result)


def _new_gallery(db: Path) -> None:
    with SQLiteGallery(db) as store:
        store.create_collection(COLLECTION, contract())


def test_two_processes_enrol_at_once(tmp_path: Path) -> None:
    db = tmp_path / "gallery.db"
    _new_gallery(db)
    count, shared = 200, 20
    # synchronous=NORMAL only to keep the test fast: locking and atomicity do not depend on
    # it (it only decides whether each commit waits for an fsync).
    options = ("--wait-go", "--shared", str(shared), "--sync", "NORMAL")
    with _worker(db, "a", count, *options) as a, _worker(db, "b", count, *options) as b:
        _expect_line(a, "ready")
        _expect_line(b, "ready")
        for proc in (a, b):  # both start enrolling at the same moment
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out_a, err_a = a.communicate(timeout=80)
        out_b, err_b = b.communicate(timeout=80)
    assert a.returncode == 0 and out_a.splitlines()[-1] == "done", err_a[-2000:]
    assert b.returncode == 0 and out_b.splitlines()[-1] == "done", err_b[-2000:]
    rec_a, rec_b = _records(out_a), _records(out_b)
    assert len(rec_a) == len(rec_b) == count + shared

    # The two really ran at the same time: their commits interleave.
    times_a, times_b = [r["t"] for r in rec_a], [r["t"] for r in rec_b]
    assert max(times_a[0], times_b[0]) < min(times_a[-1], times_b[-1])

    ids_a = [i for r in rec_a for i in r["ids"]]
    ids_b = [i for r in rec_b for i in r["ids"]]
    assert not set(ids_a) & set(ids_b)
    assert len(set(ids_a)) == len(ids_a) and len(set(ids_b)) == len(ids_b)
    expected_faces = 2 * (sum(face_count(i) for i in range(count)) + shared)
    assert len(ids_a) + len(ids_b) == expected_faces

    with SQLiteGallery(db, create=False) as store:
        snap = store.templates(COLLECTION)
        assert snap.face_ids.tolist() == sorted(ids_a + ids_b)  # nothing lost, nothing extra
        assert snap.version == 2 * (count + shared)  # one version per transaction
        assert store.get_collection(COLLECTION).person_count == 2 * count + shared
        row = {face_id: r for r, face_id in enumerate(snap.face_ids.tolist())}
        for prefix, records in (("a", rec_a), ("b", rec_b)):
            for i, record in enumerate(records[:count]):
                person = store.get_person(COLLECTION, record["person"])
                assert person.face_count == face_count(i)
                for face_id, face in zip(record["ids"], faces_for(prefix, i), strict=True):
                    assert snap.person_ids[row[face_id]] == person.id
                    np.testing.assert_array_equal(snap.matrix[row[face_id]], face.template)
        for k in range(shared):  # created by whichever came first, extended by the other
            assert store.get_person(COLLECTION, f"shared{k:04d}").face_count == 2
        store.check()
    assert _integrity(db) == "ok"


def _uncommitted_wal_frames(db: Path) -> int:
    """Frames after the last commit frame of the WAL's current generation: pages of a
    transaction that was written to disk but never committed."""
    wal = Path(f"{db}-wal").read_bytes()
    if len(wal) < 32:
        return 0
    page_size = struct.unpack(">I", wal[8:12])[0]
    salts = wal[16:24]
    frames, pending = 32, 0
    while frames + 24 + page_size <= len(wal):
        header = wal[frames : frames + 24]
        if header[8:16] != salts:
            break  # a frame of an earlier generation
        commit_size = struct.unpack(">I", header[4:8])[0]
        pending = 0 if commit_size else pending + 1
        frames += 24 + page_size
    return pending


def _check_complete_or_absent(db: Path, count: int, prefix: str) -> set[int]:
    """Every person of the enrolment either has all its faces, exactly as enrolled, or is
    absent; returns the indices present."""
    assert _integrity(db) == "ok"
    present = set()
    with SQLiteGallery(db, create=False) as store:
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


def test_kill_9_during_bulk_enrolment_then_resume(tmp_path: Path) -> None:
    db = tmp_path / "gallery.db"
    _new_gallery(db)
    count, stall = 36, 12
    options = ("--side", "48")  # ~7 kB crops; default synchronous=FULL

    # 1. Killed while stalled inside person 12's transaction, with uncommitted pages of it
    #    already written to the WAL file.
    with _worker(db, "p", count, *options, "--stall-at", str(stall)) as proc:
        _expect_line(proc, "ready")
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "stalled":
                break
        else:
            pytest.fail("the worker ended without stalling")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    assert _uncommitted_wal_frames(db) > 0  # the kill really hit a half-written transaction
    present = _check_complete_or_absent(db, count, "p")
    assert present == set(range(stall))

    # 2. Re-run: skips the complete persons, enrols the rest.
    with _worker(db, "p", count, *options) as proc:
        out, err = proc.communicate(timeout=80)
    assert proc.returncode == 0 and out.splitlines()[-1] == "done", err[-2000:]
    begun = [int(line.split()[1]) for line in out.splitlines() if line.startswith("begin")]
    assert begun == list(range(len(present), count))  # nothing enrolled twice
    assert _check_complete_or_absent(db, count, "p") == set(range(count))
    with SQLiteGallery(db, create=False) as store:
        snap = store.templates(COLLECTION)
        assert len(snap.face_ids) == sum(face_count(i) for i in range(count))
        assert len(set(snap.face_ids.tolist())) == len(snap.face_ids)
