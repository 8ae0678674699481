"""``facemetric robustness``: how verification degrades when one photo of each pair does.

For a verification protocol (LFW ``pairsDevTest``, CFP frontal–frontal or frontal–profile),
every pair is re-scored with *one* of its two photos degraded (which one is drawn per pair
from the seed) at each severity of each degradation of :mod:`facemetric.data.degradations`
(resolution, blur, JPEG, brightness/contrast/gamma, sunglasses, mask, random patches,
in-plane rotation); horizontal pose is the CFP-FP protocol itself (run ``cfp-ff`` and
``cfp-fp`` and compare). Several models are measured on the very same degraded photos, so
their curves can share a plot.

Alignment of a degraded photo. Every photo is aligned with the landmarks found on its
*clean* version (LFW: dlib HOG + 68 points, the detected face nearest the centre; photos
where none is found use the mean landmarks of the detected photos; CFP: its hand-labelled
fiducials), whatever was done to it. This isolates the *embedding's* robustness from the
detector's. The detector is run separately on each degraded photo (``detect=True``) and
its failures are counted: no face found, or none within one interocular distance of the
clean face. A camera-side degradation (downscale, blur, JPEG) acts on the photo before
alignment; the geometric ones act on the photo at the clean landmarks, which — alignment
being a similarity — is the same as acting on the aligned crop at the template's landmark
positions (see :mod:`facemetric.data.degradations`).

Costs: the clean photos are aligned and embedded once per model; per severity only the
degraded photo of each pair is made (once, shared by all models), aligned once per template
and embedded once per model. Scores are cosine similarities; accuracy is the protocol's
10-fold accuracy (threshold chosen on the other folds), TAR at each FAR from the ROC of all
pairs (:mod:`facemetric.evaluation.verification`).

Outputs in ``out_dir``: ``report.md``, ``metrics.json``, ``metrics.csv`` (one row per model,
degradation, severity), ``<degradation>.png`` (accuracy and TAR@FAR against severity, one
line per model) and ``examples.png`` (one face at every severity).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.align.landmarks import template_correspondences
from facemetric.align.templates import TEMPLATE_SIZES, warp_to_template
from facemetric.align.warp import ALIGNED_SIZE, ARCFACE_TEMPLATE, estimate_similarity
from facemetric.atomic import atomic_write_bytes
from facemetric.data.degradations import (
    CAMERA,
    CLEAN_SEVERITY,
    DEFAULT_SEVERITIES,
    Degradation,
    FaceGeometry,
    make_degradation,
)
from facemetric.data.images import load_image
from facemetric.evaluation.protocols import PairList, read_cfp_pairs, read_lfw_pairs
from facemetric.evaluation.verification import verification_report
from facemetric.inference import Encoder, load_model

PROTOCOLS = ("lfw-devtest", "cfp-ff", "cfp-fp")
"""Protocols a report can use: LFW View 1 ``pairsDevTest`` and CFP's FF and FP."""

DEFAULT_FARS = (1e-3, 1e-2)
"""FARs whose TAR is reported (one needs at least ``1/FAR`` impostor pairs)."""


# ------------------------------------------------------------------------------ photos


@dataclass(frozen=True, eq=False)
class Photo:
    """One protocol photo and the landmarks found on its clean version."""

    path: Path
    points: np.ndarray
    scheme: str
    detected: bool

    def geometry(self) -> FaceGeometry:
        """Its :class:`FaceGeometry` (:func:`face_geometry`)."""
        return face_geometry(self.points, self.scheme)


def face_geometry(points: np.ndarray, scheme: str) -> FaceGeometry:
    """The five ArcFace points and the crop side of a face, in photo pixels.

    With ``M`` the least-squares similarity from the landmarks to the 112 px ArcFace
    template (as alignment computes it) and ``s`` its scale, the five points are
    ``M⁻¹(template)`` and the width is ``112 / s``: the part of the photo the aligned crop
    shows. Works for every landmark scheme alignment accepts.
    """
    src, dst = template_correspondences(points, scheme)
    m = estimate_similarity(src, dst)
    a = m[:, :2]
    scale = math.sqrt(abs(float(np.linalg.det(a))))
    if not scale > 0:
        raise ValueError(f"landmarks {scheme!r} are degenerate (zero-size face)")
    inv = np.linalg.inv(a)
    five = (ARCFACE_TEMPLATE - m[:, 2]) @ inv.T
    return FaceGeometry(five, ALIGNED_SIZE / scale)


@dataclass(frozen=True, eq=False)
class RobustnessPairs:
    """The protocol's (subsampled) pairs over unique photos, and which side is degraded."""

    protocol: str
    photos: tuple[Photo, ...]
    index_a: np.ndarray
    index_b: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray
    degraded_side: np.ndarray
    """0: the pair's first photo is degraded, 1: the second."""

    def __len__(self) -> int:
        return int(self.is_same.shape[0])

    @property
    def degraded(self) -> np.ndarray:
        """Photo index of the degraded photo of each pair."""
        return np.where(self.degraded_side == 0, self.index_a, self.index_b)

    @property
    def kept(self) -> np.ndarray:
        """Photo index of the clean photo of each pair."""
        return np.where(self.degraded_side == 0, self.index_b, self.index_a)

    @property
    def clean_detection_failures(self) -> int:
        """Photos whose clean version had no detected face (aligned with mean landmarks)."""
        return sum(not p.detected for p in self.photos)


def select_pairs(is_same: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` pairs, half matched and half not (as near as the counts
    allow), drawn without replacement from ``numpy.random.default_rng([seed, 1])``; all
    pairs when ``count`` is ``None`` or not smaller than their number."""
    n = int(is_same.shape[0])
    if count is None or count >= n:
        return np.arange(n)
    if count < 4:
        raise ValueError(f"--pairs must be at least 4 (2 matched, 2 not), got {count}")
    rng = np.random.default_rng([seed, 1])
    same = np.flatnonzero(is_same)
    diff = np.flatnonzero(~is_same)
    take_same = min(len(same), count // 2)
    take_diff = min(len(diff), count - take_same)
    chosen = np.r_[rng.choice(same, take_same, replace=False),
                   rng.choice(diff, take_diff, replace=False)]
    return np.sort(chosen)


def _protocol_pairs(protocol: str, data_root: Path) -> tuple[PairList, str]:
    if protocol == "lfw-devtest":
        lfw = data_root / "lfw"
        pairs_file = lfw / "pairsDevTest.txt"
        if not pairs_file.is_file():
            raise FileNotFoundError(
                f"no {pairs_file}: --data must hold lfw/pairsDevTest.txt and "
                "lfw/lfw-deepfunneled (see the data README)"
            )
        return read_lfw_pairs(pairs_file, lfw / "lfw-deepfunneled"), "detect"
    if protocol in ("cfp-ff", "cfp-fp"):
        cfp = data_root / "cfp"
        if not (cfp / "Protocol").is_dir():
            raise FileNotFoundError(f"no {cfp / 'Protocol'}: --data must hold CFP's cfp/")
        return read_cfp_pairs(cfp, protocol[-2:].upper()), "fiducials"
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def _cfp_fiducials(path: Path) -> np.ndarray:
    from facemetric.align.landmarks import read_landmark_file

    parts = list(path.parts)
    where = len(parts) - 1 - parts[::-1].index("Images")
    parts[where] = "Fiducials"
    return read_landmark_file(Path(*parts).with_suffix(".txt"))


def _nearest_centre_points(faces: Sequence[Any], shape: tuple[int, ...]) -> np.ndarray | None:
    if not faces:
        return None
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    best = min(faces, key=lambda f: (f.centre[0] - cx) ** 2 + (f.centre[1] - cy) ** 2)
    return np.asarray(best.landmarks, dtype=np.float64)


def _landmark_cache(path: Path) -> dict[str, Any]:
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    return {}


def find_landmarks(
    paths: Sequence[Path], cache_file: Path | None, progress: bool = True
) -> list[tuple[np.ndarray | None, str]]:
    """dlib 68-point landmarks of the face nearest the centre of each clean photo (``None``
    where none is found), read from / added to a JSON ``cache_file``."""
    from tqdm import tqdm

    from facemetric.align.detect import FaceDetector

    cache = _landmark_cache(cache_file) if cache_file is not None else {}
    detector: FaceDetector | None = None
    out: list[tuple[np.ndarray | None, str]] = []
    for path in tqdm(paths, desc="landmarks", unit="img", disable=not progress):
        key = str(path)
        if key not in cache:
            detector = detector or FaceDetector(landmarks="dlib68", upsample=1)
            image = load_image(path)
            pts = _nearest_centre_points(detector.detect(image), image.shape)
            cache[key] = None if pts is None else pts.tolist()
        found = cache[key]
        out.append((None if found is None else np.asarray(found, dtype=np.float64), "dlib68"))
    if cache_file is not None:
        atomic_write_bytes(cache_file, json.dumps(cache).encode())
    return out


def load_pairs(
    protocol: str,
    data_root: str | os.PathLike[str],
    *,
    pairs: int | None = None,
    seed: int = 0,
    cache_file: Path | None = None,
    progress: bool = True,
) -> RobustnessPairs:
    """The protocol's pairs (``pairs`` of them, balanced, when given), each photo with its
    clean landmarks, and the seeded choice of the degraded side.

    Raises:
        FileNotFoundError: the protocol's files are not under ``data_root``.
        ValueError: unknown protocol, or photos missing from disk.
    """
    listed, source = _protocol_pairs(protocol, Path(data_root))
    chosen = select_pairs(np.asarray(listed.is_same), pairs, seed)
    sub = PairList(tuple(listed.path_a[i] for i in chosen), tuple(listed.path_b[i] for i in chosen),
                   np.asarray(listed.is_same)[chosen], np.asarray(listed.fold)[chosen])
    missing = sub.missing_images()
    if missing:
        raise ValueError(f"{len(missing)} protocol photos are missing, e.g. {missing[0]}")
    images, index_a, index_b = sub.unique_images()
    photos: list[Photo] = []
    if source == "fiducials":
        photos = [Photo(p, _cfp_fiducials(p), "cfp30", True) for p in images]
    else:
        found = find_landmarks(images, cache_file, progress)
        detected = [pts for pts, _ in found if pts is not None]
        if not detected:
            raise ValueError("the detector found no face in any photo of the protocol")
        mean = np.mean(detected, axis=0)
        photos = [Photo(p, mean if pts is None else pts, scheme, pts is not None)
                  for p, (pts, scheme) in zip(images, found, strict=True)]
    side = np.random.default_rng([seed, 2]).integers(0, 2, len(sub))
    return RobustnessPairs(protocol, tuple(photos), index_a, index_b,
                           np.asarray(sub.is_same, dtype=bool), np.asarray(sub.fold), side)


# ------------------------------------------------------------------------------ models


@dataclass
class NamedModel:
    """An encoder and the label its curves carry."""

    label: str
    encoder: Encoder

    @property
    def template(self) -> str:
        return self.encoder.contract.template


def model_label(source: str | os.PathLike[str]) -> str:
    """A short label for a model source: ``dlib``; an ONNX file's name; a run folder's or
    a checkpoint's folder path relative to ``runs/`` when under it."""
    text = str(source)
    if text == "dlib":
        return "dlib"
    path = Path(text)
    if path.suffix.lower() == ".onnx":
        return path.name
    folder = path if path.suffix != ".pt" else path.parent
    parts = folder.resolve().parts
    if "runs" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("runs"):]) or folder.name
    return folder.name


def named_models(
    models: Sequence[str | os.PathLike[str] | NamedModel], device: str = "cpu"
) -> list[NamedModel]:
    """Load each source (``load_model``), label it (:func:`model_label`, made unique)."""
    out: list[NamedModel] = []
    seen: dict[str, int] = {}
    for m in models:
        named = m if isinstance(m, NamedModel) else NamedModel(model_label(m),
                                                                load_model(m, device=device))
        count = seen.get(named.label, 0)
        seen[named.label] = count + 1
        if count:
            named = NamedModel(f"{named.label} ({count + 1})", named.encoder)
        out.append(named)
    if not out:
        raise ValueError("give at least one model")
    return out


# ------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class Row:
    """One model at one severity of one degradation (``degradation == "clean"``: none)."""

    model: str
    degradation: str
    severity: float
    accuracy: float
    accuracy_std: float
    auc: float
    tar: dict[str, float | None]
    pairs: int
    detection_failures: int | None
    detection_checked: int

    def flat(self) -> dict[str, Any]:
        """A flat dict (CSV/JSON row); ``tar@far=…`` keys."""
        severity = None if self.degradation == "clean" else self.severity
        out = {"model": self.model, "degradation": self.degradation, "severity": severity,
               "accuracy": self.accuracy, "accuracy_std": self.accuracy_std, "auc": self.auc}
        out.update({f"tar@far={k}": v for k, v in self.tar.items()})
        out.update(pairs=self.pairs, detection_failures=self.detection_failures,
                   detection_checked=self.detection_checked)
        return out


def _far_key(far: float) -> str:
    return f"{far:g}"


def _row(model: str, name: str, severity: float, scores: np.ndarray, pairs: RobustnessPairs,
         fars: Sequence[float], failures: int | None, checked: int) -> Row:
    rep = verification_report(scores, pairs.is_same, folds=pairs.fold, far_targets=fars)
    return Row(model, name, float(severity), rep.accuracy, rep.accuracy_std, rep.auc,
               {_far_key(f): rep.tar_at_far[float(f)] for f in fars}, len(pairs), failures,
               checked)


def _crops(images: Sequence[np.ndarray], photos: Sequence[Photo], template: str) -> np.ndarray:
    return np.stack([warp_to_template(img, p.points, p.scheme, template)
                     for img, p in zip(images, photos, strict=True)])


def _check_templates(models: Sequence[NamedModel], pairs: RobustnessPairs) -> None:
    schemes = {p.scheme for p in pairs.photos}
    for m in models:
        if m.template not in TEMPLATE_SIZES:
            raise ValueError(f"{m.label}: unknown template {m.template!r}")
        if m.template == "dlib150" and not schemes <= {"dlib68", "dlib5"}:
            raise ValueError(
                f"{m.label} needs dlib's own face chip (dlib150), which needs dlib landmarks; "
                f"{pairs.protocol} photos carry {sorted(schemes)} (CFP's fiducials: profiles "
                "defeat dlib's detector). Use --protocol lfw-devtest for dlib"
            )


def face_detected(detector: Any, image: np.ndarray, face: FaceGeometry) -> bool:
    """Whether the detector finds a face whose box centre lies within one interocular
    distance of the clean face's landmark centroid."""
    cx, cy = face.centre
    for f in detector.detect(image):
        fx, fy = f.centre
        if math.hypot(fx - cx, fy - cy) <= face.interocular:
            return True
    return False


@dataclass
class RobustnessResult:
    """Every row, and where the report was written."""

    protocol: str
    pairs: int
    rows: list[Row]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    clean_detection_failures: int = 0

    def table(self) -> str:
        """A plain-text table for a person."""
        fars = list(self.rows[0].tar) if self.rows else []
        head = f"{'model':<24}{'degradation':<12}{'severity':>9}{'accuracy':>16}"
        head += "".join(f"{'TAR@' + k:>12}" for k in fars) + f"{'det. fail':>11}"
        lines = [head]
        for r in self.rows:
            acc = f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}"
            tars = "".join(f"{'—' if v is None else f'{100 * v:.1f}%':>12}"
                           for v in r.tar.values())
            det = "" if r.detection_failures is None else \
                f"{r.detection_failures}/{r.detection_checked}"
            lines.append(f"{r.model:<24}{r.degradation:<12}{r.severity:>9g}{acc:>16}{tars}"
                         f"{det:>11}")
        return "\n".join(lines)


def _seed_for(seed: int, pair: int, deg: int, sev: int) -> np.random.Generator:
    return np.random.default_rng([seed, 3, deg, sev, pair])


def degraded_photo(
    degradation: Degradation, photo: np.ndarray, face: FaceGeometry, seed: int, pair: int,
    deg_index: int, sev_index: int,
) -> np.ndarray:
    """The degraded photo of one pair: a pure function of the seed and the pair's, the
    degradation's and the severity's positions (so every model sees the same photo)."""
    return degradation(photo, face, _seed_for(seed, pair, deg_index, sev_index))


def run_robustness(
    models: Sequence[str | os.PathLike[str] | NamedModel],
    *,
    protocol: str = "lfw-devtest",
    data_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    pairs: int | None = None,
    seed: int = 0,
    fars: Sequence[float] = DEFAULT_FARS,
    severities: Mapping[str, Sequence[float]] = DEFAULT_SEVERITIES,
    detect: bool = True,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RobustnessResult:
    """Measure ``models`` on ``protocol`` with one photo per pair degraded (module
    docstring) and write the report into ``out_dir``.

    Args:
        models: sources ``load_model`` reads (run folder, checkpoint, ``.onnx``, ``"dlib"``)
            or :class:`NamedModel`.
        protocol: one of :data:`PROTOCOLS`.
        data_root: holds ``lfw/`` and/or ``cfp/`` (``$FACEMETRIC_DATA``).
        pairs: use this many pairs (balanced, seeded) instead of all.
        seed: decides the pairs, the degraded side and every random degradation.
        fars: FARs whose TAR is reported.
        severities: degradation name → severities (most severe last).
        detect: also run the detector on each degraded photo and count its failures.
        batch_size: faces per forward pass.
        device: for checkpoints (``"cpu"``, ``"cuda"``, ``"auto"``).
        progress: progress bars.
        log: called with one line of news (pairs, photos).

    Raises:
        ValueError: unknown protocol or degradation, bad severities or FARs, a dlib model on
            CFP.
        FileNotFoundError: the protocol's files are missing.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    say = log or (lambda _msg: None)
    for f in fars:
        if not 0 < f < 1:
            raise ValueError(f"FARs must lie in (0, 1), got {f}")
    plan = [(name, [make_degradation(name, s) for s in sevs]) for name, sevs in severities.items()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    named = named_models(models, device=device)
    rp = load_pairs(protocol, data_root, pairs=pairs, seed=seed,
                    cache_file=out / f"landmarks_{protocol}.json", progress=progress)
    _check_templates(named, rp)
    say(f"{protocol}: {len(rp)} pairs over {len(rp.photos)} photos "
        f"({rp.clean_detection_failures} without a detected face: mean landmarks)")
    templates = sorted({m.template for m in named})

    # clean photos: aligned once per template, embedded once per model
    clean: dict[str, np.ndarray] = {}
    chunk = 256
    for t in templates:
        parts = []
        for a in tqdm(range(0, len(rp.photos), chunk), desc=f"align {t}", disable=not progress):
            batch = rp.photos[a:a + chunk]
            parts.append(_crops([load_image(p.path) for p in batch], batch, t))
        clean[t] = np.concatenate(parts)
    embedded = {m.label: m.encoder.embed_faces(clean[m.template], batch_size) for m in
                tqdm(named, desc="embed clean", disable=not progress)}
    rows: list[Row] = []
    for m in named:
        e = embedded[m.label]
        scores = np.sum(e[rp.index_a] * e[rp.index_b], axis=1)
        rows.append(_row(m.label, "clean", float("nan"), scores, rp, fars, None, 0))

    degraded_idx, kept_idx = rp.degraded, rp.kept
    sources = [load_image(rp.photos[i].path) for i in degraded_idx]
    faces = [rp.photos[i].geometry() for i in degraded_idx]
    photos = [rp.photos[i] for i in degraded_idx]
    detector = None
    if detect:
        from facemetric.align.detect import FaceDetector

        detector = FaceDetector(landmarks="dlib68", upsample=1)
    total = sum(len(d) for _, d in plan) * len(rp)
    bar = tqdm(total=total, desc="degrade", unit="pair", disable=not progress)
    examples: dict[str, list[np.ndarray]] = {}
    for d_i, (name, degradations) in enumerate(plan):
        for s_i, degradation in enumerate(degradations):
            images = []
            failures = 0
            for p_i in range(len(rp)):
                img = degraded_photo(degradation, sources[p_i], faces[p_i], seed, p_i, d_i, s_i)
                if detector is not None and not face_detected(detector, img, faces[p_i]):
                    failures += 1
                images.append(img)
                bar.update(1)
            crops = {t: _crops(images, photos, t) for t in templates}
            examples.setdefault(name, []).append(crops.get("arcface112",
                                                           crops[templates[0]])[0])
            for m in named:
                emb = m.encoder.embed_faces(crops[m.template], batch_size)
                scores = np.sum(emb * embedded[m.label][kept_idx], axis=1)
                rows.append(_row(m.label, name, degradation.severity, scores, rp, fars,
                                 failures if detect else None, len(rp) if detect else 0))
    bar.close()
    first = clean["arcface112"][degraded_idx[0]] if "arcface112" in clean else \
        clean[templates[0]][degraded_idx[0]]
    result = RobustnessResult(protocol, len(rp), rows, seconds=time.perf_counter() - start,
                              clean_detection_failures=rp.clean_detection_failures)
    result.files = write_report(result, out, [m.label for m in named], severities, fars,
                                examples, first, seed=seed, detect=detect,
                                models={m.label: m.encoder.contract.describe() for m in named})
    return result


# ------------------------------------------------------------------------------ report


def _axis(name: str, sevs: Sequence[float]) -> list[str]:
    return ["clean" if s is None else f"{s:g}" for s in [None, *sevs]]


def _plot(path: Path, name: str, rows: Sequence[Row], labels: Sequence[str],
          sevs: Sequence[float], far: str, protocol: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4), dpi=100)
    FigureCanvasAgg(fig)
    ticks = _axis(name, sevs)
    x = np.arange(len(ticks))
    panels = (("accuracy", "accuracy (10-fold), %"), ("tar", f"TAR @ FAR = {far}, %"),
              ("auc", "ROC AUC"))
    for k, (metric, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for label in labels:
            mine = [r for r in rows if r.model == label]
            at = {r.severity: r for r in mine if r.degradation == name}
            if not at:
                continue  # this model was not measured on this degradation
            clean = next(r for r in mine if r.degradation == "clean")
            points = [clean] + [at.get(float(s)) for s in sevs]
            ys = [np.nan if r is None else _metric(r, metric, far) for r in points]
            ax.plot(x, ys, marker="o", label=label)
        if metric == "tar" and not any(r.tar.get(far) is not None for r in rows):
            ax.text(0.5, 0.5, f"unresolvable: FAR {far} needs ≥ 1/FAR impostor pairs",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_xticks(x, ticks)
        ax.set_xlabel(f"{name} ({_UNITS[name]})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"{protocol}: one photo of each pair degraded by {name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _metric(row: Row, metric: str, far: str) -> float:
    if metric == "auc":
        return row.auc
    value = row.accuracy if metric == "accuracy" else row.tar.get(far)
    return np.nan if value is None else 100 * value


_UNITS = {
    "downscale": "px of detail in the 112 px crop", "blur": "σ, px of the 112 px crop",
    "jpeg": "quality", "brightness": "factor", "contrast": "factor", "gamma": "γ",
    "sunglasses": "band height / interocular", "mask": "cover, mouth→eyes",
    "patches": "fraction of the face box", "rotation": "degrees",
}


def _examples_png(path: Path, examples: Mapping[str, Sequence[np.ndarray]],
                  clean: np.ndarray, severities: Mapping[str, Sequence[float]]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(examples)
    cols = 1 + max(len(v) for v in examples.values())
    fig = Figure(figsize=(1.4 * cols, 1.5 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    for r, name in enumerate(names):
        for c, img in enumerate([clean, *examples[name]]):
            ax = fig.add_subplot(len(names), cols, r * cols + c + 1)
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            ax.set_title("clean" if c == 0 else f"{severities[name][c - 1]:g}", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def write_report(
    result: RobustnessResult,
    out: Path,
    labels: Sequence[str],
    severities: Mapping[str, Sequence[float]],
    fars: Sequence[float],
    examples: Mapping[str, Sequence[np.ndarray]] | None,
    clean_example: np.ndarray | None,
    *,
    seed: int,
    detect: bool,
    models: Mapping[str, str],
) -> dict[str, Path]:
    """``report.md``, ``metrics.json``, ``metrics.csv``, one PNG per degradation and
    ``examples.png`` (when ``examples`` are given) in ``out``."""
    files: dict[str, Path] = {}
    flat = [r.flat() for r in result.rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    files["csv"] = atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    meta = {"protocol": result.protocol, "pairs": result.pairs, "seed": seed,
            "fars": list(fars), "detect": detect, "models": dict(models),
            "severities": {k: list(v) for k, v in severities.items()},
            "clean_detection_failures": result.clean_detection_failures,
            "seconds": result.seconds}
    text = json.dumps({**meta, "rows": flat}, indent=1, allow_nan=False)
    files["json"] = atomic_write_bytes(out / "metrics.json", text.encode())
    resolvable = [_far_key(f) for f in fars if f * (result.pairs / 2) >= 1]
    plot_far = resolvable[0] if resolvable else _far_key(max(fars))
    for name, sevs in severities.items():
        files[name] = _plot(out / f"{name}.png", name, result.rows, labels, sevs, plot_far,
                            result.protocol)
    if examples and clean_example is not None:
        files["examples"] = _examples_png(out / "examples.png", examples, clean_example,
                                          severities)

    far_keys = [_far_key(f) for f in fars]
    lines = [
        f"# Robustness report: {result.protocol}",
        "",
        f"{result.pairs} pairs (seed {seed}); one photo of each pair degraded (side drawn per "
        "pair from the seed), the other clean. Every degraded photo is aligned with the "
        "landmarks found on its clean version, so the numbers measure the embedding; "
        + ("the detector's failures on the degraded photos (no face within one interocular "
           "distance of the clean one) are counted separately (`det. fail`)."
           if detect else "the detector was not run on the degraded photos."),
        "",
        f"Clean photos without a detected face (aligned with the mean landmarks): "
        f"{result.clean_detection_failures}.",
        "",
        "Models:",
        "",
        *[f"- **{k}**: {v}" for k, v in models.items()],
        "",
        "| model | degradation | severity | accuracy % | ± | AUC | "
        + " | ".join(f"TAR@FAR={k} %" for k in far_keys) + " | det. fail |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(far_keys) + "---:|",
    ]
    for r in result.rows:
        sev = "" if r.degradation == "clean" else f"{r.severity:g}"
        det = "" if r.detection_failures is None else \
            f"{r.detection_failures}/{r.detection_checked}"
        lines.append(f"| {r.model} | {r.degradation} | {sev} | {_pct(r.accuracy)} | "
                     f"{_pct(r.accuracy_std)} | {r.auc:.4f} | "
                     + " | ".join(_pct(r.tar.get(k)) for k in far_keys) + f" | {det} |")
    unres = [k for k in far_keys if k not in resolvable]
    if unres:
        lines += ["", f"TAR at FAR {', '.join(unres)} is unresolvable with "
                  f"{result.pairs // 2} impostor pairs (needs 1/FAR) and shows as —."]
    lines += ["", "Severity scales (see `facemetric.data.degradations`):", ""]
    lines += [f"- {k}: {_UNITS[k]} — {', '.join(f'{s:g}' for s in v)} (clean = "
              f"{CLEAN_SEVERITY[k]:g}){' — camera: before alignment' if k in CAMERA else ''}"
              for k, v in severities.items()]
    lines += ["", "Curves:", ""] + [f"![{k}]({k}.png)" for k in severities]
    if "examples" in files:
        lines += ["", "One degraded face per severity (ArcFace crop):", "",
                  "![examples](examples.png)"]
    lines += ["", f"Wall time {result.seconds / 60:.1f} min."]
    files["report"] = atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    return files


def _row_from(flat: Mapping[str, Any]) -> Row:
    tar = {k[len("tar@far="):]: v for k, v in flat.items() if k.startswith("tar@far=")}
    severity = float("nan") if flat["severity"] is None else float(flat["severity"])
    return Row(flat["model"], flat["degradation"], severity, flat["accuracy"],
               flat["accuracy_std"], flat["auc"], tar, flat["pairs"],
               flat["detection_failures"], flat["detection_checked"])


def merge_reports(folders: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
                  ) -> RobustnessResult:
    """One report from several runs' ``metrics.json`` (e.g. a slow model measured on fewer
    degradations in a run of its own): their curves share the plots.

    The runs must agree on protocol, pairs and seed — then their degraded photos are the
    same pixels (module docstring) and the lines are comparable. A model label met twice
    keeps its first run's rows.

    Raises:
        ValueError: runs that disagree on protocol, pairs or seed; no folders.
        FileNotFoundError: a folder without ``metrics.json``.
    """
    if not folders:
        raise ValueError("give at least one report folder to merge")
    metas = []
    for folder in folders:
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: merge folders written by facemetric robustness")
        metas.append(json.loads(path.read_text(encoding="utf-8")))
    keys = {(m["protocol"], m["pairs"], m["seed"]) for m in metas}
    if len(keys) != 1:
        raise ValueError(f"these runs measured different pairs (protocol, pairs, seed): "
                         f"{sorted(keys)}; only runs on the same pairs can share a plot")
    rows: list[Row] = []
    labels: list[str] = []
    models: dict[str, str] = {}
    severities: dict[str, list[float]] = {}
    fars: list[float] = []
    for meta in metas:
        mine = [_row_from(r) for r in meta["rows"] if r["model"] not in labels]
        new = sorted({r.model for r in mine}, key=[r.model for r in mine].index)
        rows += mine
        labels += new
        models.update({k: v for k, v in meta["models"].items() if k in new})
        for name, sevs in meta["severities"].items():
            have = severities.setdefault(name, [])
            have += [float(v) for v in sevs if float(v) not in have]
        fars += [float(f) for f in meta["fars"] if float(f) not in fars]
    protocol, pairs, seed = keys.pop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = RobustnessResult(protocol, pairs, rows, seconds=sum(m["seconds"] for m in metas),
                              clean_detection_failures=metas[0]["clean_detection_failures"])
    result.files = write_report(result, out, labels, severities, fars, None, None, seed=seed,
                                detect=any(m["detect"] for m in metas), models=models)
    return result


__all__ = [
    "DEFAULT_FARS",
    "PROTOCOLS",
    "NamedModel",
    "Photo",
    "RobustnessPairs",
    "RobustnessResult",
    "Row",
    "degraded_photo",
    "face_detected",
    "face_geometry",
    "find_landmarks",
    "load_pairs",
    "merge_reports",
    "model_label",
    "named_models",
    "run_robustness",
    "select_pairs",
    "write_report",
]
