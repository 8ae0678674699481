"""``facemetric pad``: train, evaluate and apply presentation-attack detectors. Thin: parses,
calls :mod:`facemetric.pad`, prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _options(args: argparse.Namespace, log: bool = False) -> dict[str, Any]:
    """Training options of ``--detector`` from the command line (``log``: CNN epochs)."""
    opts: dict[str, Any] = {"threshold_rule": args.rule, "target_apcer": args.target_apcer}
    if args.rule == "apcer" and args.target_apcer is None:
        raise ValueError("--rule apcer needs --target-apcer (e.g. 0.05)")
    if args.detector == "cnn":
        from facemetric.pad.cnn import CnnConfig

        kw: dict[str, Any] = {"seed": args.seed}
        if args.epochs is not None:
            kw["epochs"] = args.epochs
        if args.val_subjects is not None:
            kw["val_subjects"] = args.val_subjects
        opts["config"] = CnnConfig(**kw)
        if log:
            opts["log"] = print
    elif args.epochs is not None or args.val_subjects is not None:
        raise ValueError("--epochs and --val-subjects apply to --detector cnn only (the LBP "
                         "detector chooses its threshold by leave-one-subject-out)")
    return opts


def _faces(args: argparse.Namespace) -> Any:
    from facemetric.pad.data import load_pad_faces

    faces = load_pad_faces(Path(args.data), cache=args.cache, progress=True)
    print(faces.summary())
    for path, reason in faces.missing:
        print(f"  left out {path}: {reason}")
    return faces


def _cmd_train(args: argparse.Namespace) -> int:
    from facemetric.pad.evaluate import train_detector

    faces = _faces(args)
    detector = train_detector(args.detector, faces, **_options(args, log=True))
    folder = detector.save(Path(args.out))
    errors = detector.info["training_subject_errors"]
    print(f"{detector.describe()}\n  threshold chosen by: {detector.info['threshold_rule']}\n"
          f"  there: APCER {100 * errors['apcer']:.2f}% ({errors['attacks']} attacks), BPCER "
          f"{100 * errors['bpcer']:.2f}% ({errors['bona_fide']} bona fide)\n  saved to {folder}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from facemetric.pad.evaluate import leave_subjects_out, write_evaluation

    faces = _faces(args)
    evaluation = leave_subjects_out(faces, args.detector, folds=args.folds, log=print,
                                    **_options(args))
    files = write_evaluation(evaluation, Path(args.out))
    print(evaluation.summary())
    print(f"  report: {files['json']}\n  DET: {files['det']}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from facemetric.align.detect import FaceDetector
    from facemetric.data.images import ImageLoadError, load_image
    from facemetric.pad import load_detector

    detector = load_detector(Path(args.model))
    finder = FaceDetector(detector.input.detector, upsample=1)
    rows = []
    for name in args.images:
        row: dict[str, Any] = {"image": name, "score": None, "attack": None, "problem": None}
        try:
            rgb = load_image(name)
        except ImageLoadError as err:
            row["problem"] = err.reason
            rows.append(row)
            continue
        faces = finder.detect(rgb)
        if not faces:
            row["problem"] = "no face found"
        else:
            face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            score = float(detector.score([detector.input.crop(rgb, face.box,
                                                               face.landmarks)])[0])
            row.update(score=score, attack=score >= detector.threshold,
                       box=list(face.box))
        rows.append(row)
    if args.json:
        print(json.dumps({"threshold": detector.threshold, "images": rows}, indent=2))
    else:
        print(f"{detector.describe()}")
        for r in rows:
            verdict = r["problem"] or (f"{'ATTACK' if r['attack'] else 'bona fide'} "
                                       f"(score {r['score']:.4f})")
            print(f"  {r['image']}: {verdict}")
    return 0 if all(r["problem"] is None for r in rows) else 1


def _training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="PAD folder: live/<subject>/*.jpg and spoof/<subject>/*.jpg (NUAA)")
    p.add_argument("--detector", choices=("lbp", "cnn"), required=True)
    p.add_argument("--rule", choices=("equal", "apcer"), default="equal",
                   help="threshold on the training subjects: APCER = BPCER, or a target APCER")
    p.add_argument("--target-apcer", type=float, help="APCER target for --rule apcer")
    p.add_argument("--epochs", type=int, help="CNN training epochs (default 12)")
    p.add_argument("--val-subjects", type=int,
                   help="CNN: training subjects held out to choose the threshold (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="JSON file caching the face detections (reused by reruns)")


def add_pad_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``facemetric pad train|evaluate|score``."""
    pad = sub.add_parser("pad", help="presentation-attack detection (liveness)")
    pad_sub = pad.add_subparsers(dest="pad_command", required=True)

    train = pad_sub.add_parser("train", help="train a PAD detector and save it")
    _training_arguments(train)
    train.add_argument("--out", required=True, help="folder for pad.json and the weights")
    train.set_defaults(func=_cmd_train)

    ev = pad_sub.add_parser("evaluate", help="leave-subjects-out APCER/BPCER/ACER and DET")
    _training_arguments(ev)
    ev.add_argument("--folds", type=int, default=3,
                    help="subject groups (the number of subjects: leave-one-subject-out)")
    ev.add_argument("--out", default="runs/pad", help="report folder")
    ev.set_defaults(func=_cmd_evaluate)

    score = pad_sub.add_parser("score", help="attack score of the largest face of each image")
    score.add_argument("--model", required=True, help="folder written by `pad train`")
    score.add_argument("images", nargs="+")
    score.add_argument("--json", action="store_true")
    score.set_defaults(func=_cmd_score)


__all__ = ["add_pad_commands"]
