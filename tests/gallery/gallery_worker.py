"""Enrolment worker for the gallery's multi-process tests, and the data both sides share.

Run as a script (a real, separate Python process)::

    python gallery_worker.py DB PREFIX COUNT [--shared K] [--stall-at I] [--wait-go]

It enrols persons ``PREFIX0000 … PREFIX{COUNT-1}`` into collection ``"main"`` of the gallery
``DB`` (an SQLite file, or a PostgreSQL DSN — ``postgresql://…`` or ``key=value …`` — opened
with ``application_name`` ``facemetric-worker-PREFIX``), person ``i`` with :func:`faces_for`
``(PREFIX, i)`` in one ``add_faces`` call each, skipping persons already complete (so a
rerun after a crash finishes the job). Protocol on stdout, one line each, flushed: ``ready``
(gallery open), ``begin I`` before person ``I``, a JSON object ``{"person", "ids", "t"}``
after it committed, ``done`` at the end. With ``--wait-go`` it waits for a line on stdin
after ``ready``. With ``--shared K`` it then adds one face to each of ``shared0000 …
shared{K-1}`` (persons the other workers add to as well). With ``--stall-at I`` it stops
*inside* the transaction of person ``I`` (SQLite: after two of its faces were inserted, with
a tiny page cache so that uncommitted pages are already in the WAL file; PostgreSQL: after
all its faces and crops were inserted), prints ``stalled`` and sleeps, waiting to be killed.
A person found with a face count other than its full one exits with status 3 (a
half-enrolled person).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time

import numpy as np
from PIL import Image

from facemetric.gallery import GalleryStore, NewFace, NotFoundError, SQLiteGallery
from facemetric.inference.contract import ModelContract

DIM = 16
COLLECTION = "main"


def contract(dim: int = DIM, weights: str = "a") -> ModelContract:
    """The model contract of the (imaginary) encoder the tests enrol with."""
    return ModelContract(
        backbone="mobilefacenet",
        input_size=112,
        template="arcface112",
        embedding_size=dim,
        weights_sha256=hashlib.sha256(weights.encode()).hexdigest(),
    )


def png(rng: np.random.Generator, side: int) -> bytes:
    """A real PNG file of random pixels (incompressible, so ``~3·side²`` bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def face_count(index: int) -> int:
    """How many faces person ``index`` has: 2 to 5."""
    return 2 + index % 4


def faces_for(prefix: str, index: int, side: int = 24, count: int | None = None) -> list[NewFace]:
    """The faces of person ``index`` of ``prefix``: deterministic, so a test can compare
    what the gallery holds with what was enrolled."""
    seed = int.from_bytes(hashlib.sha256(f"{prefix}/{index}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    out = []
    for j in range(face_count(index) if count is None else count):
        template = rng.standard_normal(DIM).astype(np.float32)
        template /= np.linalg.norm(template)
        out.append(
            NewFace(
                template=template,
                crop=png(rng, side),
                landmarks=[tuple(p) for p in rng.uniform(0, side, (5, 2))],
                landmark_scheme="arcface5",
                box=(10.0 * j, 5.0, 10.0 * j + 40.0, 50.0),
                source_sha256=hashlib.sha256(f"{prefix}/{index}/{j}".encode()).hexdigest(),
                quality=float(rng.uniform()),
            )
        )
    return out


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stall_inside_transactions(gallery: SQLiteGallery) -> None:
    # Test-only hook on the gallery's connection for this thread: after the second crop
    # insert of the stalled person, announce it and sleep until killed.
    conn = gallery._connection()
    conn.execute("PRAGMA cache_size = 2")  # spill dirty pages into the WAL before commit
    inserts = 0

    def trace(statement: str) -> None:
        nonlocal inserts
        if statement.startswith("INSERT INTO face_crops"):
            inserts += 1
            if inserts == 2:
                _say("stalled")
                time.sleep(120)

    conn.set_trace_callback(trace)


def _stall_inside_postgres_transactions() -> None:
    # Test-only hook: PostgresGallery.add_faces inserts a person's faces and crops with one
    # executemany inside its transaction; after it, announce and sleep until killed.
    import psycopg

    original = psycopg.Cursor.executemany

    def executemany(self, query, params_seq, **kwargs):
        original(self, query, params_seq, **kwargs)
        if isinstance(query, str) and "INSERT INTO face_crops" in query:
            _say("stalled")
            time.sleep(120)

    psycopg.Cursor.executemany = executemany  # type: ignore[method-assign]


def is_dsn(target: str) -> bool:
    """Whether ``target`` is a PostgreSQL connection string rather than a file path."""
    return target.startswith(("postgresql://", "postgres://")) or "=" in target


def open_gallery(target: str, prefix: str = "", sync: str = "FULL") -> GalleryStore:
    """The gallery at ``target``: a PostgreSQL DSN or an SQLite file."""
    if is_dsn(target):
        from facemetric.gallery import PostgresGallery

        return PostgresGallery(target, application_name=f"facemetric-worker-{prefix}")
    return SQLiteGallery(target, synchronous=sync)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("prefix")
    parser.add_argument("count", type=int)
    parser.add_argument("--shared", type=int, default=0)
    parser.add_argument("--stall-at", type=int, default=-1)
    parser.add_argument("--side", type=int, default=24)
    parser.add_argument("--wait-go", action="store_true")
    parser.add_argument("--sync", default="FULL")
    args = parser.parse_args()
    model = contract()
    with open_gallery(args.db, args.prefix, args.sync) as gallery:
        _say("ready")
        if args.wait_go:
            sys.stdin.readline()
        for i in range(args.count):
            name = f"{args.prefix}{i:04d}"
            expected = face_count(i)
            try:
                have: int | None = gallery.get_person(COLLECTION, name).face_count
            except NotFoundError:
                have = None
            if have == expected:
                continue
            if have is not None:
                _say(f"half-enrolled {name}: {have} of {expected} faces")
                return 3
            faces = faces_for(args.prefix, i, args.side)
            if i == args.stall_at:
                if isinstance(gallery, SQLiteGallery):
                    _stall_inside_transactions(gallery)
                else:
                    _stall_inside_postgres_transactions()
            _say(f"begin {i}")
            ids = gallery.add_faces(COLLECTION, name, faces, contract=model)
            _say(json.dumps({"person": name, "ids": ids, "t": time.time()}))
        for k in range(args.shared):
            name = f"shared{k:04d}"
            face = faces_for(f"{args.prefix}-shared", k, args.side, count=1)
            ids = gallery.add_faces(COLLECTION, name, face, contract=model)
            _say(json.dumps({"person": name, "ids": ids, "t": time.time()}))
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
