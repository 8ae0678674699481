"""Align a whole identity-folder tree once: parallel, resumable, with a failure report."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemetric.align.aligner import ALIGNED_STATUSES, AlignResult, AlignStatus, FaceAligner
from facemetric.align.detect import check_detector_args
from facemetric.atomic import TEMP_PREFIX, atomic_write_bytes

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".tif", ".tiff", ".webp"}
)
"""File suffixes (lower case) treated as images when walking the source tree."""

OUTPUT_SUFFIXES = (".jpg", ".png")
REPORT_NAME = "align_report.json"
_WRITTEN = ALIGNED_STATUSES | {AlignStatus.FALLBACK_CENTRE_CROP}
_QUIET = frozenset({AlignStatus.OK, AlignStatus.GIVEN_LANDMARKS})


@dataclass(frozen=True)
class ImageRecord:
    """One image's line in the report: its path relative to the source root, POSIX style."""

    path: str
    status: AlignStatus
    reason: str = ""


@dataclass(frozen=True)
class AlignReport:
    """Summary of an :func:`align_folder` run.

    Attributes:
        src, dst: the source and output roots.
        report_path: where the JSON report was written.
        total: images found under ``src``.
        skipped: images skipped because their output already existed.
        counts: statuses of the images processed in this run.
        problems: every image whose status is not ``ok``/``given_landmarks`` — from this
            run, plus those of earlier runs whose (fallback or multi-face) outputs were
            skipped — sorted by path.
        elapsed_s: wall time of the run.
    """

    src: Path
    dst: Path
    report_path: Path
    total: int
    skipped: int
    counts: dict[AlignStatus, int] = field(default_factory=dict)
    problems: list[ImageRecord] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def processed(self) -> int:
        """Images aligned (or attempted) in this run."""
        return self.total - self.skipped

    @property
    def written(self) -> int:
        """Output files written in this run."""
        return sum(n for status, n in self.counts.items() if status in _WRITTEN)

    @property
    def failed(self) -> int:
        """Images of this run without an output (no face, unreadable, error)."""
        return self.processed - self.written

    def summary(self) -> str:
        """A few lines for a person: counts by status, failures, where the report is."""
        by_status = ", ".join(f"{s.value} {n}" for s, n in sorted(self.counts.items()))
        return (
            f"aligned {self.src} -> {self.dst} in {self.elapsed_s:.1f} s: {self.total} images, "
            f"{self.skipped} already done, {self.written} written, {self.failed} failed\n"
            f"  by status: {by_status or 'nothing processed'}\n"
            f"  report: {self.report_path}"
        )


# --- worker side --------------------------------------------------------------------------

_worker_aligner: FaceAligner | None = None


def _init_worker(settings: dict[str, Any]) -> None:
    global _worker_aligner
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    _worker_aligner = FaceAligner(**settings)


def _encode(face: Any, suffix: str) -> bytes:
    import cv2

    bgr = cv2.cvtColor(face, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix == ".jpg" else []
    ok, buf = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {suffix} image")
    return buf.tobytes()


def _process(task: tuple[str, str, str, str | None], aligner: FaceAligner) -> ImageRecord:
    rel, src, out, landmarks = task
    try:
        result: AlignResult = aligner.align_file(src, landmarks)
        if result.face is not None:
            atomic_write_bytes(Path(out), _encode(result.face, Path(out).suffix))
    except Exception as err:  # one bad image must not end a 13k-image job
        return ImageRecord(rel, AlignStatus.ERROR, f"{type(err).__name__}: {err}")
    return ImageRecord(rel, result.status, result.reason)


def _process_in_worker(task: tuple[str, str, str, str | None]) -> ImageRecord:
    assert _worker_aligner is not None, "worker not initialised"
    return _process(task, _worker_aligner)


# --- driver side --------------------------------------------------------------------------


def _list_images(src: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _previous_problems(report_path: Path) -> dict[str, ImageRecord]:
    try:
        data = json.loads(report_path.read_text(encoding="utf-8"))
        return {
            p["path"]: ImageRecord(p["path"], AlignStatus(p["status"]), p.get("reason", ""))
            for p in data.get("problems", [])
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _remove_stale_temps(dst: Path) -> None:
    for dirpath, _, filenames in os.walk(dst):
        for name in filenames:
            if name.startswith(TEMP_PREFIX):
                Path(dirpath, name).unlink(missing_ok=True)


def align_folder(
    src: str | Path,
    dst: str | Path,
    *,
    workers: int | None = None,
    fallback: bool = False,
    fallback_crop: float = 1.0,
    detector: str = "hog",
    landmarks: str = "dlib68",
    upsample: int = 1,
    max_side: int | None = 1024,
    landmarks_root: str | Path | None = None,
    suffix: str = ".jpg",
    overwrite: bool = False,
    progress: bool = True,
    report_path: str | Path | None = None,
) -> AlignReport:
    """Align every image under ``src`` into the same tree under ``dst`` (112×112 RGB).

    ``src/<identity>/<name>.<ext>`` becomes ``dst/<identity>/<name><suffix>``. The job is
    resumable: an image whose output exists is skipped (unless ``overwrite``), each output
    is written to a temporary file and renamed into place, so an interrupted run leaves no
    half-written image and a rerun picks up where it stopped. Images without an output
    (no face, unreadable) are retried by a rerun.

    Args:
        src: root of the image tree (any depth; hidden files and folders are ignored).
        dst: output root, created if needed; must not lie inside ``src``.
        workers: processes (each loads the dlib models once); ``None`` → the usable CPU
            count; ``1`` runs in this process. Workers are spawned, so a script calling
            this with ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.
        fallback, fallback_crop: see :class:`~facemetric.align.aligner.FaceAligner`.
        detector, landmarks, upsample, max_side: see
            :class:`~facemetric.align.detect.FaceDetector`.
        landmarks_root: optional tree of landmark files mirroring ``src``
            (``<landmarks_root>/<rel>.txt``, e.g. CFP's ``Data/Fiducials`` for
            ``Data/Images``); an image with such a file is aligned from it, without
            detection; an image without one is detected as usual.
        suffix: output format, ``".jpg"`` (quality 95) or ``".png"``.
        overwrite: redo images whose output exists.
        progress: show a tqdm progress bar.
        report_path: JSON report location; default ``dst/align_report.json``.

    Returns:
        An :class:`AlignReport`; the JSON report holds the same summary and one
        ``{"path", "status", "reason"}`` entry per problem image.

    Raises:
        ValueError: bad arguments, ``src`` missing, ``dst`` inside ``src``, or two source
            images that would share one output file (``a.jpg`` and ``a.png``).
        RuntimeError: a worker process died; what was written is kept for a rerun.
    """
    start = time.perf_counter()
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise ValueError(f"source folder {src} does not exist")
    if dst == src or src in dst.parents:
        raise ValueError(f"output folder {dst} must not lie inside the source folder {src}")
    suffix = suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"suffix must be one of {OUTPUT_SUFFIXES}, got {suffix!r}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    lm_root = None if landmarks_root is None else Path(landmarks_root).resolve()
    if lm_root is not None and not lm_root.is_dir():
        raise ValueError(f"landmarks folder {lm_root} does not exist")
    check_detector_args(detector, landmarks, upsample, max_side)
    settings: dict[str, Any] = {
        "detector": detector,
        "landmarks": landmarks,
        "upsample": upsample,
        "max_side": max_side,
        "fallback": fallback,
        "fallback_crop": fallback_crop,
    }
    FaceAligner(**settings)  # validates fallback_crop before any process starts
    report_file = Path(report_path) if report_path is not None else dst / REPORT_NAME

    images = _list_images(src)
    outputs: dict[Path, Path] = {}
    for image in images:
        out = dst / image.relative_to(src).with_suffix(suffix)
        if out in outputs:
            raise ValueError(
                f"{outputs[out]} and {image} would both be written to {out}; rename one"
            )
        outputs[out] = image
    dst.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dst)

    tasks: list[tuple[str, str, str, str | None]] = []
    skipped_rel: list[str] = []
    for out, image in outputs.items():
        rel = image.relative_to(src)
        if out.exists() and not overwrite:
            skipped_rel.append(rel.as_posix())
            continue
        lm = None
        if lm_root is not None:
            candidate = lm_root / rel.with_suffix(".txt")
            lm = str(candidate) if candidate.is_file() else None
        tasks.append((rel.as_posix(), str(image), str(out), lm))

    records = _run(tasks, settings, workers, progress)

    earlier = _previous_problems(report_file)
    problems = [r for r in records if r.status not in _QUIET]
    problems += [earlier[p] for p in skipped_rel if p in earlier]
    problems.sort(key=lambda r: r.path)
    counts = dict(Counter(r.status for r in records))
    report = AlignReport(
        src=src,
        dst=dst,
        report_path=report_file,
        total=len(images),
        skipped=len(skipped_rel),
        counts=counts,
        problems=problems,
        elapsed_s=time.perf_counter() - start,
    )
    _write_report(report, settings, suffix)
    return report


def _run(
    tasks: list[tuple[str, str, str, str | None]],
    settings: dict[str, Any],
    workers: int,
    progress: bool,
) -> list[ImageRecord]:
    from tqdm import tqdm

    records: list[ImageRecord] = []
    if not tasks:
        return records
    bar = tqdm(total=len(tasks), unit="img", desc="align", disable=not progress)
    try:
        if workers == 1 or len(tasks) == 1:
            aligner = FaceAligner(**settings)
            for task in tasks:
                records.append(_process(task, aligner))
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked dlib/torch/OpenMP state
            n = min(workers, len(tasks))
            pool = ProcessPoolExecutor(n, ctx, _init_worker, (settings,))
            try:
                futures = [pool.submit(_process_in_worker, task) for task in tasks]
                for future in as_completed(futures):
                    records.append(future.result())
                    bar.update()
            except BrokenProcessPool as err:
                raise RuntimeError(
                    "an alignment worker process died (out of memory, a crash inside dlib, "
                    "or a script calling align_folder without an `if __name__ == "
                    "'__main__':` guard); the outputs written so far are kept: run again "
                    "to resume"
                ) from err
            finally:  # on Ctrl-C too: drop queued images, let running ones finish writing
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return records


def _write_report(report: AlignReport, settings: dict[str, Any], suffix: str) -> None:
    data = {
        "src": str(report.src),
        "dst": str(report.dst),
        "settings": {**settings, "suffix": suffix},
        "total": report.total,
        "skipped_existing": report.skipped,
        "processed": report.processed,
        "written": report.written,
        "failed": report.failed,
        "counts": {str(k): v for k, v in sorted(report.counts.items())},
        "elapsed_s": round(report.elapsed_s, 3),
        "problems": [
            {"path": r.path, "status": str(r.status), "reason": r.reason} for r in report.problems
        ],
    }
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(report.report_path, text.encode("utf-8"))
