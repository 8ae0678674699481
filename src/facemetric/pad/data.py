"""PAD data: a folder of bona fide and attack photos per subject → context crops.

Layout (the NUAA Photograph Imposter Database's, Tan, Li, Liu, Jiang, ECCV 2010)::

    ROOT/live/<subject>/*.jpg     bona fide presentations
    ROOT/spoof/<subject>/*.jpg    attack presentations (NUAA: printed photos)

Each photo goes through the same face detector as the recognizer (dlib HOG + 68 landmarks,
:class:`~facemetric.align.detect.FaceDetector`); the largest face is kept and cut as the
detector's :class:`~facemetric.pad.base.PadInput` context crop. A photo without a face is
listed in ``missing`` with the reason, never silently dropped.

Detection is the slow step (≈0.1 s per 640 × 480 photo), so the boxes and landmarks can be
cached in a JSON file keyed by the photo's path relative to ROOT and its size and mtime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write_text
from facemetric.pad.base import PadInput

CLASSES = {"live": False, "spoof": True}
"""Sub-folder → is_attack."""

_CACHE_VERSION = 1


@dataclass(frozen=True)
class PadPhoto:
    """One photo of the PAD folder."""

    path: Path
    subject: str
    is_attack: bool


def scan_pad_folder(root: str | Path) -> list[PadPhoto]:
    """Every image under ``root/live/<subject>/`` and ``root/spoof/<subject>/``, sorted.

    Raises:
        FileNotFoundError: ``root``, ``root/live`` or ``root/spoof`` is missing, or holds no
            image.
    """
    from facemetric.data.images import IMAGE_EXTENSIONS

    root = Path(root)
    photos: list[PadPhoto] = []
    for name, attack in CLASSES.items():
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is not a folder: a PAD data folder holds live/<subject>/ (bona fide) "
                "and spoof/<subject>/ (attacks), as NUAA does")
        found = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise FileNotFoundError(f"no images in {folder}/<subject>/")
        photos.extend(PadPhoto(p, p.parent.name, attack) for p in found)
    return photos


@dataclass
class PadFaces:
    """Context crops of a PAD folder's photos (one per photo with a face).

    Attributes:
        crops: uint8 RGB context crops; ``is_attack``, ``subjects``, ``paths``, ``boxes``
            (``(n, 4)`` left, top, right, bottom in photo pixels) line up with them.
        missing: ``(path, reason)`` of photos that gave no crop.
        detect_seconds: wall time of the detections run (0 when all came from the cache).
    """

    crops: list[np.ndarray]
    is_attack: np.ndarray
    subjects: np.ndarray
    paths: list[Path]
    boxes: np.ndarray
    input: PadInput
    missing: list[tuple[Path, str]] = field(default_factory=list)
    detect_seconds: float = 0.0
    detected: int = 0

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, mask: np.ndarray) -> PadFaces:
        idx = np.flatnonzero(mask)
        return PadFaces([self.crops[i] for i in idx], self.is_attack[idx], self.subjects[idx],
                        [self.paths[i] for i in idx], self.boxes[idx], self.input)

    def summary(self) -> str:
        subjects = sorted(set(self.subjects.tolist()))
        return (f"{len(self)} faces ({int(self.is_attack.sum())} attack, "
                f"{int((~self.is_attack).sum())} bona fide) of {len(subjects)} subjects; "
                f"{len(self.missing)} photos without a face")


def _key(photo: Path, root: Path) -> str:
    try:
        return photo.relative_to(root).as_posix()
    except ValueError:
        return photo.resolve().as_posix()


def _stamp(photo: Path) -> list[int]:
    st = photo.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _read_cache(cache: Path | None) -> dict[str, Any]:
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the detection cache {cache} is not valid JSON ({err}): delete it "
                         "and run again") from err
    if data.get("version") != _CACHE_VERSION:
        return {}
    return dict(data.get("faces", {}))


def crop_faces(
    photos: Sequence[PadPhoto],
    pad_input: PadInput | None = None,
    detector: Any = None,
    cache: str | Path | None = None,
    root: str | Path | None = None,
    progress: bool = False,
) -> PadFaces:
    """Detect the largest face of each photo and cut its context crop.

    Args:
        detector: a :class:`~facemetric.align.detect.FaceDetector` (default: HOG,
            ``upsample=1``, as the recognizer's pipeline builds it).
        cache: JSON file of detections (read, then updated with new ones).
        root: what cache keys are relative to (default: the photos' common folder).
    """
    from facemetric.data.images import ImageLoadError, load_image

    pad_input = pad_input or PadInput()
    cache_path = None if cache is None else Path(cache)
    known = _read_cache(cache_path)
    base = Path(root) if root is not None else _common_root(photos)
    crops, attack, subjects, paths, boxes = [], [], [], [], []
    missing: list[tuple[Path, str]] = []
    seconds, detected = 0.0, 0
    items = photos
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(photos, desc="detect faces", unit="photo")
    import time

    for photo in items:
        try:
            rgb = load_image(photo.path)
        except ImageLoadError as err:
            missing.append((photo.path, err.reason))
            continue
        key = _key(photo.path, base)
        hit = known.get(key)
        if hit is None or hit.get("stamp") != _stamp(photo.path):
            if detector is None:
                from facemetric.align.detect import FaceDetector

                detector = FaceDetector(pad_input.detector, upsample=1)
            started = time.perf_counter()
            faces = detector.detect(rgb)
            seconds += time.perf_counter() - started
            detected += 1
            if faces:
                face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
                hit = {"box": list(face.box), "landmarks": face.landmarks.tolist()}
            else:
                hit = {"box": None}
            hit["stamp"] = _stamp(photo.path)
            known[key] = hit
        if hit["box"] is None:
            missing.append((photo.path, "no face found"))
            continue
        box = tuple(int(v) for v in hit["box"])
        crops.append(pad_input.crop(rgb, box, np.asarray(hit["landmarks"], np.float64)))
        attack.append(photo.is_attack)
        subjects.append(photo.subject)
        paths.append(photo.path)
        boxes.append(box)
    if cache_path is not None and detected:
        atomic_write_text(cache_path, json.dumps({"version": _CACHE_VERSION, "faces": known}))
    return PadFaces(crops, np.asarray(attack, bool), np.asarray(subjects, dtype=str), paths,
                    np.asarray(boxes, np.int64).reshape(-1, 4), pad_input, missing, seconds,
                    detected)


def _common_root(photos: Sequence[PadPhoto]) -> Path:
    import os

    if not photos:
        return Path(".")
    return Path(os.path.commonpath([str(p.path.parent) for p in photos]))


def load_pad_faces(root: str | Path, pad_input: PadInput | None = None,
                   cache: str | Path | None = None, progress: bool = False,
                   subjects: Sequence[str] | None = None,
                   per_class: int | None = None) -> PadFaces:
    """:func:`scan_pad_folder` + :func:`crop_faces`; ``subjects`` keeps only those,
    ``per_class`` only the first (evenly spaced) that many photos per subject and class."""
    photos = scan_pad_folder(root)
    if subjects is not None:
        wanted = {str(s) for s in subjects}
        unknown = wanted - {p.subject for p in photos}
        if unknown:
            raise ValueError(f"subjects {sorted(unknown)} are not in {root}")
        photos = [p for p in photos if p.subject in wanted]
    if per_class is not None:
        kept: list[PadPhoto] = []
        for s in sorted({p.subject for p in photos}):
            for attack in (False, True):
                group = [p for p in photos if p.subject == s and p.is_attack == attack]
                idx = np.unique(np.linspace(0, len(group) - 1, min(per_class, len(group)))
                                .round().astype(int))
                kept.extend(group[i] for i in idx)
        photos = kept
    return crop_faces(photos, pad_input, cache=cache, root=root, progress=progress)


__all__ = ["CLASSES", "PadFaces", "PadPhoto", "crop_faces", "load_pad_faces", "scan_pad_folder"]
