"""The main job: photographs in, a trained face-embedding model and its LFW / CFP numbers out.

``run_lfw_demo(data_root)`` runs the whole pipeline on one CPU-sized budget:

1. align LFW deep-funneled once (dlib detection + 5-point similarity warp to 112×112,
   centre face on several, centre crop where none is found), cached and resumable;
2. train a MobileFaceNet with ArcFace on LFW ``peopleDevTrain`` (all 4,038 identities: the
   one-image ones are extra negatives for the classifier), checkpointing as it goes — a
   killed demo resumes where it stopped, a finished one is not trained again;
3. evaluate on LFW ``pairsDevTest`` (identities disjoint from DevTrain; 10 interleaved
   folds) and, where ``cfp/`` exists, on CFP frontal-frontal and frontal-profile (aligned
   from CFP's hand-labelled fiducials, since profiles defeat frontal detectors), writing
   each report (markdown, JSON, ROC and score plots);
4. (``student=True``, the default) train the deployable model: dlib's ResNet descriptor,
   ported to torch and started from dlib's weights, distilled from dlib onto facemetric's
   crops on DevTrain only (``configs/demo_student.toml``); calibrate it on DevTest people
   the showcase does not use, export it to ONNX with its threshold table, evaluate the
   export on the same benchmarks and install it as the recognition API's default model
   (:mod:`facemetric.inference.default`);
5. use a model: enroll DevTest people from their original photos and identify others and
   strangers at a calibrated FAR — with the installed student when there is one, else with
   the from-scratch model (calibrated first).

The defaults (``configs/demo_lfw.toml``: 64×64 MobileFaceNet in NHWC layout, ArcFace
s = 32, m = 0.3, SGD, 680 steps of 128 faces) are sized for 20 minutes of training on 2
cores (about 74 img/s; the measured runs and the variants that did worse are in
``docs/benchmarks.md``); the student's are sized for about 10 more minutes.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facemetric.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from facemetric.inference.calibration import ThresholdTable

DEMO_CONFIG_FILE = Path(__file__).resolve().parents[3] / "configs" / "demo_lfw.toml"
"""The demo's training run (``configs/demo_lfw.toml`` of the source tree); ``run_lfw_demo``
fills in the data paths, the output folder and, optionally, the step budget."""

DEMO_STUDENT_CONFIG_FILE = DEMO_CONFIG_FILE.with_name("demo_student.toml")
"""The demo's distillation run (``configs/demo_student.toml``), filled in the same way."""


def load_demo_config(path: str | os.PathLike[str] = DEMO_CONFIG_FILE) -> dict[str, Any]:
    """The demo's training configuration as a plain dictionary (TOML).

    Raises:
        FileNotFoundError: no such file (an installed copy of facemetric has no
            ``configs/``: pass ``--config`` with the file from the source tree).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no demo configuration {path}: pass --config configs/demo_lfw.toml from the "
            "facemetric source tree"
        )
    with path.open("rb") as fh:
        return tomllib.load(fh)


@dataclass
class DemoMetrics:
    """One benchmark's verification numbers."""

    name: str
    pairs: int
    accuracy: float
    accuracy_std: float
    auc: float
    eer: float
    report: Path


def _metrics_table(metrics: list[DemoMetrics]) -> list[str]:
    lines = [f"{'benchmark':<22}{'pairs':>7}{'accuracy':>18}{'AUC':>8}{'EER':>8}"]
    for m in metrics:
        acc = f"{100 * m.accuracy:.2f} ± {100 * m.accuracy_std:.2f}%"
        lines.append(f"{m.name:<22}{m.pairs:>7}{acc:>18}{m.auc:>8.4f}{m.eer:>8.4f}")
    lines.extend(f"  {m.name} report: {m.report}" for m in metrics)
    return lines


@dataclass
class StudentResult:
    """The deployable student: its run, its ONNX export and that export's numbers."""

    train_steps: int
    train_seconds: float
    images_per_second: float
    checkpoint: Path
    onnx: Path
    description: str
    installed: Path | None
    metrics: list[DemoMetrics] = field(default_factory=list)
    install_error: str | None = None

    def summary(self) -> list[str]:
        lines = [
            f"distilled dlib's ResNet onto facemetric's crops (LFW DevTrain only, started from "
            f"dlib's weights): {self.train_steps} steps, {self.train_seconds / 60:.1f} min this "
            f"run, {self.images_per_second:.0f} img/s",
            f"  exported {self.onnx}: {self.description}",
            f"  installed as the default model: {self.installed}" if self.installed else
            "  not installed as the default model"
            + (f" ({self.install_error})" if self.install_error else "")
            + f"; install it: facemetric default-model {self.onnx}",
        ]
        return lines + _metrics_table(self.metrics)


@dataclass
class LfwDemoResult:
    """What the demo produced: the run's figures and each benchmark's numbers."""

    train_steps: int
    train_seconds: float
    images_per_second: float
    checkpoint: Path
    loss_plot: Path | None
    metrics: list[DemoMetrics] = field(default_factory=list)
    aligned: dict[str, str] = field(default_factory=dict)
    recognition: list[str] = field(default_factory=list)
    student: StudentResult | None = None

    def summary(self) -> str:
        """A small table for a person."""
        lines = [
            f"trained MobileFaceNet + ArcFace on LFW DevTrain: {self.train_steps} steps, "
            f"{self.train_seconds / 60:.1f} min this run, {self.images_per_second:.0f} img/s",
            f"  checkpoint {self.checkpoint}",
        ]
        if self.loss_plot is not None:
            lines.append(f"  loss curve {self.loss_plot}")
        lines.extend(_metrics_table(self.metrics))
        if self.student is not None:
            lines.extend(self.student.summary())
        lines.extend(self.recognition)
        return "\n".join(lines)


def has_lfw(data_root: Path) -> bool:
    """Whether ``data_root/lfw`` holds the images and the View 1 protocol files."""
    lfw = Path(data_root) / "lfw"
    return all(
        (lfw / name).exists()
        for name in ("lfw-deepfunneled", "peopleDevTrain.txt", "pairsDevTest.txt")
    )


def demo_config(
    aligned_root: Path,
    people_file: Path,
    out_dir: Path,
    max_steps: int | None = None,
    config_file: str | os.PathLike[str] = DEMO_CONFIG_FILE,
) -> dict[str, Any]:
    """The demo configuration with the data paths, output folder and (optionally) step
    budget filled in."""
    raw = load_demo_config(config_file)
    raw.setdefault("data", {})
    raw.setdefault("train", {})
    raw["output_dir"] = str(out_dir / "train")
    raw["data"].update(root=str(aligned_root), people_file=str(people_file))
    if max_steps is not None:
        raw["train"]["max_steps"] = max_steps
    return raw


def run_lfw_demo(
    data_root: Path,
    out_dir: Path = Path("runs/demo"),
    cache_dir: Path = Path("cache"),
    max_steps: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    config_file: str | os.PathLike[str] = DEMO_CONFIG_FILE,
    student: bool = True,
    student_steps: int | None = None,
    student_config_file: str | os.PathLike[str] = DEMO_STUDENT_CONFIG_FILE,
    install_default: bool = True,
) -> LfwDemoResult:
    """Align, train on LFW DevTrain, evaluate on LFW DevTest and CFP, distil and install the
    deployable student, use a model (module docstring).

    Args:
        data_root: holds ``lfw/`` (``lfw-deepfunneled`` + protocol files) and optionally
            ``cfp/``.
        out_dir: training runs (``train/``, ``student/``), the student's ``student.onnx``,
            reports (``eval_*``, ``student_eval_*``), the showcase's ``gallery.db``.
        cache_dir: aligned faces (``lfw112/``, ``cfp112/``) and the teacher's embeddings
            (``lfw112/.teacher``), reused across runs.
        max_steps: override the training budget (the configuration's 680 steps of 128).
        workers: alignment processes (default: the machine's cores).
        progress: progress bars.
        config_file: the training configuration (``configs/demo_lfw.toml``).
        student: also distil, export and evaluate the deployable student.
        student_steps: override the student's budget (its configuration's 400 steps of 64).
        student_config_file: the student's configuration (``configs/demo_student.toml``).
        install_default: install the student's export as the default model
            (``$FACEMETRIC_HOME/models``).

    Raises:
        FileNotFoundError: ``data_root/lfw`` lacks the images or the protocol files.
    """
    from facemetric.align import align_folder
    from facemetric.evaluation.run import evaluate
    from facemetric.training import config_from_dict, train
    from facemetric.training.checkpoint import list_checkpoints

    data_root, out_dir, cache_dir = Path(data_root), Path(out_dir), Path(cache_dir)
    lfw = data_root / "lfw"
    needed = [lfw / "lfw-deepfunneled", lfw / "peopleDevTrain.txt", lfw / "pairsDevTest.txt"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            "the LFW demo needs LFW deep-funneled and its View 1 protocol files; missing: "
            + ", ".join(missing)
            + " (get them from the LFW site, vis-www.cs.umass.edu/lfw, and unpack under "
            f"{lfw})"
        )
    workers = workers or os.cpu_count() or 1
    aligned: dict[str, str] = {}
    lfw_aligned = cache_dir / "lfw112"
    report = align_folder(
        lfw / "lfw-deepfunneled", lfw_aligned, workers=workers, fallback=True, progress=progress
    )
    aligned["lfw"] = report.summary()

    config = config_from_dict(
        demo_config(lfw_aligned, lfw / "peopleDevTrain.txt", out_dir, max_steps, config_file),
        source=str(config_file),
    )
    resume = bool(list_checkpoints(config.output_dir)) if config.output_dir.exists() else False
    result = train(config, resume=resume, progress=progress)
    if result.checkpoint is None:
        raise RuntimeError(f"training wrote no checkpoint under {config.output_dir}")

    cfp = data_root / "cfp"
    cfp_aligned: Path | None = None
    if (cfp / "Protocol").is_dir():
        cfp_aligned = cache_dir / "cfp112"
        report = align_folder(
            cfp / "Data" / "Images",
            cfp_aligned,
            workers=workers,
            fallback=True,
            landmarks_root=cfp / "Data" / "Fiducials",
            progress=progress,
        )
        aligned["cfp"] = report.summary()

    def benchmarks(model: Any, prefix: str) -> list[DemoMetrics]:
        found = [_metrics("LFW pairsDevTest", evaluate(
            model, data_root=lfw_aligned, pairs_file=lfw / "pairsDevTest.txt",
            out_dir=out_dir / f"{prefix}eval_lfw_devtest", progress=progress))]
        if cfp_aligned is not None:
            for protocol in ("FF", "FP"):
                found.append(_metrics(f"CFP-{protocol}", evaluate(
                    model, data_root=cfp_aligned, cfp_root=cfp, protocol=protocol,
                    out_dir=out_dir / f"{prefix}eval_cfp_{protocol.lower()}",
                    progress=progress)))
        return found

    metrics = benchmarks(result.checkpoint, "")
    people = ShowcasePeople.from_lfw(lfw)
    distilled: StudentResult | None = None
    if student:
        raw = demo_config(lfw_aligned, lfw / "peopleDevTrain.txt", out_dir, student_steps,
                          student_config_file)
        raw["output_dir"] = str(out_dir / "student")
        distilled = train_and_export_student(
            config_from_dict(raw, source=str(student_config_file)), lfw_aligned, people,
            out_dir, install_default=install_default, progress=progress)
        distilled.metrics = benchmarks(distilled.onnx, "student_")
        model: Any = distilled.installed or distilled.onnx
    else:
        from facemetric.inference import CALIBRATION_FILE

        table = calibrate_on_dev_test(result.checkpoint, lfw_aligned, people, out_dir,
                                      progress=progress)
        table.save(Path(result.checkpoint).parent / CALIBRATION_FILE)
        model = result.checkpoint
    recognition = recognition_showcase(model, lfw, people, out_dir)
    demo = LfwDemoResult(
        recognition=recognition,
        train_steps=result.steps,
        train_seconds=result.wall_seconds,
        images_per_second=result.images_per_second,
        checkpoint=result.checkpoint,
        loss_plot=result.loss_plot,
        metrics=metrics,
        aligned=aligned,
        student=distilled,
    )

    def plain(m: DemoMetrics) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(m).items()}

    summary: dict[str, Any] = {
        "train_steps": demo.train_steps,
        "train_seconds": demo.train_seconds,
        "images_per_second": demo.images_per_second,
        "checkpoint": str(demo.checkpoint),
        "metrics": [plain(m) for m in metrics],
    }
    if distilled is not None:
        summary["student"] = {
            "train_steps": distilled.train_steps, "train_seconds": distilled.train_seconds,
            "images_per_second": distilled.images_per_second,
            "checkpoint": str(distilled.checkpoint), "onnx": str(distilled.onnx),
            "installed": None if distilled.installed is None else str(distilled.installed),
            "metrics": [plain(m) for m in distilled.metrics],
        }
    text = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write_bytes(out_dir / "demo_summary.json", text)
    return demo


def train_and_export_student(
    config: Any, aligned: Path, people: ShowcasePeople, out_dir: Path, *,
    install_default: bool = True, progress: bool = True,
) -> StudentResult:
    """Train the distillation run ``config`` (resuming it when it has checkpoints), load it
    for use without the flip test, calibrate it on the DevTest people the showcase leaves
    out, export it to ``out_dir/student.onnx`` with that table and (``install_default``)
    install the export as the default model.

    The flip test is off in the export: the 900-step student measured 97.90% on
    pairsDevTest without it and 97.80% with it (``docs/benchmarks.md``), and it halves the
    cost of every face.
    """
    from facemetric.inference import load_model
    from facemetric.inference.default import install_default_model
    from facemetric.inference.onnx import export_onnx
    from facemetric.training import train
    from facemetric.training.checkpoint import list_checkpoints

    resume = bool(list_checkpoints(config.output_dir)) if config.output_dir.exists() else False
    result = train(config, resume=resume, progress=progress)
    if result.checkpoint is None:
        raise RuntimeError(f"the student run wrote no checkpoint under {config.output_dir}")
    encoder = load_model(result.checkpoint, flip_test=False)
    table = calibrate_on_dev_test(encoder, aligned, people, out_dir, progress=progress)
    onnx = export_onnx(encoder, out_dir / "student.onnx", thresholds=table)
    installed: Path | None = None
    error: str | None = None
    if install_default:
        try:  # a read-only home must not cost the demo's 40 minutes of work
            installed = install_default_model(onnx).path
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    return StudentResult(
        train_steps=result.steps, train_seconds=result.wall_seconds,
        images_per_second=result.images_per_second, checkpoint=result.checkpoint,
        onnx=onnx, description=encoder.contract.describe(), installed=installed,
        install_error=error,
    )


def _dev_test_people(lfw: Path) -> list[tuple[str, int]]:
    rows = (lfw / "peopleDevTest.txt").read_text(encoding="utf-8").split("\n")[1:]
    return [(n, int(c)) for n, c in (r.split() for r in rows if r.strip())]


@dataclass(frozen=True)
class ShowcasePeople:
    """Who the showcase enrolls and queries, and the DevTest people left for calibration.

    Attributes:
        enrolled: DevTest people with several photos: the first is enrolled, the second
            identified (for the first five).
        strangers: DevTest people with one photo, never enrolled, identified.
        calibration: every other DevTest person, with their photo counts.
    """

    enrolled: tuple[str, ...]
    strangers: tuple[str, ...]
    calibration: tuple[tuple[str, int], ...]

    @classmethod
    def from_lfw(cls, lfw: Path, enrolled: int = 40, strangers: int = 3) -> ShowcasePeople:
        people = _dev_test_people(lfw)
        several = tuple(n for n, c in people if c >= 2)[:enrolled]
        singles = tuple(n for n, c in people if c == 1)[:strangers]
        used = set(several) | set(singles)
        return cls(several, singles, tuple((n, c) for n, c in people if n not in used))


def calibrate_on_dev_test(
    model: Any, aligned: Path, people: ShowcasePeople, out_dir: Path, *, progress: bool = True
) -> ThresholdTable:
    """The FAR → threshold table of ``model`` on every pair of aligned faces of the DevTest
    people the showcase does not use (their list: ``out_dir/calibration_people.txt``)."""
    from facemetric.evaluation.run import calibrate_model

    calib_people = out_dir / "calibration_people.txt"
    text = f"{len(people.calibration)}\n" + "".join(
        f"{n}\t{c}\n" for n, c in people.calibration)
    atomic_write_bytes(calib_people, text.encode())
    return calibrate_model(model, folder=aligned, people_file=calib_people, progress=progress)


def recognition_showcase(model: Any, lfw: Path, people: ShowcasePeople, out_dir: Path
                         ) -> list[str]:
    """Use a calibrated model — the recognition half of the job.

    1. Enroll the first photo of each of ``people.enrolled`` from the original LFW photos
       (detection and alignment as any user's photos) into ``out_dir/gallery.db``.
    2. Identify the second photo of five of them and the photo of each stranger at FAR
       1e-3; print the answers (an ``unknown`` among them when the model says so).

    Returns the lines printed in the demo's summary.
    """
    from facemetric.recognizer import Recognizer

    photos = lfw / "lfw-deepfunneled"
    gallery = out_dir / "gallery.db"
    gallery.unlink(missing_ok=True)
    with Recognizer(model, gallery, collection="lfw-devtest") as rec:
        if rec.thresholds is None:
            raise ValueError(f"the showcase needs a calibrated model; {model} has no table")
        lines = [f"recognition with {model} ({rec.contract.describe()}):",
                 "  " + rec.thresholds.summary().replace("\n", "\n  ")]
        accepted = 0
        for name in people.enrolled:
            accepted += rec.enroll(name, [photos / name / f"{name}_0001.jpg"]).accepted
        lines.append(f"  enrolled {accepted} of {len(people.enrolled)} DevTest people (one "
                     f"photo each) into {gallery}")
        queries = [(n, photos / n / f"{n}_0002.jpg") for n in people.enrolled[:5]]
        queries += [(f"{n} (never enrolled)", photos / n / f"{n}_0001.jpg")
                    for n in people.strangers]
        answers = rec.identify_many([p for _, p in queries], k=3, far=1e-3)
        t = rec.threshold(1e-3)
        lines.append(f"  identify at FAR 1e-3 (threshold {t.value:.3f}, from {t.impostors:,} "
                     "impostor comparisons):")
        for (truth, _), ans in zip(queries, answers, strict=True):
            if not ans.faces:
                lines.append(f"    {truth:<36} → {ans.image.problem}: {ans.image.detail}")
                continue
            face = ans.faces[0]
            top = ", ".join(f"{c.person} {c.score:.3f}" for c in face.candidates)
            lines.append(f"    {truth:<36} → {face.best:<24} (top: {top})")
    return lines


def _metrics(name: str, res: Any) -> DemoMetrics:
    rep = res.report
    return DemoMetrics(
        name=name,
        pairs=int(rep.num_positives + rep.num_negatives),
        accuracy=float(rep.accuracy),
        accuracy_std=float(rep.accuracy_std),
        auc=float(rep.auc),
        eer=float(rep.eer),
        report=res.files.markdown,
    )
