"""Teacher embeddings computed once per training set and kept beside the aligned images.

Distillation (``facemetric.losses.distillation``) needs the teacher's embedding of every
training image at every step. A teacher such as dlib's ResNet costs ~0.1 s per face on one
core, many times the student's step, so :func:`teacher_cache` embeds each image **once** and
stores the rows beside the aligned images::

    <aligned_root>/.teacher/<key>.npy     (N, D) float32, unit rows, in manifest order
    <aligned_root>/.teacher/<key>.json    the manifest
    <aligned_root>/.teacher/<key>.parts/  chunks of an unfinished build (resume)

The manifest records the image list (relative paths, in row order) and a digest of their
bytes, the teacher's :class:`~facemetric.inference.contract.ModelContract` (with its
fingerprint), how the teacher's input faces were made (:class:`TeacherInputs.describe`), the
dimension and how many faces needed the fallback. ``key`` hashes the three identities (images,
teacher, inputs), so another teacher or other input faces land in another file; a manifest
whose image list matches but whose bytes digest does not (images re-aligned since) is
*stale* and is rebuilt, never used. Every file is written atomically
(:mod:`facemetric.atomic`); a killed build keeps its finished chunks and a rerun computes
only the rest.

Teacher inputs. The teacher must see the face the way it was trained to see it
(``contract.template``):

- :class:`AlignedFaces` — the aligned images themselves (a facemetric teacher with the
  ``arcface112`` template, as the student's own images are made);
- :class:`RealignedFaces` — the original photos detected again with the *same* detector,
  settings and face choice (nearest the centre) that made the aligned folder, warped to the
  teacher's template from the same landmarks (``dlib150`` chips for dlib's descriptor). The
  detector is deterministic, so the teacher and the student see the same face; an image in
  which no face is found (the aligned folder holds a centre-crop fallback there) gives the
  teacher the aligned image resized to its input — counted in ``manifest["fallbacks"]``.
  Re-deriving chips from a 112-px ArcFace crop instead would upsample and mis-frame dlib's
  chip (its 25% padding reaches beyond the ArcFace crop).

Flips. Only the unflipped face is embedded. dlib's descriptor of a mirrored chip is close to
the original's: cosine 0.984–0.996 (median 0.991) on 40 DevTrain faces, against a median
impostor cosine of 0.845 — the mirror moves a face about 6% of the way to a typical impostor
— so a flipped training image keeps its teacher row (``docs/distillation.md``).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from facemetric.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from facemetric.inference.encoder import Encoder

TEACHER_DIR = ".teacher"
"""Folder, under the aligned images' root, that holds the teacher caches."""

FORMAT_VERSION = 1
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp")


class TeacherInputs(Protocol):
    """Makes the teacher's input face for one training image (relative path)."""

    template: str

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts that change the faces (part of the cache key)."""
        ...

    def face(self, rel: str) -> tuple[np.ndarray, bool]:
        """``(face, fallback)``: ``(T, T, 3)`` uint8 RGB at the template's size and whether
        the face is a fallback rather than an alignment for ``template``."""
        ...


def _resize_to(image: np.ndarray, side: int) -> np.ndarray:
    from facemetric.data.transforms import Resize

    return Resize(side)(image, np.random.default_rng(0))


@dataclass
class AlignedFaces:
    """The aligned images under ``root`` as they are (their template is ``template``)."""

    root: Path
    template: str = "arcface112"

    def describe(self) -> dict[str, Any]:
        return {"kind": "aligned", "template": self.template}

    def face(self, rel: str) -> tuple[np.ndarray, bool]:
        from facemetric.align.templates import TEMPLATE_SIZES
        from facemetric.data.images import load_image

        image = load_image(Path(self.root) / rel)
        side = TEMPLATE_SIZES[self.template]
        if image.shape[:2] != (side, side):
            raise ValueError(
                f"{Path(self.root) / rel} is {image.shape[1]}×{image.shape[0]}, not a "
                f"{self.template} crop ({side}×{side}): use RealignedFaces for a teacher with "
                "another template"
            )
        return image, False


@dataclass
class RealignedFaces:
    """The original photos re-detected and warped to ``template`` (module docstring).

    Args:
        photos_root: the tree the aligned folder was made from (``rel`` with any image
            suffix, e.g. ``lfw-deepfunneled``).
        aligned_root: the aligned folder (its image stands in where no face is found).
        template: the teacher's template (``"dlib150"`` needs ``landmarks`` dlib68/dlib5).
        detector, landmarks, upsample, max_side: as the aligned folder was made
            (``align_report.json`` ``settings``; the defaults are ``align_folder``'s).
    """

    photos_root: Path
    aligned_root: Path
    template: str = "dlib150"
    detector: str = "hog"
    landmarks: str = "dlib68"
    upsample: int = 1
    max_side: int | None = 1024
    _detector: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # the dlib detector does not pickle
        state = dict(self.__dict__)
        state["_detector"] = None
        return state

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "realigned",
            "template": self.template,
            "photos_root": str(Path(self.photos_root).resolve()),
            "detector": self.detector,
            "landmarks": self.landmarks,
            "upsample": self.upsample,
            "max_side": self.max_side,
            "choice": "nearest_centre",
        }

    def _photo(self, rel: str) -> Path:
        stem = Path(self.photos_root) / rel
        for suffix in (stem.suffix, *PHOTO_SUFFIXES, *(s.upper() for s in PHOTO_SUFFIXES)):
            candidate = stem.with_suffix(suffix)
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no original photo for {rel} under {self.photos_root}: photos_root must be the "
            "tree the aligned folder was made from"
        )

    def face(self, rel: str) -> tuple[np.ndarray, bool]:
        from facemetric.align.aligner import nearest_centre
        from facemetric.align.detect import FaceDetector
        from facemetric.align.templates import TEMPLATE_SIZES, warp_to_template
        from facemetric.data.images import load_image

        if self._detector is None:
            self._detector = FaceDetector(
                self.detector, self.landmarks, self.upsample, self.max_side
            )
        photo = load_image(self._photo(rel))
        faces = self._detector.detect(photo)
        if not faces:
            aligned = load_image(Path(self.aligned_root) / rel)
            return _resize_to(aligned, TEMPLATE_SIZES[self.template]), True
        chosen = nearest_centre(faces, photo.shape)
        return warp_to_template(photo, chosen.landmarks, chosen.scheme, self.template), False


@dataclass(frozen=True)
class TeacherEmbeddings:
    """A loaded cache: ``rows[i]`` is the teacher's unit embedding of ``paths[i]``."""

    paths: tuple[str, ...]
    rows: np.ndarray
    manifest: dict[str, Any]
    file: Path

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def rows_for(self, rels: Sequence[str]) -> np.ndarray:
        """The rows of ``rels`` in that order.

        Raises:
            KeyError: an image the cache does not hold (name it and rebuild).
        """
        index = {p: i for i, p in enumerate(self.paths)}
        missing = [r for r in rels if r not in index]
        if missing:
            raise KeyError(
                f"{len(missing)} images have no teacher embedding in {self.file}, e.g. "
                f"{missing[:3]}: rebuild the cache for this image list"
            )
        return self.rows[[index[r] for r in rels]]


def images_digest(root: str | os.PathLike[str], rels: Sequence[str]) -> str:
    """SHA-256 over ``rel`` and the SHA-256 of each file's bytes, in order."""
    total = hashlib.sha256()
    for rel in rels:
        data = (Path(root) / rel).read_bytes()
        total.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(data).digest())
    return total.hexdigest()


def _key(rels: Sequence[str], fingerprint: str, inputs: dict[str, Any]) -> str:
    text = json.dumps(
        {"images": list(rels), "teacher": fingerprint, "inputs": inputs, "v": FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# -------------------------------------------------------------------- chunk workers

_WORKER: dict[str, Any] = {}


def _init_worker(teacher: str, inputs: TeacherInputs) -> None:
    import torch

    from facemetric.inference import load_model

    torch.set_num_threads(1)
    _WORKER["encoder"] = load_model(teacher)
    _WORKER["inputs"] = inputs


def _embed_chunk(
    encoder: Encoder, inputs: TeacherInputs, rels: Sequence[str], part: Path
) -> int:
    faces, fallbacks = [], 0
    for rel in rels:
        face, fell_back = inputs.face(rel)
        faces.append(face)
        fallbacks += int(fell_back)
    rows = encoder.embed_faces(np.stack(faces)).astype(np.float32)
    if not np.isfinite(rows).all():
        raise ValueError(f"the teacher returned NaN/Inf for one of {list(rels)}")
    atomic_write_bytes(part.with_suffix(".npy"), _npy_bytes(rows))
    atomic_write_text(part.with_suffix(".json"), json.dumps({"fallbacks": fallbacks}))
    return len(rels)


def _embed_chunk_in_worker(rels: list[str], part: str) -> int:
    return _embed_chunk(_WORKER["encoder"], _WORKER["inputs"], rels, Path(part))


# -------------------------------------------------------------------- build / load


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def load_teacher_cache(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> (
    TeacherEmbeddings
):
    """Load the cache whose manifest is ``path`` and check it against the images under
    ``root`` (their bytes digest) and its own array (shape, finite unit rows).

    Raises:
        ValueError: a stale cache (the images changed since), or a damaged one.
        FileNotFoundError: no such manifest or array.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a facemetric teacher-cache manifest (version 1)")
    rels = list(manifest["images"])
    digest = images_digest(root, rels)
    if digest != manifest["images_sha256"]:
        raise ValueError(
            f"teacher cache {path} is stale: the images under {root} changed since it was "
            "built (delete it or let teacher_cache rebuild it)"
        )
    rows = np.load(path.with_suffix(".npy"), allow_pickle=False)
    if rows.shape != (len(rels), manifest["dim"]) or rows.dtype != np.float32:
        raise ValueError(
            f"teacher cache {path.with_suffix('.npy')} holds {rows.shape} {rows.dtype}, the "
            f"manifest says ({len(rels)}, {manifest['dim']}) float32: delete it and rebuild"
        )
    norms = np.linalg.norm(rows, axis=1)
    if not np.isfinite(rows).all() or np.abs(norms - 1).max() > 1e-3:
        raise ValueError(f"teacher cache {path} holds non-unit or non-finite rows: rebuild it")
    return TeacherEmbeddings(tuple(rels), rows, manifest, path)


def teacher_cache(
    teacher: str | Encoder,
    inputs: TeacherInputs,
    root: str | os.PathLike[str],
    rels: Sequence[str],
    *,
    chunk: int = 128,
    workers: int = 1,
    progress: bool = True,
) -> TeacherEmbeddings:
    """The teacher's embeddings of ``root/<rel>`` for every ``rel``: loaded when a valid
    cache exists, otherwise computed (resuming an unfinished build) and stored.

    Args:
        teacher: a ``load_model`` source (``"dlib"``, a run folder, an ``.onnx``) or an
            :class:`~facemetric.inference.encoder.Encoder` (``workers`` must then be 1).
        inputs: how the teacher's faces are made (:class:`AlignedFaces`,
            :class:`RealignedFaces`); its template must be the teacher's.
        root: the aligned images' root (the cache goes under ``root/.teacher``).
        rels: image paths relative to ``root`` (POSIX), the rows' order.
        chunk: images per stored chunk (the unit of resume).
        workers: processes, each loading the teacher once (``teacher`` a source string).
        progress: a tqdm bar.

    Raises:
        ValueError: an empty or repeated image list, a template mismatch, or ``workers > 1``
            with an Encoder object.
    """
    from tqdm.auto import tqdm

    from facemetric.inference import load_model

    root = Path(root)
    rels = [Path(r).as_posix() for r in rels]
    if not rels:
        raise ValueError("no images to embed: rels is empty")
    if len(set(rels)) != len(rels):
        raise ValueError("rels repeats an image: give each image once")
    if chunk < 1 or workers < 1:
        raise ValueError(f"chunk and workers must be positive, got {chunk}, {workers}")
    if isinstance(teacher, str):
        encoder, source = load_model(teacher), teacher
    else:
        if workers != 1:
            raise ValueError("workers > 1 needs the teacher as a load_model source string")
        encoder, source = teacher, None
    contract = encoder.contract
    if contract.template != inputs.template:
        raise ValueError(
            f"the teacher takes {contract.template!r} faces but the inputs make "
            f"{inputs.template!r} ones: use RealignedFaces(template={contract.template!r})"
        )
    described = inputs.describe()
    key = _key(rels, contract.fingerprint(), described)
    folder = root / TEACHER_DIR
    manifest_file = folder / f"{key}.json"
    if manifest_file.is_file():
        try:
            return load_teacher_cache(manifest_file, root)
        except ValueError:
            manifest_file.unlink()  # stale or damaged: rebuild below

    digest = images_digest(root, rels)
    parts = folder / f"{key}.parts"
    if (parts / "images_sha256").is_file() and (parts / "images_sha256").read_text() != digest:
        shutil.rmtree(parts)  # chunks of other image bytes: never mixed in
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_text(parts / "images_sha256", digest)
    spans = [(a, min(a + chunk, len(rels))) for a in range(0, len(rels), chunk)]
    todo = [(a, b) for a, b in spans if not (parts / f"{a:08d}.json").is_file()]
    bar = tqdm(total=len(rels), initial=len(rels) - sum(b - a for a, b in todo),
               unit="img", desc="teacher", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for a, b in todo:
                bar.update(_embed_chunk(encoder, inputs, rels[a:b], parts / f"{a:08d}"))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(todo)), ctx, _init_worker,
                                     (source, inputs)) as pool:
                futures = [pool.submit(_embed_chunk_in_worker, rels[a:b],
                                       str(parts / f"{a:08d}")) for a, b in todo]
                for future in as_completed(futures):
                    bar.update(future.result())
    finally:
        bar.close()

    rows = np.concatenate([np.load(parts / f"{a:08d}.npy") for a, _ in spans])
    fallbacks = sum(json.loads((parts / f"{a:08d}.json").read_text())["fallbacks"]
                    for a, _ in spans)
    manifest = {
        "version": FORMAT_VERSION,
        "key": key,
        "images": rels,
        "images_sha256": digest,
        "teacher": contract.to_dict(),
        "teacher_fingerprint": contract.fingerprint(),
        "inputs": described,
        "dim": int(rows.shape[1]),
        "count": len(rels),
        "fallbacks": int(fallbacks),
    }
    atomic_write_bytes(folder / f"{key}.npy", _npy_bytes(rows.astype(np.float32)))
    atomic_write_text(manifest_file, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(parts, ignore_errors=True)
    return load_teacher_cache(manifest_file, root)


__all__ = [
    "TEACHER_DIR",
    "AlignedFaces",
    "RealignedFaces",
    "TeacherEmbeddings",
    "TeacherInputs",
    "images_digest",
    "load_teacher_cache",
    "teacher_cache",
]
