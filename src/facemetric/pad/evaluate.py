"""Leave-subjects-out evaluation of a PAD detector.

Frames of one subject and session are nearly identical, so a random split of photos puts
near-copies of the test photos in the training set and measures memorisation. Here the
*subjects* are split into ``folds`` groups (subject ``j`` of the sorted list into group
``j mod folds``; ``folds`` = number of subjects is leave-one-subject-out). For each group:
train a detector on the other subjects — its threshold chosen on those training subjects
only (see :func:`~facemetric.pad.lbp.train_lbp`, :func:`~facemetric.pad.cnn.train_cnn`) —
and score the group's photos.

Reported (ISO/IEC 30107-3 terms, :mod:`facemetric.evaluation.pad`):

- per fold: APCER, BPCER, ACER at the fold's own threshold, BPCER@APCER 5 % / 1 %;
- pooled: every fold's decisions at its own threshold, counted together
  (``APCER = Σ accepted attacks / Σ attacks``); BPCER@APCER and the DET curve of the
  pooled scores (scores of different fold models put on one axis: an approximation that
  assumes their scales agree);
- speed: milliseconds to score one face (a context crop; face detection not included),
  one CPU thread, median of single-face calls — wall time and the process's CPU time (the
  latter is steadier when other work shares the machine).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.evaluation.pad import PadErrors, PadReport, pad_report
from facemetric.pad.base import PadDetector
from facemetric.pad.data import PadFaces

DETECTOR_KINDS = ("lbp", "cnn")


def subject_folds(subjects: Sequence[str], folds: int) -> list[list[str]]:
    """Subjects (sorted, distinct) dealt into ``folds`` groups: subject ``j`` → ``j mod folds``.

    Raises:
        ValueError: fewer than 2 folds, or more folds than subjects.
    """
    groups = sorted({str(s) for s in subjects})
    if folds < 2 or folds > len(groups):
        raise ValueError(f"folds must be between 2 and the number of subjects "
                         f"({len(groups)}), got {folds}")
    return [groups[i::folds] for i in range(folds)]


@dataclass(frozen=True)
class FoldResult:
    """One fold: its test subjects, the detector's threshold (from the training subjects)
    and the test errors at it."""

    fold: int
    test_subjects: tuple[str, ...]
    train_subjects: tuple[str, ...]
    threshold: float
    report: PadReport
    scores: np.ndarray
    is_attack: np.ndarray
    paths: tuple[str, ...]
    train_seconds: float
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"fold": self.fold, "test_subjects": list(self.test_subjects),
                "train_subjects": list(self.train_subjects), "threshold": self.threshold,
                **self.report.to_dict(), "train_seconds": self.train_seconds,
                "detector_info": self.info}


@dataclass(frozen=True)
class PadEvaluation:
    """Per-fold and pooled results (module docstring)."""

    kind: str
    folds: tuple[FoldResult, ...]
    pooled: PadErrors
    pooled_report: PadReport
    ms_per_face: float
    faces_timed: int
    cpu_ms_per_face: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "detector": self.kind,
            "pooled": {**self.pooled.to_dict(), "threshold": "each fold's own", **{k: v for k, v in
                                                 self.pooled_report.to_dict().items()
                                                 if k.startswith(("bpcer_at", "unresolved"))}},
            "ms_per_face_single_thread": self.ms_per_face,
            "cpu_ms_per_face_single_thread": self.cpu_ms_per_face,
            "faces_timed": self.faces_timed,
            "folds": [f.to_dict() for f in self.folds],
            "scores": [{"path": p, "attack": bool(a), "score": float(s), "fold": f.fold}
                       for f in self.folds
                       for p, a, s in zip(f.paths, f.is_attack, f.scores, strict=True)],
        }

    def summary(self) -> str:
        lines = [f"{self.kind}: leave-subjects-out, {len(self.folds)} folds"]
        for f in self.folds:
            e = f.report.at_threshold
            lines.append(f"  fold {f.fold} test {','.join(f.test_subjects)}: {e}")
        lines.append(f"  pooled (each fold at its own threshold): APCER "
                     f"{100 * self.pooled.apcer:.2f}% ({self.pooled.attacks} attacks), BPCER "
                     f"{100 * self.pooled.bpcer:.2f}% ({self.pooled.bona_fide} bona fide), "
                     f"ACER {100 * self.pooled.acer:.2f}%")
        lines.extend(f"  pooled scores: {b}" for b in self.pooled_report.bpcer_at)
        lines.append(f"  speed: {self.ms_per_face:.2f} ms per face wall, "
                     f"{self.cpu_ms_per_face:.2f} ms CPU (one thread, median of "
                     f"{self.faces_timed} faces, detection excluded)")
        return "\n".join(lines)


def time_per_face(detector: PadDetector, crops: Sequence[np.ndarray], repeats: int = 1,
                  clock: str = "wall") -> float:
    """Median milliseconds of ``detector.score([crop])`` over ``crops``, torch and OpenCV
    limited to one thread for the measurement. ``clock="cpu"`` measures the process's CPU
    time instead of wall time (steadier on a shared machine)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    import cv2
    import torch

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        detector.score(list(crops[:1]))  # warm-up
        times = []
        for _ in range(repeats):
            for crop in crops:
                started = now()
                detector.score([crop])
                times.append(1000.0 * (now() - started))
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    return float(statistics.median(times))


def train_detector(kind: str, faces: PadFaces, **options: Any) -> PadDetector:
    """Train a detector of ``kind`` (``"lbp"`` or ``"cnn"``) on ``faces``; ``options`` go
    to :func:`~facemetric.pad.lbp.train_lbp` / :func:`~facemetric.pad.cnn.train_cnn`."""
    if kind == "lbp":
        from facemetric.pad.lbp import train_lbp

        return train_lbp(faces.crops, faces.is_attack, faces.subjects.tolist(),
                         pad_input=faces.input, **options)
    if kind == "cnn":
        from facemetric.pad.cnn import train_cnn

        return train_cnn(faces.crops, faces.is_attack, faces.subjects.tolist(),
                         pad_input=faces.input, **options)
    raise ValueError(f"unknown PAD detector {kind!r}; choose one of {DETECTOR_KINDS}")


def leave_subjects_out(
    faces: PadFaces,
    kind: str,
    folds: int = 3,
    apcer_targets: Sequence[float] = (0.05, 0.01),
    timed_faces: int = 50,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> PadEvaluation:
    """Evaluate ``kind`` by leave-subjects-out cross-validation (module docstring)."""
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"unknown PAD detector {kind!r}; choose one of {DETECTOR_KINDS}")
    results = []
    detector: PadDetector | None = None
    test_crops: list[np.ndarray] = []
    for i, group in enumerate(subject_folds(faces.subjects.tolist(), folds)):
        test = np.isin(faces.subjects, group)
        train = faces.subset(~test)
        held = faces.subset(test)
        started = time.perf_counter()
        detector = train_detector(kind, train, **options)
        seconds = time.perf_counter() - started
        scores = detector.score(held.crops)
        report = pad_report(scores, held.is_attack, detector.threshold, apcer_targets)
        results.append(FoldResult(
            i, tuple(group), tuple(sorted(set(train.subjects.tolist()))), detector.threshold,
            report, scores, held.is_attack, tuple(str(p) for p in held.paths), seconds,
            detector.info))
        test_crops = held.crops
        if log is not None:
            log(f"fold {i} (test {','.join(group)}): {report.at_threshold} "
                f"[trained in {seconds:.0f} s]")
    assert detector is not None
    accepted = sum(int(np.sum(f.scores[f.is_attack] < f.threshold)) for f in results)
    rejected = sum(int(np.sum(f.scores[~f.is_attack] >= f.threshold)) for f in results)
    attacks = sum(int(f.is_attack.sum()) for f in results)
    bona = sum(int((~f.is_attack).sum()) for f in results)
    pooled = PadErrors(float("nan"), accepted / attacks, rejected / bona, attacks, bona,
                       {"attack": accepted / attacks})
    all_scores = np.concatenate([f.scores for f in results])
    all_attack = np.concatenate([f.is_attack for f in results])
    # the DET/BPCER@APCER of pooled scores; the dot is drawn at the pooled per-fold errors
    base = pad_report(all_scores, all_attack, float(np.median([f.threshold for f in results])),
                      apcer_targets)
    pooled_report = PadReport(pooled, base.bpcer_at, base.det)
    timed = test_crops[:timed_faces]
    ms = time_per_face(detector, timed)
    cpu_ms = time_per_face(detector, timed, clock="cpu")
    return PadEvaluation(kind, tuple(results), pooled, pooled_report, ms, len(timed), cpu_ms)


def write_evaluation(evaluation: PadEvaluation, out: str | Path) -> dict[str, Path]:
    """``out/pad_<kind>.json`` (everything, per-photo scores included) and
    ``out/det_<kind>.png`` (pooled DET with each fold's curve)."""
    import json

    from facemetric.atomic import atomic_write_text
    from facemetric.evaluation.pad import plot_det

    out = Path(out)
    report = atomic_write_text(out / f"pad_{evaluation.kind}.json",
                               json.dumps(evaluation.to_dict(), indent=2))
    curves = {"pooled": evaluation.pooled_report,
              **{f"fold {f.fold}": f.report for f in evaluation.folds}}
    det = plot_det(curves, out / f"det_{evaluation.kind}.png",
                   title=f"DET, {evaluation.kind} detector, leave-subjects-out")
    return {"json": report, "det": det}


__all__ = [
    "DETECTOR_KINDS",
    "FoldResult",
    "PadEvaluation",
    "leave_subjects_out",
    "subject_folds",
    "time_per_face",
    "train_detector",
    "write_evaluation",
]
