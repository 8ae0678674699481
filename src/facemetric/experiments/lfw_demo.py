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
   each report (markdown, JSON, ROC and score plots).

The defaults (``configs/demo_lfw.toml``: 64×64 MobileFaceNet in NHWC layout, ArcFace
s = 32, m = 0.3, SGD, 680 steps of 128 faces) are sized for 20 minutes of training on 2
cores (about 74 img/s; the measured runs and the variants that did worse are in
``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemetric.atomic import atomic_write_bytes

DEMO_CONFIG_FILE = Path(__file__).resolve().parents[3] / "configs" / "demo_lfw.toml"
"""The demo's training run (``configs/demo_lfw.toml`` of the source tree); ``run_lfw_demo``
fills in the data paths, the output folder and, optionally, the step budget."""


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

    def summary(self) -> str:
        """A small table for a person."""
        lines = [
            f"trained MobileFaceNet + ArcFace on LFW DevTrain: {self.train_steps} steps, "
            f"{self.train_seconds / 60:.1f} min this run, {self.images_per_second:.0f} img/s",
            f"  checkpoint {self.checkpoint}",
        ]
        if self.loss_plot is not None:
            lines.append(f"  loss curve {self.loss_plot}")
        lines.append(f"{'benchmark':<22}{'pairs':>7}{'accuracy':>18}{'AUC':>8}{'EER':>8}")
        for m in self.metrics:
            acc = f"{100 * m.accuracy:.2f} ± {100 * m.accuracy_std:.2f}%"
            lines.append(f"{m.name:<22}{m.pairs:>7}{acc:>18}{m.auc:>8.4f}{m.eer:>8.4f}")
        lines.extend(f"  {m.name} report: {m.report}" for m in self.metrics)
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
) -> LfwDemoResult:
    """Align, train on LFW DevTrain, evaluate on LFW DevTest and CFP (module docstring).

    Args:
        data_root: holds ``lfw/`` (``lfw-deepfunneled`` + protocol files) and optionally
            ``cfp/``.
        out_dir: training run (``train/``) and reports (``eval_*``).
        cache_dir: aligned faces (``lfw112/``, ``cfp112/``), reused across runs.
        max_steps: override the training budget (the configuration's 680 steps of 128).
        workers: alignment processes (default: the machine's cores).
        progress: progress bars.
        config_file: the training configuration (``configs/demo_lfw.toml``).

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

    metrics: list[DemoMetrics] = []
    lfw_eval = evaluate(
        result.checkpoint,
        data_root=lfw_aligned,
        pairs_file=lfw / "pairsDevTest.txt",
        out_dir=out_dir / "eval_lfw_devtest",
        progress=progress,
    )
    metrics.append(_metrics("LFW pairsDevTest", lfw_eval))

    cfp = data_root / "cfp"
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
        for protocol in ("FF", "FP"):
            res = evaluate(
                result.checkpoint,
                data_root=cfp_aligned,
                cfp_root=cfp,
                protocol=protocol,
                out_dir=out_dir / f"eval_cfp_{protocol.lower()}",
                progress=progress,
            )
            metrics.append(_metrics(f"CFP-{protocol}", res))

    recognition = recognition_showcase(result.checkpoint, lfw, lfw_aligned, out_dir,
                                       progress=progress)
    demo = LfwDemoResult(
        recognition=recognition,
        train_steps=result.steps,
        train_seconds=result.wall_seconds,
        images_per_second=result.images_per_second,
        checkpoint=result.checkpoint,
        loss_plot=result.loss_plot,
        metrics=metrics,
        aligned=aligned,
    )
    summary = {
        "train_steps": demo.train_steps,
        "train_seconds": demo.train_seconds,
        "images_per_second": demo.images_per_second,
        "checkpoint": str(demo.checkpoint),
        "metrics": [
            {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(m).items()}
            for m in metrics
        ],
    }
    text = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write_bytes(out_dir / "demo_summary.json", text)
    return demo


def _dev_test_people(lfw: Path) -> list[tuple[str, int]]:
    rows = (lfw / "peopleDevTest.txt").read_text(encoding="utf-8").split("\n")[1:]
    return [(n, int(c)) for n, c in (r.split() for r in rows if r.strip())]


def recognition_showcase(
    checkpoint: Path, lfw: Path, aligned: Path, out_dir: Path, *, enrolled: int = 40,
    strangers: int = 3, progress: bool = True,
) -> list[str]:
    """Use the trained model: calibrate, enroll, identify — the recognition half of the job.

    1. Calibrate FAR → threshold on every pair of aligned faces of the DevTest identities
       that the showcase does *not* use (``calibration.json`` beside the checkpoint).
    2. Enroll the first photo of ``enrolled`` DevTest identities that have more photos, from
       the original LFW photos (detection and alignment as any user's photos), into
       ``out_dir/gallery.db``.
    3. Identify another photo of a few of them and photos of ``strangers`` never enrolled,
       at FAR 1e-3; print the answers (an ``unknown`` among them when the model says so).

    Returns the lines printed in the demo's summary.
    """
    from facemetric.evaluation.run import calibrate_model
    from facemetric.inference import CALIBRATION_FILE
    from facemetric.recognizer import Recognizer

    people = _dev_test_people(lfw)
    several = [n for n, c in people if c >= 2][:enrolled]
    singles = [n for n, c in people if c == 1][:strangers]
    used = set(several) | set(singles)
    calib_people = out_dir / "calibration_people.txt"
    rest = [(n, c) for n, c in people if n not in used]
    text = f"{len(rest)}\n" + "".join(f"{n}\t{c}\n" for n, c in rest)
    atomic_write_bytes(calib_people, text.encode())
    table = calibrate_model(checkpoint, folder=aligned, people_file=calib_people,
                            progress=progress)
    table.save(Path(checkpoint).parent / CALIBRATION_FILE)

    photos = lfw / "lfw-deepfunneled"
    gallery = out_dir / "gallery.db"
    gallery.unlink(missing_ok=True)
    lines = ["recognition with the trained model:",
             "  " + table.summary().replace("\n", "\n  ")]
    with Recognizer(checkpoint, gallery, collection="lfw-devtest") as rec:
        accepted = 0
        for name in several:
            accepted += rec.enroll(name, [photos / name / f"{name}_0001.jpg"]).accepted
        lines.append(f"  enrolled {accepted} of {len(several)} DevTest people (one photo each) "
                     f"into {gallery}")
        queries = [(n, photos / n / f"{n}_0002.jpg") for n in several[:5]]
        queries += [(f"{n} (never enrolled)", photos / n / f"{n}_0001.jpg") for n in singles]
        answers = rec.identify_many([p for _, p in queries], k=3, far=1e-3)
        t = rec.threshold(1e-3)
        lines.append(f"  identify at FAR 1e-3 (threshold {t.value:.3f}, from {t.impostors:,} "
                     "impostor comparisons):")
        for (truth, _), ans in zip(queries, answers, strict=True):
            if not ans.faces:
                lines.append(f"    {truth:<36} → {ans.image.problem}: {ans.image.detail}")
                continue
            face = ans.faces[0]
            top = ", ".join(f"{c.person} {c.score:.2f}" for c in face.candidates)
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
