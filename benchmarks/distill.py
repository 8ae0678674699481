"""The distilled student against its teacher (dlib): accuracy and embedding speed.

    # embedding speed per core (torch.set_num_threads(1)), student vs dlib
    .venv/bin/python benchmarks/distill.py speed --student runs/distill/dlib_mobilefacenet \
        [--onnx student.onnx] --lfw ../shared/data/lfw [--quick]
    # the student's LFW pairsDevTest (10 folds, flip test), CFP-FF and CFP-FP
    .venv/bin/python benchmarks/distill.py eval --student runs/distill/dlib_mobilefacenet \
        --lfw ../shared/data/lfw --cfp ../shared/data/cfp --aligned cache

**speed** — the *embedding step* only: faces already detected and aligned, each model on its
own input (dlib: 150 px ``dlib150`` chips; the student: 112 px ``arcface112`` crops, resized
to its input inside ``embed_faces``), both made from the same detected face of the same
LFW DevTest photos (detection and alignment are not timed: they are the same work for both
and the enrollment benchmark times them). Timed through ``Encoder.embed_faces`` (batch
``--batch``), one thread (``torch.set_num_threads(1)``; dlib's descriptor runs on one core),
median img/s over ``--repeats`` passes after a warm-up pass. The student runs with its
contract's flip test (two passes per face, as evaluation and the recognizer use it) and
without it; ``--onnx`` adds the exported student under ONNX Runtime (one thread) and
checks it against torch on the same faces (max absolute difference of the unit rows).
``--quick``: 24 photos, 2 repeats.

**port** — dlib's network ported to torch (``facemetric.models.dlib_resnet``): its
descriptors against dlib's own on the same ``dlib150`` chips (max |Δ| of the raw
descriptors), both engines of ``DlibEncoder`` timed as above, and, before any training, what
dlib's weights give on facemetric's ``arcface112`` crops read at ``--sizes`` (pairsDevTest,
10 folds, flip test): the starting point of the teacher-initialised student.

    .venv/bin/python benchmarks/distill.py port --lfw ../shared/data/lfw --aligned cache \
        --images 96 --sizes 112 150

**cache** — time a teacher-cache build for a training config from nothing: the config's
existing ``<root>/.teacher`` is moved to ``--aside`` (kept; a rerun reuses what is there),
the cache is rebuilt as ``facemetric distill`` builds it (``load_model("dlib")``: the torch
engine), and its rows are compared with the set-aside ones (built earlier, e.g. with dlib's
engine).

    .venv/bin/python benchmarks/distill.py cache --config configs/distill_dlib_resnet150.toml \
        --aside cache/lfw112_teacher_dlib_engine

**curve** — every checkpoint of a run on pairsDevTest (10 folds, no flip test, to halve
the time) against the training loss in its ``log.csv``; one plot (``--plot``).

    .venv/bin/python benchmarks/distill.py curve --student runs/distill/dlib_resnet150 \
        --lfw ../shared/data/lfw --aligned cache --plot docs/img/distill_dlib_resnet150.png

**eval** — the same calls ``make demo`` makes (``facemetric.evaluation.run.evaluate``):
pairsDevTest on the ``arcface112`` LFW faces (``<aligned>/lfw112``), CFP-FF and CFP-FP on
``<aligned>/cfp112``; the reports go to ``--out`` (default ``<run>_eval/`` beside the run).

The script prints the load average: on a shared machine the numbers are not idle numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def machine_state() -> str:
    load1, load5, load15 = os.getloadavg()
    return (f"load average {load1:.2f} {load5:.2f} {load15:.2f} on {os.cpu_count()} cores "
            "(above ~1 the machine is shared: not idle numbers)")


def _people(path: Path) -> list[tuple[str, int]]:
    rows = path.read_text().split("\n")[1:]
    return [(r.split()[0], int(r.split()[1])) for r in rows if r.strip()]


def faces_for_both(lfw: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(arcface112 crops, dlib150 chips)`` of the centre face of ``count`` DevTest photos."""
    from facemetric.align import FaceDetector, warp_to_template
    from facemetric.align.aligner import nearest_centre
    from facemetric.data.images import load_image

    detector = FaceDetector("hog", "dlib68", 1, 1024)
    crops, chips = [], []
    for name, n in _people(lfw / "peopleDevTest.txt"):
        for k in range(1, n + 1):
            photo = load_image(lfw / "lfw-deepfunneled" / name / f"{name}_{k:04d}.jpg")
            faces = detector.detect(photo)
            if not faces:
                continue
            face = nearest_centre(faces, photo.shape)
            crops.append(warp_to_template(photo, face.landmarks, face.scheme, "arcface112"))
            chips.append(warp_to_template(photo, face.landmarks, face.scheme, "dlib150"))
            if len(crops) == count:
                return np.stack(crops), np.stack(chips)
    return np.stack(crops), np.stack(chips)


def time_encoder(encoder, faces: np.ndarray, batch: int, repeats: int) -> float:
    """Median img/s of ``encoder.embed_faces`` over ``repeats`` passes (after a warm-up)."""
    encoder.embed_faces(faces[:batch], batch_size=batch)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.embed_faces(faces, batch_size=batch)
        rates.append(len(faces) / (time.perf_counter() - start))
    return statistics.median(rates)


def cmd_speed(args: argparse.Namespace) -> dict:
    from facemetric.inference import load_model

    torch.set_num_threads(1)
    count, repeats = (24, 2) if args.quick else (args.images, args.repeats)
    print(machine_state())
    crops, chips = faces_for_both(args.lfw, count)
    print(f"{len(crops)} DevTest faces; batch {args.batch}; {repeats} timed passes; 1 thread")
    rows: dict[str, float] = {}
    from facemetric.inference.dlib import DlibEncoder

    rows["dlib ResNet (150 px chips)"] = time_encoder(DlibEncoder(engine="dlib"), chips,
                                                      args.batch, repeats)
    student = load_model(args.student)
    c = student.contract
    label = f"student {c.backbone} {c.input_size} px D={c.embedding_size}, torch"
    rows[f"{label}, flip test"] = time_encoder(load_model(args.student, flip_test=True),
                                               crops, args.batch, repeats)
    rows[f"{label}, no flip"] = time_encoder(load_model(args.student, flip_test=False), crops,
                                             args.batch, repeats)
    agreement = None
    if args.onnx is not None:
        from facemetric.inference.onnx import OnnxEncoder

        torch_rows = load_model(args.student, flip_test=True).embed_faces(crops)
        onnx_rows = OnnxEncoder(args.onnx, flip_test=True, threads=1).embed_faces(crops)
        agreement = {"max_abs_diff": float(np.abs(torch_rows - onnx_rows).max()),
                     "min_cosine": float((torch_rows * onnx_rows).sum(1).min())}
        print(f"ONNX vs torch on {len(crops)} faces (flip test): max |Δ| "
              f"{agreement['max_abs_diff']:.2e}, min cosine {agreement['min_cosine']:.7f}")
        for flip in (True, False):
            enc = OnnxEncoder(args.onnx, flip_test=flip, threads=1)
            rows[f"student, ONNX Runtime, {'flip test' if flip else 'no flip'}"] = (
                time_encoder(enc, crops, args.batch, repeats))
    base = rows["dlib ResNet (150 px chips)"]
    print(f"{'encoder':<58}{'img/s per core':>16}{'vs dlib':>9}")
    for name, rate in rows.items():
        print(f"{name:<58}{rate:>16.1f}{rate / base:>8.2f}×")
    print(machine_state())
    return {"img_per_s_per_core": rows, "faces": len(crops), "onnx_vs_torch": agreement,
            "state": machine_state()}


def cmd_port(args: argparse.Namespace) -> dict:
    from facemetric.evaluation.run import evaluate
    from facemetric.inference.contract import ModelContract
    from facemetric.inference.dlib import DlibEncoder
    from facemetric.inference.encoder import TorchEncoder
    from facemetric.models.dlib_resnet import dlib_resnet

    torch.set_num_threads(1)
    print(machine_state())
    _, chips = faces_for_both(args.lfw, args.images)
    engines = {name: DlibEncoder(engine=name) for name in ("dlib", "torch")}
    raw = {name: enc._forward(chips) for name, enc in engines.items()}
    diff = float(np.abs(raw["torch"] - raw["dlib"]).max())
    print(f"{len(chips)} DevTest dlib150 chips: torch port vs dlib, max |Δ| of the raw "
          f"descriptors {diff:.2e} (largest |value| {np.abs(raw['dlib']).max():.3f})")
    rates = {name: time_encoder(enc, chips, args.batch, args.repeats)
             for name, enc in engines.items()}
    print(f"img/s per core: dlib {rates['dlib']:.1f}, torch port {rates['torch']:.1f} "
          f"({rates['torch'] / rates['dlib']:.2f}×)")
    torch.set_num_threads(args.threads)
    accuracy = {}
    reports = tempfile.TemporaryDirectory()
    for size in args.sizes:
        contract = ModelContract(backbone="dlib_resnet", input_size=size, template="arcface112",
                                 embedding_size=128, weights_sha256=engines["torch"]
                                 .contract.weights_sha256, flip_test=True, source="dlib")
        encoder = TorchEncoder(dlib_resnet(weights="dlib", input_size=size).eval(), contract)
        res = evaluate(encoder, data_root=args.aligned / "lfw112",
                       pairs_file=args.lfw / "pairsDevTest.txt",
                       out_dir=Path(reports.name) / f"untrained{size}")
        r = res.report
        accuracy[size] = {"accuracy": float(r.accuracy), "accuracy_std": float(r.accuracy_std),
                          "auc": float(r.auc), "eer": float(r.eer)}
        print(f"dlib's weights, untrained, arcface112 crops at {size} px: pairsDevTest "
              f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}% (AUC {r.auc:.4f})")
    reports.cleanup()
    print(machine_state())
    return {"max_abs_diff": diff, "img_per_s_per_core": rates, "untrained_accuracy": accuracy,
            "faces": len(chips), "state": machine_state()}


def cmd_cache(args: argparse.Namespace) -> dict:
    import shutil

    from facemetric.training.config import load_config
    from facemetric.training.distill import load_teacher
    from facemetric.training.loop import build_dataset

    print(machine_state())
    config = load_config(args.config)
    dataset = build_dataset(config)
    cache_dir = Path(dataset.root) / ".teacher"
    if not args.aside.exists():
        shutil.move(str(cache_dir), str(args.aside))
    elif cache_dir.exists():
        shutil.rmtree(cache_dir)
    start = time.perf_counter()
    load_teacher(config, dataset, progress=False)
    seconds = time.perf_counter() - start
    new = {p.name: np.load(p) for p in cache_dir.glob("*.npy")}
    old = {p.name: np.load(p) for p in args.aside.glob("*.npy")}
    result: dict = {"seconds": seconds, "rows": sum(len(a) for a in new.values()),
                    "workers": config.distill.workers, "state": machine_state()}
    print(f"{result['rows']} teacher rows in {seconds:.1f} s ({config.distill.workers} workers)")
    for name in sorted(set(new) & set(old)):
        diff = float(np.abs(new[name] - old[name]).max())
        cosine = float((new[name] * old[name]).sum(1).min())
        result[name] = {"max_abs_diff": diff, "min_cosine": cosine}
        print(f"{name}: max |Δ| vs the set-aside rows {diff:.2e}, min cosine {cosine:.8f}")
    print(machine_state())
    return result


def cmd_curve(args: argparse.Namespace) -> dict:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facemetric.evaluation.run import evaluate
    from facemetric.inference import load_model

    torch.set_num_threads(args.threads)
    run = Path(args.student)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in sorted(run.glob("checkpoint_*.pt")):
            step = int(ckpt.stem.split("_")[1])
            res = evaluate(load_model(ckpt, flip_test=False), data_root=args.aligned / "lfw112",
                           pairs_file=args.lfw / "pairsDevTest.txt", out_dir=Path(tmp) / ckpt.stem)
            points.append((step, float(res.report.accuracy), float(res.report.accuracy_std)))
            print(f"step {step}: pairsDevTest (no flip) {100 * res.report.accuracy:.2f} ± "
                  f"{100 * res.report.accuracy_std:.2f}%")
    with open(run / "log.csv", newline="") as handle:
        log = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in log], [v for _, v in log], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (1 − cos to the teacher)", color="tab:blue")
    right = ax.twinx()
    right.errorbar([p[0] for p in points], [100 * p[1] for p in points],
                   yerr=[100 * p[2] for p in points], color="tab:red", marker="o", capsize=3)
    right.set_ylabel("pairsDevTest accuracy, % (no flip; ± fold std)", color="tab:red")
    ax.set_title(f"{run.name}: distillation from dlib, DevTrain only")
    fig.tight_layout()
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    return {"checkpoints": points, "state": machine_state()}


def cmd_eval(args: argparse.Namespace) -> dict:
    from facemetric.evaluation.run import evaluate
    from facemetric.inference import load_model

    torch.set_num_threads(args.threads)
    student = load_model(args.student)
    if args.out is not None:
        reports = Path(args.out)
    else:
        run = Path(args.student).resolve()
        reports = (run.parent if run.is_file() else run).with_name(
            f"{(run.parent if run.is_file() else run).name}_eval")
    results = {}
    lfw = evaluate(student, data_root=args.aligned / "lfw112",
                   pairs_file=args.lfw / "pairsDevTest.txt",
                   out_dir=reports / "lfw_devtest")
    results["LFW pairsDevTest"] = lfw.report
    if args.cfp is not None:
        for protocol in ("FF", "FP"):
            res = evaluate(student, data_root=args.aligned / "cfp112", cfp_root=args.cfp,
                           protocol=protocol,
                           out_dir=reports / f"cfp_{protocol.lower()}")
            results[f"CFP-{protocol}"] = res.report
    print(f"student {student.contract.describe()}")
    print(f"{'benchmark':<20}{'pairs':>7}{'accuracy':>18}{'AUC':>8}{'EER':>8}")
    summary = {}
    for name, r in results.items():
        acc = f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}%"
        pairs = int(r.num_positives + r.num_negatives)
        print(f"{name:<20}{pairs:>7}{acc:>18}{r.auc:>8.4f}{r.eer:>8.4f}")
        summary[name] = {"pairs": pairs, "accuracy": float(r.accuracy),
                         "accuracy_std": float(r.accuracy_std), "auc": float(r.auc),
                         "eer": float(r.eer)}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speed", help="embedding img/s per core, student vs dlib")
    sp.add_argument("--student", required=True, help="run folder, checkpoint or .onnx")
    sp.add_argument("--onnx", type=Path, default=None, help="the exported student, too")
    sp.add_argument("--lfw", type=Path, required=True)
    sp.add_argument("--images", type=int, default=128)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--batch", type=int, default=32)
    sp.add_argument("--quick", action="store_true", help="24 faces, 2 passes")
    sp.set_defaults(func=cmd_speed)
    po = sub.add_parser("port", help="dlib's network in torch against dlib")
    po.add_argument("--lfw", type=Path, required=True)
    po.add_argument("--aligned", type=Path, default=Path("cache"))
    po.add_argument("--images", type=int, default=96)
    po.add_argument("--repeats", type=int, default=3)
    po.add_argument("--batch", type=int, default=32)
    po.add_argument("--threads", type=int, default=2, help="for the accuracy part")
    po.add_argument("--sizes", type=int, nargs="+", default=[112, 150])
    po.set_defaults(func=cmd_port)
    ca = sub.add_parser("cache", help="time a teacher-cache build, compare with an old one")
    ca.add_argument("--config", type=Path, required=True)
    ca.add_argument("--aside", type=Path, required=True, help="where the old cache goes")
    ca.set_defaults(func=cmd_cache)
    cu = sub.add_parser("curve", help="pairsDevTest of every checkpoint, with the loss")
    cu.add_argument("--student", required=True, help="run folder")
    cu.add_argument("--lfw", type=Path, required=True)
    cu.add_argument("--aligned", type=Path, default=Path("cache"))
    cu.add_argument("--threads", type=int, default=2)
    cu.add_argument("--plot", type=Path, default=None)
    cu.set_defaults(func=cmd_curve)
    ev = sub.add_parser("eval", help="LFW pairsDevTest, CFP-FF, CFP-FP of the student")
    ev.add_argument("--student", required=True)
    ev.add_argument("--lfw", type=Path, required=True)
    ev.add_argument("--cfp", type=Path, default=None)
    ev.add_argument("--aligned", type=Path, default=Path("cache"),
                    help="holds lfw112/ and cfp112/ (made by make demo)")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--out", type=Path, default=None,
                    help="report folder (default: <run>_eval beside the run)")
    ev.set_defaults(func=cmd_eval)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    result = args.func(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
