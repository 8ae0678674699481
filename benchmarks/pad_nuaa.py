"""Presentation-attack detection on NUAA, leave-subjects-out: the LBP and CNN detectors'
APCER / BPCER / ACER (threshold chosen on each fold's training subjects), BPCER@APCER,
DET curves and speed per face.

Faces are found with the recognizer's detector (dlib HOG, largest face) and cut as context
crops (box + half a box on every side, ≤ 224 px) — what ``Recognizer(liveness=...)`` scores.

    .venv/bin/python benchmarks/pad_nuaa.py --data ../shared/data/nuaa --folds 3,9 \
        --detectors lbp,cnn --out runs/pad_nuaa

Writes ``OUT/<detector>_<folds>f/pad_<detector>.json`` + ``det_<detector>.png`` and
``OUT/summary.json``; prints a markdown table.

Speed of saved detectors (``facemetric pad train ... --out DIR``) and of the face detector
in front of them, one thread, wall and CPU time:

    .venv/bin/python benchmarks/pad_nuaa.py --data ../shared/data/nuaa --speed DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="NUAA root (live/, spoof/)")
    ap.add_argument("--folds", default="3", help="comma-separated fold counts, e.g. 3,9")
    ap.add_argument("--detectors", default="lbp,cnn")
    ap.add_argument("--epochs", type=int, default=None, help="CNN epochs (default: CnnConfig)")
    ap.add_argument("--cache", type=Path, default=Path("runs/pad_nuaa/faces.json"))
    ap.add_argument("--out", type=Path, default=Path("runs/pad_nuaa"))
    ap.add_argument("--speed", nargs="+", type=Path,
                    help="only time these saved detectors (and face detection)")
    args = ap.parse_args()
    if args.speed:
        speed(args)
        return

    from facemetric.pad.cnn import CnnConfig
    from facemetric.pad.data import load_pad_faces
    from facemetric.pad.evaluate import leave_subjects_out, write_evaluation

    started = time.perf_counter()
    faces = load_pad_faces(args.data, cache=args.cache, progress=True)
    print(faces.summary())
    side = faces.boxes[:, 2] - faces.boxes[:, 0]
    stats = {
        "faces": len(faces), "missing": [[str(p), r] for p, r in faces.missing],
        "box_side_median": {"bona_fide": float(np.median(side[~faces.is_attack])),
                            "attack": float(np.median(side[faces.is_attack]))},
        "detect_ms_per_photo": (1000 * faces.detect_seconds / faces.detected
                                if faces.detected else None),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   f"(shared), load average {os.getloadavg()[0]:.1f} at start",
    }
    rows = []
    for kind in args.detectors.split(","):
        for folds in (int(f) for f in args.folds.split(",")):
            options = {}
            if kind == "cnn" and args.epochs is not None:
                options["config"] = CnnConfig(epochs=args.epochs)
            t0 = time.perf_counter()
            ev = leave_subjects_out(faces, kind, folds=folds, log=print, **options)
            files = write_evaluation(ev, args.out / f"{kind}_{folds}f")
            print(ev.summary())
            fold_acer = [f.report.at_threshold.acer for f in ev.folds]
            rows.append({
                "detector": kind, "folds": folds,
                "apcer": ev.pooled.apcer, "bpcer": ev.pooled.bpcer, "acer": ev.pooled.acer,
                "attacks": ev.pooled.attacks, "bona_fide": ev.pooled.bona_fide,
                "fold_acer_min": min(fold_acer), "fold_acer_max": max(fold_acer),
                "bpcer_at_apcer": {f"{b.target:g}": b.bpcer for b in ev.pooled_report.bpcer_at},
                "ms_per_face": ev.ms_per_face, "cpu_ms_per_face": ev.cpu_ms_per_face,
                "seconds": time.perf_counter() - t0,
                "det": str(files["det"]),
            })
    stats["load_average_end"] = os.getloadavg()[0]
    stats["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"setup": stats, "results": rows},
                                                      indent=2))
    print(json.dumps(stats, indent=2))
    print("| detector | folds | APCER | BPCER | ACER | fold ACER range | BPCER@APCER=5% | "
          "BPCER@APCER=1% | ms/face (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b5, b1 = r["bpcer_at_apcer"]["0.05"], r["bpcer_at_apcer"]["0.01"]
        print(f"| {r['detector']} | {r['folds']} | {100 * r['apcer']:.2f}% | "
              f"{100 * r['bpcer']:.2f}% | {100 * r['acer']:.2f}% | "
              f"{100 * r['fold_acer_min']:.1f}–{100 * r['fold_acer_max']:.1f}% | "
              f"{'—' if b5 is None else f'{100 * b5:.2f}%'} | "
              f"{'—' if b1 is None else f'{100 * b1:.2f}%'} | {r['ms_per_face']:.2f} / "
              f"{r['cpu_ms_per_face']:.2f} |")


def speed(args: argparse.Namespace, photos: int = 40, crops: int = 100) -> None:
    """Median ms per face of each saved detector and per photo of dlib's face detection."""
    import cv2
    import torch

    from facemetric.align.detect import FaceDetector
    from facemetric.data.images import load_image
    from facemetric.pad import load_detector
    from facemetric.pad.data import load_pad_faces, scan_pad_folder
    from facemetric.pad.evaluate import time_per_face

    faces = load_pad_faces(args.data, cache=args.cache)
    pick = np.linspace(0, len(faces) - 1, crops).round().astype(int)
    sample = [faces.crops[i] for i in pick]
    out = {"machine": f"{os.cpu_count()} cores (shared), load average "
                      f"{os.getloadavg()[0]:.1f} at start"}
    for folder in args.speed:
        det = load_detector(folder)
        out[str(folder)] = {
            "kind": det.kind,
            "wall_ms": time_per_face(det, sample, repeats=3),
            "cpu_ms": time_per_face(det, sample, repeats=3, clock="cpu"),
        }
    finder = FaceDetector(upsample=1)
    scanned = scan_pad_folder(args.data)
    images = [load_image(scanned[i].path)
              for i in np.linspace(0, len(scanned) - 1, photos).round().astype(int)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    walls, cpus = [], []
    finder.detect(images[0])
    for im in images:
        w, c = time.perf_counter(), time.process_time()
        finder.detect(im)
        walls.append(1000 * (time.perf_counter() - w))
        cpus.append(1000 * (time.process_time() - c))
    torch.set_num_threads(threads)
    out["dlib_hog_detect_640x480"] = {"wall_ms": float(np.median(walls)),
                                      "cpu_ms": float(np.median(cpus))}
    out["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
