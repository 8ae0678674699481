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

The defaults (``DEMO_CONFIG``: 64×64 MobileFaceNet in NHWC layout, ArcFace s = 32, m = 0.3,
SGD, 680 steps of 128 faces) are sized for 20 minutes of training on 2 cores (about 74 img/s;
the measured runs and the variants that did worse are in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facemetric.training.checkpoint import atomic_write, list_checkpoints

#: the demo's training run; paths and the step budget are filled in by ``run_lfw_demo``
DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "data": {"image_size": 64, "min_images": 1, "num_workers": 1, "verify": True},
    "augment": {
        "flip": True,
        "crop_scale": [0.85, 1.0],
        "padding": 2,
        "brightness": 0.2,
        "contrast": 0.2,
        "saturation": 0.1,
    },
    "model": {"name": "mobilefacenet", "embedding_size": 256, "options": {"input_size": 64}},
    "loss": {"name": "arcface", "scale": 32.0, "margin": 0.3},
    "optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_steps": 60},
    "batch": {"size": 128},
    "train": {
        "max_steps": 680,
        "grad_clip": 5.0,
        "checkpoint_every": 250,
        "keep_checkpoints": 2,
        "log_every": 25,
        "device": "auto",
    },
}


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
        return "\n".join(lines)


def has_lfw(data_root: Path) -> bool:
    """Whether ``data_root/lfw`` holds the images and the View 1 protocol files."""
    lfw = Path(data_root) / "lfw"
    return all(
        (lfw / name).exists()
        for name in ("lfw-deepfunneled", "peopleDevTrain.txt", "pairsDevTest.txt")
    )


def demo_config(
    aligned_root: Path, people_file: Path, out_dir: Path, max_steps: int | None = None
) -> dict[str, Any]:
    """``DEMO_CONFIG`` with the data paths, output folder and (optionally) step budget."""
    raw = copy.deepcopy(DEMO_CONFIG)
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
) -> LfwDemoResult:
    """Align, train on LFW DevTrain, evaluate on LFW DevTest and CFP (module docstring).

    Args:
        data_root: holds ``lfw/`` (``lfw-deepfunneled`` + protocol files) and optionally
            ``cfp/``.
        out_dir: training run (``train/``) and reports (``eval_*``).
        cache_dir: aligned faces (``lfw112/``, ``cfp112/``), reused across runs.
        max_steps: override the training budget (``DEMO_CONFIG``'s 680 steps of 128).
        workers: alignment processes (default: the machine's cores).
        progress: progress bars.

    Raises:
        FileNotFoundError: ``data_root/lfw`` lacks the images or the protocol files.
    """
    from facemetric.align import align_folder
    from facemetric.evaluation.run import evaluate
    from facemetric.training import config_from_dict, train

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
        demo_config(lfw_aligned, lfw / "peopleDevTrain.txt", out_dir, max_steps),
        source="facemetric.lfw_demo.DEMO_CONFIG",
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

    demo = LfwDemoResult(
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
    atomic_write(out_dir / "demo_summary.json", lambda f: f.write(text))
    return demo


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
