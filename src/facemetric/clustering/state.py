"""The durable state of a clustered photo collection: one SQLite file, ``DIR/clusters.sqlite``.

Tables:

- ``meta``: the model's contract (and its fingerprint), the threshold ``(value, far,
  impostors)`` and the :class:`~facemetric.clustering.methods.ClusterOptions` of the first run.
- ``photos``: every photo seen — path (relative to the folder), SHA-256 of its bytes (a
  photo is new when its SHA-256 is), size, faces found, or the problem that kept it out.
- ``faces``: box, detection score, embedding (float32 blob), context crop (PNG) with its
  landmarks, and the cluster (``NULL`` while a run has embedded but not yet clustered it).
- ``clusters``: id (never reused), the person's name once the user names it, ``origin``
  (``auto`` or ``user``).
- ``decisions``: the user's actions (name, merge, split, move) in order, as JSON.

Every change is one SQLite transaction, so a crash leaves the state before or after it.
Embedded faces are stored as each batch finishes, so an interrupted run resumes where it
stopped.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.clustering.methods import ClusterOptions
from facemetric.inference.calibration import Threshold
from facemetric.inference.contract import ModelContract

STATE_FILE = "clusters.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    width INTEGER, height INTEGER, faces INTEGER NOT NULL DEFAULT 0,
    problem TEXT, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS clusters (
    id INTEGER PRIMARY KEY, name TEXT, origin TEXT NOT NULL DEFAULT 'auto');
CREATE TABLE IF NOT EXISTS faces (
    id INTEGER PRIMARY KEY, photo_id INTEGER NOT NULL REFERENCES photos(id),
    left INTEGER NOT NULL, top INTEGER NOT NULL, right INTEGER NOT NULL,
    bottom INTEGER NOT NULL, detection_score REAL NOT NULL, embedding BLOB NOT NULL,
    crop BLOB NOT NULL, landmarks TEXT NOT NULL, scheme TEXT NOT NULL,
    cluster_id INTEGER REFERENCES clusters(id));
CREATE INDEX IF NOT EXISTS faces_cluster ON faces(cluster_id);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class PhotoRecord:
    id: int
    path: str
    sha256: str
    faces: int
    problem: str | None
    detail: str


@dataclass(frozen=True)
class FaceRow:
    """A stored face without its embedding and crop."""

    id: int
    photo_id: int
    photo: str
    box: tuple[int, int, int, int]
    cluster: int | None
    name: str | None


@dataclass(frozen=True, eq=False)
class FaceArrays:
    """Faces as arrays: ``ids (n,)``, ``photo_ids (n,)``, ``clusters (n,)`` (``-1`` for
    ``NULL``), ``embeddings (n, D)`` float32."""

    ids: np.ndarray
    photo_ids: np.ndarray
    clusters: np.ndarray
    embeddings: np.ndarray


class ClusterState:
    """Open (or create) the state in ``folder`` (module docstring).

    Raises:
        FileNotFoundError: ``create=False`` and there is no state in ``folder``.
        ValueError: the file is not a clustering state, or is from a newer version.
    """

    def __init__(self, folder: str | Path, *, create: bool = False) -> None:
        self.folder = Path(folder)
        path = self.folder / STATE_FILE
        if not path.exists() and not create:
            raise FileNotFoundError(f"no clustering state in {self.folder} (expected "
                                    f"{STATE_FILE}): run `facemetric cluster FOLDER --out "
                                    f"{self.folder} --model MODEL` first")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA journal_mode = WAL")
        try:
            with self.transaction():
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise ValueError(f"{path} is not a clustering state ({err})") from err
        version = self.get_meta("schema")
        if version is None:
            self.set_meta("schema", SCHEMA_VERSION)
        elif int(version) > SCHEMA_VERSION:
            raise ValueError(f"{path} was written by a newer facemetric (schema {version}); "
                             "upgrade facemetric to use it")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ClusterState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (key, json.dumps(value)))

    def pin(self, contract: ModelContract, threshold: Threshold, options: ClusterOptions
            ) -> tuple[Threshold, ClusterOptions]:
        """Record the model, threshold and options on the first run; later runs must use
        the same model, and keep the recorded threshold and options.

        Raises:
            ValueError: another model's faces are stored here.
        """
        stored = self.get_meta("contract")
        if stored is None:
            with self.transaction():
                self.set_meta("contract", contract.to_dict())
                self.set_meta("fingerprint", contract.fingerprint())
                self.set_meta("threshold", {"value": threshold.value, "far": threshold.far,
                                            "impostors": threshold.impostors})
                self.set_meta("options", options.to_dict())
            return threshold, options
        if self.get_meta("fingerprint") != contract.fingerprint():
            theirs = ModelContract.from_dict(stored)
            raise ValueError(
                f"{self.folder} holds faces embedded by another model ({theirs.describe()}); "
                f"this one is {contract.describe()}. Embeddings of two models cannot be "
                "compared: use the same model, or start over in a new --out folder")
        return self.threshold(), self.options()

    def contract(self) -> ModelContract | None:
        raw = self.get_meta("contract")
        return None if raw is None else ModelContract.from_dict(raw)

    def threshold(self) -> Threshold:
        raw = self.get_meta("threshold")
        if raw is None:
            raise ValueError(f"{self.folder} has not been clustered yet")
        return Threshold(float(raw["value"]), float(raw["far"]), int(raw["impostors"]))

    def options(self) -> ClusterOptions:
        raw = self.get_meta("options")
        return ClusterOptions() if raw is None else ClusterOptions.from_dict(raw)

    # ------------------------------------------------------------------ photos, faces

    def known_sha256(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM photos")}

    def add_photo(self, path: str, sha256: str, size: tuple[int, int] | None,
                  faces: Sequence[dict[str, Any]], problem: str | None = None,
                  detail: str = "") -> int:
        """Store a photo and its faces (unclustered) in one transaction; returns its id."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO photos (path, sha256, width, height, faces, problem, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (path, sha256, None if size is None else size[0],
                 None if size is None else size[1], len(faces), problem, detail))
            photo_id = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO faces (photo_id, left, top, right, bottom, detection_score, "
                "embedding, crop, landmarks, scheme) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(photo_id, *f["box"], f["detection_score"],
                  np.asarray(f["embedding"], np.float32).tobytes(), f["crop"],
                  json.dumps(f["landmarks"]), f["scheme"]) for f in faces])
        return photo_id

    def photos(self) -> list[PhotoRecord]:
        return [PhotoRecord(*r) for r in self.db.execute(
            "SELECT id, path, sha256, faces, problem, detail FROM photos ORDER BY id")]

    def face_arrays(self, where: str = "", args: Sequence[Any] = ()) -> FaceArrays:
        rows = self.db.execute(
            f"SELECT id, photo_id, COALESCE(cluster_id, -1), embedding FROM faces {where} "
            "ORDER BY id", tuple(args)).fetchall()
        if not rows:
            dim = self._dim()
            return FaceArrays(*(np.zeros(0, np.int64),) * 3, np.zeros((0, dim), np.float32))
        return FaceArrays(
            np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], np.int64),
            np.stack([np.frombuffer(r[3], np.float32) for r in rows]))

    def _dim(self) -> int:
        c = self.contract()
        return 0 if c is None else c.embedding_size

    def faces(self) -> list[FaceRow]:
        return [FaceRow(r[0], r[1], r[2], (r[3], r[4], r[5], r[6]), r[7], r[8])
                for r in self.db.execute(
                    "SELECT f.id, f.photo_id, p.path, f.left, f.top, f.right, f.bottom, "
                    "f.cluster_id, c.name FROM faces f JOIN photos p ON "
                    "p.id = f.photo_id LEFT JOIN clusters c ON c.id = f.cluster_id "
                    "ORDER BY f.id")]

    def crop(self, face_id: int) -> bytes:
        row = self.db.execute("SELECT crop FROM faces WHERE id = ?", (face_id,)).fetchone()
        if row is None:
            raise ValueError(f"no face {face_id} in {self.folder}")
        return bytes(row[0])

    def face_detail(self, face_id: int) -> dict[str, Any]:
        """Everything stored about one face (for enrolling it into a gallery)."""
        row = self.db.execute(
            "SELECT f.embedding, f.crop, f.landmarks, f.scheme, f.left, f.top, f.right, "
            "f.bottom, f.detection_score, p.sha256 FROM faces f JOIN photos p ON "
            "p.id = f.photo_id WHERE f.id = ?", (face_id,)).fetchone()
        if row is None:
            raise ValueError(f"no face {face_id} in {self.folder}")
        return {"embedding": np.frombuffer(row[0], np.float32), "crop": bytes(row[1]),
                "landmarks": json.loads(row[2]), "scheme": row[3],
                "box": (row[4], row[5], row[6], row[7]), "detection_score": row[8],
                "sha256": row[9]}

    # ------------------------------------------------------------------ clusters

    def new_clusters(self, count: int, origin: str = "auto") -> list[int]:
        """``count`` fresh cluster ids (inside the caller's transaction)."""
        ids = []
        for _ in range(count):
            cur = self.db.execute("INSERT INTO clusters (origin) VALUES (?)", (origin,))
            ids.append(int(cur.lastrowid or 0))
        return ids

    def set_clusters(self, face_ids: Sequence[int], clusters: Sequence[int]) -> None:
        """(Inside the caller's transaction.)"""
        self.db.executemany("UPDATE faces SET cluster_id = ? WHERE id = ?",
                            [(int(c), int(f)) for f, c in zip(face_ids, clusters, strict=True)])

    def drop_empty_clusters(self) -> None:
        self.db.execute("DELETE FROM clusters WHERE id NOT IN (SELECT DISTINCT cluster_id FROM "
                        "faces WHERE cluster_id IS NOT NULL) AND name IS NULL")

    def cluster_names(self) -> dict[int, str | None]:
        return {int(r[0]): r[1] for r in self.db.execute("SELECT id, name FROM clusters")}

    def require_cluster(self, cluster: int) -> str | None:
        row = self.db.execute("SELECT name FROM clusters WHERE id = ?", (cluster,)).fetchone()
        if row is None:
            raise ValueError(f"no cluster {cluster} in {self.folder}: see faces.csv or "
                             "`facemetric cluster list DIR`")
        return row[0]

    def members(self, cluster: int) -> list[int]:
        return [int(r[0]) for r in self.db.execute(
            "SELECT id FROM faces WHERE cluster_id = ? ORDER BY id", (cluster,))]

    def record(self, kind: str, detail: dict[str, Any]) -> None:
        """(Inside the caller's transaction.)"""
        self.db.execute("INSERT INTO decisions (at, kind, detail) VALUES (?, ?, ?)",
                        (time.time(), kind, json.dumps(detail)))

    def decisions(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r[0], json.loads(r[1])) for r in self.db.execute(
            "SELECT kind, detail FROM decisions ORDER BY id")]


__all__ = ["STATE_FILE", "ClusterState", "FaceArrays", "FaceRow", "PhotoRecord"]
