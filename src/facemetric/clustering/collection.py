"""A photo collection clustered by person, incrementally, with the user's decisions kept.

:class:`PhotoCollection` owns an output folder ``DIR`` holding the state
(:mod:`facemetric.clustering.state`) and the exported files
(:mod:`facemetric.clustering.export`).

**A run** (:meth:`PhotoCollection.update`, ``facemetric cluster FOLDER --out DIR``):

1. photos whose SHA-256 is already in the state are skipped; the others are read, every
   face detected and embedded (``policy="all"``), and stored batch by batch (an interrupted
   run resumes there). Unreadable photos and photos without a face are recorded with their
   reason and reported — never fatal.
2. the faces not yet clustered are first **assigned** to the existing clusters
   (:func:`~facemetric.clustering.methods.assign_to_clusters`: the linkage score reaches the
   threshold recorded on the first run, and the cluster holds no face of the same photo);
3. the rest are **clustered among themselves** with the recorded method and options
   (cannot-link inside); every resulting group, singletons included, gets a new cluster id.
4. the exports are rewritten.

Existing clusters are never re-clustered, merged or split by a run: only new faces join
them. That is what makes the user's decisions durable — a named cluster keeps its name and
members, a merge stays merged, a face moved out of a cluster stays out (it is no longer a
new face, so it is never reassigned).

**Decisions** (each one SQLite transaction, logged in ``decisions``): :meth:`name`,
:meth:`merge`, :meth:`split`, :meth:`move`, and :meth:`enroll` (a named cluster's faces into
a gallery person, with the stored embeddings — no re-detection).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.clustering.export import ExportFiles, export_state
from facemetric.clustering.methods import (
    ClusterOptions,
    assign_to_clusters,
    cluster_embeddings,
)
from facemetric.clustering.state import ClusterState
from facemetric.recognizer.faces import ImageInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm",
                  ".ppm")
"""The files of a folder that are read as photos (case-insensitive)."""


def list_photos(folder: str | Path) -> list[tuple[str, Path]]:
    """``(path relative to folder, path)`` of every image file under ``folder``, sorted;
    hidden files and folders are skipped.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(dirpath) / name
            out.append((path.relative_to(root).as_posix(), path))
    return out


@dataclass(frozen=True)
class PhotoProblem:
    photo: str
    problem: str
    detail: str


@dataclass(frozen=True)
class UpdateReport:
    """What a run did: photos given / new, faces embedded, faces assigned to existing
    clusters, new clusters, clusters of at least ``min_size`` and unclustered faces now,
    merges refused by cannot-link, HDBSCAN clusters split, this run's problem photos."""

    photos_seen: int
    photos_new: int
    faces_new: int
    assigned: int
    new_clusters: int
    clusters: int
    unclustered: int
    refused: int
    split: int
    problems: tuple[PhotoProblem, ...] = ()
    files: ExportFiles | None = None
    threshold: float = float("nan")
    far: float = float("nan")

    def summary(self) -> str:
        lines = [
            f"{self.photos_new} new of {self.photos_seen} photos: {self.faces_new} faces; "
            f"{self.assigned} joined existing clusters, {self.new_clusters} new clusters",
            f"now {self.clusters} clusters and {self.unclustered} unclustered faces "
            f"(threshold cosine {self.threshold:.4f} at FAR {self.far:g})",
        ]
        if self.refused or self.split:
            lines.append(f"cannot-link: {self.refused} merges refused, {self.split} clusters "
                         "split (two faces of one photo)")
        for p in self.problems:
            lines.append(f"  skipped {p.photo}: {p.problem} — {p.detail}")
        if self.files is not None:
            lines.append(f"faces.csv: {self.files.csv}")
        return "\n".join(lines)


@dataclass
class PhotoCollection:
    """The clustered collection in ``out_dir`` (module docstring).

    Args:
        out_dir: the state and exports live here (created on first use).
        recognizer: a :class:`~facemetric.recognizer.Recognizer` (or a model source for
            one) — needed for :meth:`update`, not for decisions.
        options: used on the first run and recorded; later runs keep the recorded ones
            (``None``: the recorded, or the defaults).
        progress: show a tqdm bar while embedding.
        batch: photos embedded per batch (and stored per transaction).
    """

    out_dir: Path
    recognizer: Any = None
    options: ClusterOptions | None = None
    progress: bool = False
    batch: int = 16
    state: ClusterState = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.recognizer is not None and not hasattr(self.recognizer, "embed"):
            from facemetric.recognizer import Recognizer

            self.recognizer = Recognizer(self.recognizer)
        self.state = ClusterState(self.out_dir, create=self.recognizer is not None)
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    def close(self) -> None:
        self.state.close()

    def __enter__(self) -> PhotoCollection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ runs

    def update_folder(self, folder: str | Path, export: bool = True) -> UpdateReport:
        """:meth:`update` with every image file under ``folder`` (:func:`list_photos`)."""
        return self.update(list_photos(folder), export=export)

    def update(self, photos: Sequence[tuple[str, ImageInput]], export: bool = True
               ) -> UpdateReport:
        """Add ``(name, image)`` photos and cluster their faces (module docstring)."""
        if self.recognizer is None:
            raise ValueError("a run needs a model: PhotoCollection(DIR, recognizer=MODEL)")
        opts = self.options or self.state.options()
        threshold, opts = self.state.pin(self.recognizer.contract,
                                         self.recognizer.threshold(opts.far), opts)
        known = self.state.known_sha256()
        stored = set(known)
        todo, problems = [], []
        for name, image in photos:
            data, sha = _bytes_and_sha(image)
            if sha is not None and sha in known:
                continue
            todo.append((name, data if data is not None else image, sha))
            if sha is not None:
                known.add(sha)
        faces_new = 0
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), desc="embed", unit="photo",
                  disable=not self.progress) as bar:
            for s in range(0, len(todo), self.batch):
                chunk = todo[s : s + self.batch]
                found = self.recognizer.embed([c[1] for c in chunk], policy="all")
                for (name, _, sha), im in zip(chunk, found, strict=True):
                    faces_new += self._store(name, sha, im, problems, stored)
                bar.update(len(chunk))
        assigned, new_clusters, refused, split = self._cluster_pending(threshold.value, opts)
        files = export_state(self.state, opts.min_size) if export else None
        clusters, unclustered = self._counts(opts.min_size)
        return UpdateReport(len(photos), len(todo), faces_new, assigned, new_clusters, clusters,
                            unclustered, refused, split, tuple(problems), files,
                            threshold.value, threshold.far)

    def _store(self, name: str, sha: str | None, im: Any, problems: list[PhotoProblem],
               stored: set[str]) -> int:
        """Store one photo's outcome (faces or problem); returns the faces stored."""
        sha = sha or im.source_sha256 or hashlib.sha256(f"unreadable:{name}".encode()).hexdigest()
        if not im.ok:
            problems.append(PhotoProblem(name, str(im.problem), im.detail))
        if sha in stored:
            return 0
        stored.add(sha)
        if not im.ok:
            self.state.add_photo(name, sha, im.size, [], str(im.problem), im.detail)
            return 0
        faces = [{"box": f.box, "detection_score": f.detection_score,
                  "embedding": f.embedding, "crop": _png(f.crop),
                  "landmarks": np.asarray(f.crop_landmarks, float).tolist(),
                  "scheme": f.scheme} for f in im.faces]
        self.state.add_photo(name, sha, im.size, faces)
        return len(faces)

    def _cluster_pending(self, threshold: float, opts: ClusterOptions
                         ) -> tuple[int, int, int, int]:
        st = self.state
        pending = st.face_arrays("WHERE cluster_id IS NULL")
        if pending.ids.size == 0:
            return 0, 0, 0, 0
        old = st.face_arrays("WHERE cluster_id IS NOT NULL")
        linkage = opts.linkage if opts.method == "agglomerative" else "average"
        got = assign_to_clusters(pending.embeddings, pending.photo_ids, old.embeddings,
                                 old.clusters, old.photo_ids, threshold, linkage)
        rest = np.flatnonzero(got.cluster < 0)
        result = cluster_embeddings(pending.embeddings[rest], threshold,
                                    pending.photo_ids[rest], opts)
        with st.transaction():
            joined = np.flatnonzero(got.cluster >= 0)
            st.set_clusters(pending.ids[joined].tolist(), got.cluster[joined].tolist())
            count = int(result.groups.max()) + 1 if rest.size else 0
            ids = np.asarray(st.new_clusters(count), dtype=np.int64)
            if rest.size:
                st.set_clusters(pending.ids[rest].tolist(), ids[result.groups].tolist())
        return int(joined.size), count, result.refused, result.split

    def _counts(self, min_size: int) -> tuple[int, int]:
        rows = self.state.db.execute(
            "SELECT c.id, c.name, COUNT(f.id) FROM clusters c JOIN faces f ON "
            "f.cluster_id = c.id GROUP BY c.id").fetchall()
        big = sum(1 for _, name, n in rows if n >= min_size or name)
        small = sum(n for _, name, n in rows if n < min_size and not name)
        return big, small

    def export(self) -> ExportFiles:
        """Rewrite the crops, ``faces.csv`` and contact sheets from the state."""
        return export_state(self.state, self.state.options().min_size)

    # ------------------------------------------------------------------ decisions

    def name(self, cluster: int, person: str) -> None:
        """Name ``cluster`` after ``person`` (a second cluster of the same name is refused:
        merge them instead)."""
        if not isinstance(person, str) or not person.strip():
            raise ValueError(f"a person needs a non-empty name, got {person!r}")
        person = person.strip()
        st = self.state
        st.require_cluster(cluster)
        other = st.db.execute("SELECT id FROM clusters WHERE name = ? AND id != ?",
                              (person, cluster)).fetchone()
        if other is not None:
            raise ValueError(f"cluster {other[0]} is already named {person!r}: merge the two "
                             f"(`facemetric cluster merge DIR {other[0]} {cluster}`)")
        with st.transaction() as db:
            db.execute("UPDATE clusters SET name = ?, origin = 'user' WHERE id = ?",
                       (person, cluster))
            st.record("name", {"cluster": cluster, "person": person})

    def merge(self, into: int, other: int) -> None:
        """Move every face of ``other`` into ``into`` (``other`` disappears).

        Raises:
            ValueError: a cluster is missing, they are the same, they are named after two
                different persons, or they hold faces of one photo.
        """
        st = self.state
        if into == other:
            raise ValueError(f"cannot merge cluster {into} with itself")
        name_a, name_b = st.require_cluster(into), st.require_cluster(other)
        if name_a and name_b and name_a != name_b:
            raise ValueError(f"cluster {into} is {name_a!r} and cluster {other} is {name_b!r}: "
                             "rename one first if they are the same person")
        self._check_photos(st.members(other), into)
        with st.transaction() as db:
            db.execute("UPDATE faces SET cluster_id = ? WHERE cluster_id = ?", (into, other))
            if name_b and not name_a:
                db.execute("UPDATE clusters SET name = NULL WHERE id = ?", (other,))
                db.execute("UPDATE clusters SET name = ? WHERE id = ?", (name_b, into))
            db.execute("UPDATE clusters SET origin = 'user' WHERE id = ?", (into,))
            db.execute("DELETE FROM clusters WHERE id = ?", (other,))
            st.record("merge", {"into": into, "other": other})

    def split(self, cluster: int, faces: Iterable[int]) -> int:
        """Move ``faces`` of ``cluster`` into a new cluster; returns its id."""
        st = self.state
        st.require_cluster(cluster)
        chosen = sorted({int(f) for f in faces})
        members = set(st.members(cluster))
        missing = [f for f in chosen if f not in members]
        if not chosen or missing:
            raise ValueError(f"faces {missing or '(none)'} are not in cluster {cluster}; its "
                             f"faces are {sorted(members)}")
        if len(chosen) == len(members):
            raise ValueError(f"splitting off every face of cluster {cluster} changes nothing")
        with st.transaction():
            (new,) = st.new_clusters(1, origin="user")
            st.set_clusters(chosen, [new] * len(chosen))
            st.record("split", {"cluster": cluster, "faces": chosen, "new": new})
        return new

    def move(self, faces: Iterable[int], to: int | None = None) -> int:
        """Move ``faces`` to cluster ``to`` ("this is that person"), or, with ``to=None``,
        each into a new cluster of its own ("not this person"); returns the target id (the
        last new one for ``None``)."""
        st = self.state
        chosen = sorted({int(f) for f in faces})
        known = {int(r[0]) for r in st.db.execute(
            f"SELECT id FROM faces WHERE id IN ({','.join('?' * len(chosen))})", chosen)}
        if not chosen or len(known) != len(chosen):
            raise ValueError(f"no such faces: {sorted(set(chosen) - known) or '(none)'}")
        if to is not None:
            st.require_cluster(to)
            self._check_photos(chosen, to)
        with st.transaction():
            if to is None:
                targets = st.new_clusters(len(chosen), origin="user")
            else:
                targets = [to] * len(chosen)
            st.set_clusters(chosen, targets)
            st.drop_empty_clusters()
            st.record("move", {"faces": chosen, "to": to, "clusters": targets})
        return int(targets[-1])

    def _check_photos(self, faces: Sequence[int], cluster: int) -> None:
        """Refuse to put two faces of one photo into ``cluster``."""
        if not faces:
            return
        marks = ",".join("?" * len(faces))
        clash = self.state.db.execute(
            f"SELECT p.path FROM faces a JOIN faces b ON a.photo_id = b.photo_id JOIN photos p "
            f"ON p.id = a.photo_id WHERE a.id IN ({marks}) AND b.cluster_id = ? AND "
            f"b.id NOT IN ({marks}) LIMIT 1", (*faces, cluster, *faces)).fetchone()
        if clash is not None:
            raise ValueError(f"photo {clash[0]} has a face in each: two faces of one photo are "
                             "two people, so they cannot share a cluster")

    def enroll(self, cluster: int, gallery: Any, collection: str = "default") -> int:
        """Enroll the faces of named ``cluster`` as its person in ``gallery`` (an SQLite path,
        a PostgreSQL URL or a store); returns how many faces were added. The stored
        embeddings are used as they are; the gallery collection is created for, or must
        match, this state's model."""
        from facemetric.gallery import NewFace, NotFoundError, PostgresGallery, SQLiteGallery

        st = self.state
        person = st.require_cluster(cluster)
        if not person:
            raise ValueError(f"cluster {cluster} has no name yet: name it first")
        contract = st.contract()
        assert contract is not None
        if isinstance(gallery, str) and gallery.startswith(("postgresql://", "postgres://")):
            store = PostgresGallery(gallery)
        elif isinstance(gallery, str | os.PathLike):
            store = SQLiteGallery(Path(gallery))
        else:
            store = gallery
        try:
            try:
                store.get_collection(collection)
            except NotFoundError:
                store.create_collection(collection, contract)
            store.check_contract(collection, contract)
            have = {r.source_sha256 for r in _faces_or_none(store, collection, person)}
            new = []
            for face_id in st.members(cluster):
                d = st.face_detail(face_id)
                if d["sha256"] in have:
                    continue
                new.append(NewFace(template=d["embedding"], crop=d["crop"],
                                   landmarks=tuple(map(tuple, d["landmarks"])),
                                   landmark_scheme=d["scheme"], box=d["box"],
                                   source_sha256=d["sha256"], quality=d["detection_score"]))
            if new:
                store.add_faces(collection, person, new, contract=contract)
            with st.transaction():
                st.record("enroll", {"cluster": cluster, "person": person, "faces": len(new),
                                     "collection": collection})
        finally:
            if store is not gallery:
                store.close()
        return len(new)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _faces_or_none(store: Any, collection: str, person: str) -> list[Any]:
    from facemetric.gallery import NotFoundError

    try:
        return store.faces(collection, person)
    except NotFoundError:
        return []


def _bytes_and_sha(image: ImageInput) -> tuple[bytes | None, str | None]:
    """The bytes of a path or bytes input and their SHA-256 (``None`` for arrays and PIL
    images, whose SHA-256 the face pipeline computes); an unreadable path gives
    ``(None, None)`` and is reported by the pipeline."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return data, hashlib.sha256(data).hexdigest()
    if isinstance(image, str | os.PathLike):
        try:
            data = Path(image).read_bytes()
        except OSError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()
    return None, None


__all__ = ["IMAGE_SUFFIXES", "PhotoCollection", "PhotoProblem", "UpdateReport", "list_photos"]
