"""The recognition commands of ``facemetric``: export, calibrate, verify, enroll, identify,
gallery. Thin: each parses, calls the library (:mod:`facemetric.recognizer`,
:mod:`facemetric.inference`, :mod:`facemetric.gallery`) and prints — a table for a person,
or JSON with ``--json``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facemetric.inference.default import DEFAULT

MODEL_HELP = ("a training run folder, checkpoint_*.pt, an exported .onnx file, 'dlib', or "
              "'default' (the installed default model: `facemetric default-model`)")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _fars(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--far takes comma-separated numbers such as 1e-2,1e-3: {err}") from err


# ------------------------------------------------------------------ export / calibrate


def _cmd_export(args: argparse.Namespace) -> int:
    from facemetric.inference.checkpoint import load_checkpoint_encoder
    from facemetric.inference.onnx import export_onnx

    encoder = load_checkpoint_encoder(Path(args.model))
    out = export_onnx(encoder, Path(args.out), thresholds=encoder.thresholds)
    print(f"exported {encoder.contract.describe()}\n  to {out}")
    if encoder.thresholds is None:
        print("  no calibrated thresholds yet: run `facemetric calibrate` on the ONNX file or "
              "the run before using it to decide")
    else:
        print(f"  with thresholds at FARs {[f'{f:g}' for f in encoder.thresholds.fars]}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from facemetric.evaluation.run import calibrate_model
    from facemetric.inference import CALIBRATION_FILE, load_model
    from facemetric.inference.checkpoint import resolve_checkpoint

    if args.out is None and str(args.model) in ("dlib", DEFAULT):
        what = ("dlib's model is read-only" if str(args.model) == "dlib" else
                "the installed default model is never changed in place (a running service "
                "may be using it): calibrate the .onnx file it was installed from and "
                "install that again, or")
        raise ValueError(f"{what}: pass --out FILE for its threshold table")
    encoder = load_model(args.model)
    table = calibrate_model(
        encoder,
        data_root=args.data,
        pairs_file=args.pairs,
        cfp_root=args.cfp,
        protocol=args.protocol,
        folder=args.folder,
        people_file=args.people,
        fars=_fars(args.far),
        min_false_accepts=args.min_false_accepts,
        workers=args.workers,
    )
    if args.out is not None:
        where = table.save(Path(args.out))
    elif Path(args.model).suffix.lower() == ".onnx":
        from facemetric.inference.onnx import write_thresholds

        where = write_thresholds(Path(args.model), table)
    else:
        where = table.save(resolve_checkpoint(args.model).parent / CALIBRATION_FILE)
    if args.json:
        _print_json(table.to_dict())
    else:
        print(table.summary())
        print(f"saved to {where}")
    return 0


def _cmd_default_model(args: argparse.Namespace) -> int:
    from facemetric.inference.default import (
        INSTALL_HELP,
        install_default_model,
        installed_default,
        models_dir,
    )

    if args.model is not None:
        model = install_default_model(Path(args.model))
        print("installed " + model.summary())
        return 0
    current = installed_default()
    if current is None:
        print(f"no default model is installed in {models_dir()}: {INSTALL_HELP}")
        return 1
    print(current.summary())
    return 0


# ------------------------------------------------------------------ recognizer commands


def _recognizer(args: argparse.Namespace, gallery: bool = True) -> Any:
    from facemetric.recognizer import Recognizer

    thresholds = None
    if getattr(args, "thresholds", None):
        from facemetric.inference import ThresholdTable

        thresholds = ThresholdTable.load(args.thresholds)
    return Recognizer(
        args.model,
        gallery=Path(args.gallery) if gallery else None,
        collection=getattr(args, "collection", "default"),
        thresholds=thresholds,
        person_score=getattr(args, "score", "max"),
        min_face_size=args.min_face,
        liveness=args.liveness,
        liveness_threshold=args.liveness_threshold,
    )


def _liveness_note(faces: Any) -> str:
    """`` liveness 0.12`` for the faces that were checked (attack probability), else ``""``."""
    scores = [f.liveness for f in faces if f.liveness is not None]
    return f"; liveness {', '.join(f'{s:.3f}' for s in scores)}" if scores else ""


def _cmd_verify(args: argparse.Namespace) -> int:
    rec = _recognizer(args, gallery=False)
    result = rec.verify(Path(args.a), Path(args.b), far=args.far, policy=args.policy)
    if args.json:
        _print_json(result.to_dict())
    elif result.same is None:
        for im, path in ((result.a, args.a), (result.b, args.b)):
            if not im.ok:
                print(f"{path}: {im.problem} — {im.detail}")
        return 1
    else:
        t = result.threshold
        verdict = "SAME person" if result.same else "DIFFERENT people"
        print(f"{verdict}: score {result.score:.4f} vs threshold {t.value:.4f} "
              f"(FAR {t.far:g}, calibrated on {t.impostors} impostor comparisons)")
        print(f"  faces: {args.a} {result.box_a}{_liveness_note(result.a.faces)}; "
              f"{args.b} {result.box_b}{_liveness_note(result.b.faces)}")
    return 0 if result.same is not None else 1


def _folder_people(root: Path) -> Iterator[tuple[str, list[Path]]]:
    from facemetric.data.folders import IdentityFolder

    ds = IdentityFolder(root)
    by_person: dict[str, list[Path]] = {}
    for path, label in ds.samples:
        by_person.setdefault(ds.classes[label], []).append(path)
    yield from by_person.items()


def _cmd_enroll(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if (args.person is None) == (args.folder is None):
        raise ValueError("enroll either PERSON IMAGES... or --folder DIR (one person per "
                         "sub-folder)")
    rec = _recognizer(args)
    jobs = ([(args.person, [Path(p) for p in args.images])] if args.folder is None
            else list(_folder_people(Path(args.folder))))
    if args.person is not None and not args.images:
        raise ValueError("enroll PERSON needs at least one image")
    results = []
    accepted = rejected = already = 0
    with rec, tqdm(total=sum(len(p) for _, p in jobs), unit="img", desc="enroll",
                   disable=args.json or len(jobs) == 1) as bar:
        for person, paths in jobs:
            res = rec.enroll(person, paths, policy=args.policy)
            results.append(res)
            for o in res.outcomes:
                if o.accepted:
                    accepted += 1
                elif o.problem == "duplicate" and "already enrolled" in o.detail:
                    already += 1  # a re-run of a bulk enrollment: done before
                else:
                    rejected += 1
            bar.update(len(paths))
    if args.json:
        _print_json([r.to_dict() for r in results])
    else:
        for res in results:
            for o, path in zip(res.outcomes, jobs[results.index(res)][1], strict=True):
                if not o.accepted and not (args.folder and "already enrolled" in o.detail):
                    print(f"  rejected {path}: {o.problem} — {o.detail}")
        print(f"enrolled {accepted} face(s) of {len(jobs)} person(s); {rejected} rejected"
              + (f"; {already} already enrolled" if already else ""))
    return 0 if rejected == 0 else 1


def _cmd_identify(args: argparse.Namespace) -> int:
    rec = _recognizer(args)
    with rec:
        results = rec.identify_many([Path(p) for p in args.images], k=args.k, far=args.far,
                                    policy=args.policy)
    if args.json:
        _print_json([r.to_dict() for r in results])
        return 0
    for path, res in zip(args.images, results, strict=True):
        if not res.faces:
            print(f"{path}: {res.image.problem} — {res.image.detail}")
            continue
        for face in res.faces:
            t = face.threshold
            top = ", ".join(f"{c.person} {c.score:.3f}" for c in face.candidates)
            answer = "UNKNOWN" if face.best == "unknown" else face.best
            print(f"{path} {face.face.box}: {answer}"
                  f"  (threshold {t.value:.3f} at FAR {t.far:g}; top: {top or 'empty gallery'}"
                  f"{_liveness_note([face.face])})")
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    from facemetric.gallery import SQLiteGallery

    if args.gallery_command == "reembed":
        rec = _recognizer_for_reembed(args)
        with rec:
            n = rec.reembed()
        print(f"re-embedded {n} face(s) of collection {args.collection!r} with "
              f"{rec.contract.describe()}")
        return 0
    path = Path(args.gallery)
    if not path.is_file():
        raise FileNotFoundError(f"no gallery file {path}")
    with SQLiteGallery(path) as store:
        if args.gallery_command == "list":
            rows = []
            for col in store.list_collections():
                cursor = None
                while True:
                    page, cursor = store.list_persons(col.name, after=cursor, limit=1000)
                    rows.extend((col.name, p.name, p.face_count) for p in page)
                    if cursor is None:
                        break
            if args.json:
                _print_json([{"collection": c, "person": p, "faces": n} for c, p, n in rows])
            else:
                for col in store.list_collections():
                    print(f"collection {col.name!r}: {col.contract.describe()}")
                for c, p, n in rows:
                    print(f"  {c}/{p}: {n} face(s)")
            return 0
        if args.gallery_command == "remove":
            person = store.get_person(args.collection, args.person)
            store.delete_person(args.collection, args.person)
            print(f"removed {args.person!r} and {person.face_count} face(s)")
            return 0
    raise ValueError(f"unknown gallery command {args.gallery_command!r}")


def _recognizer_for_reembed(args: argparse.Namespace) -> Any:
    """A recognizer on the *new* model whose collection still pins the old one: the store's
    contract check is skipped for the re-embedding itself."""
    from facemetric.recognizer import Recognizer

    return Recognizer.for_reembedding(args.model, Path(args.gallery), collection=args.collection)


def _common(p: argparse.ArgumentParser, gallery: bool) -> None:
    p.add_argument("--model", default=DEFAULT, help=f"{MODEL_HELP} (default: {DEFAULT!r})")
    if gallery:
        p.add_argument("--collection", default="default", help="gallery collection")
    p.add_argument("--thresholds", help="a threshold table JSON (default: the model's own)")
    p.add_argument("--min-face", type=int, default=32, help="smallest face box side, px")
    p.add_argument("--liveness", metavar="FOLDER",
                   help="a PAD detector saved by `facemetric pad train`: every face is "
                        "checked and an image judged a presentation attack is refused")
    p.add_argument("--liveness-threshold", type=float, default=None,
                   help="attack when the detector's score is at least this (default: the "
                        "threshold the detector was calibrated with)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_recognition_commands(sub: argparse._SubParsersAction) -> None:
    """Register export, calibrate, verify, enroll, identify and gallery."""
    ex = sub.add_parser("export", help="export a trained backbone to ONNX (with its contract)")
    ex.add_argument("model", help="a training run folder or checkpoint_*.pt")
    ex.add_argument("--out", required=True, help="the .onnx file to write")
    ex.set_defaults(func=_cmd_export)

    dm = sub.add_parser("default-model",
                        help="show the installed default model, or install an .onnx export")
    dm.add_argument("model", nargs="?", default=None,
                    help="an exported .onnx file to install as the default (omit to show "
                         "the current one)")
    dm.set_defaults(func=_cmd_default_model)

    ca = sub.add_parser("calibrate", help="FAR → threshold table of a model on labelled data")
    ca.add_argument("model", help=MODEL_HELP)
    src = ca.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="LFW-format pairs file (with --data)")
    src.add_argument("--cfp", help="CFP root (with --data and --protocol)")
    src.add_argument("--folder", help="aligned identity tree: every pair of images compared")
    ca.add_argument("--data", help="aligned images the pairs name")
    ca.add_argument("--protocol", choices=("FF", "FP"), default="FF")
    ca.add_argument("--people", help="LFW people file restricting --folder")
    ca.add_argument("--far", help="comma-separated FARs (default: every resolvable power of 10)")
    ca.add_argument("--min-false-accepts", type=int, default=1,
                    help="impostors that must lie above a threshold for its FAR to count")
    ca.add_argument("--workers", type=int, default=1, help="image-decoding threads")
    ca.add_argument("--out", help="write the table here instead of beside the model")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=_cmd_calibrate)

    ve = sub.add_parser("verify", help="are the faces in two photos the same person?")
    ve.add_argument("a")
    ve.add_argument("b")
    _common(ve, gallery=False)
    ve.add_argument("--far", type=float, default=None, help="false-accept rate (default 1e-3)")
    ve.add_argument("--policy", choices=("largest", "centre", "single"), default="largest")
    ve.set_defaults(func=_cmd_verify)

    en = sub.add_parser("enroll", help="add photos of a person to a gallery")
    en.add_argument("gallery", help="SQLite gallery file (created if missing)")
    en.add_argument("person", nargs="?", help="the person's name")
    en.add_argument("images", nargs="*", help="photos of the person")
    en.add_argument("--folder", help="enroll a tree DIR/<person>/<photo> instead (resumable)")
    _common(en, gallery=True)
    en.add_argument("--policy", choices=("single", "largest", "centre"), default="single")
    en.set_defaults(func=_cmd_enroll)

    idf = sub.add_parser("identify", help="who is in these photos?")
    idf.add_argument("gallery", help="SQLite gallery file")
    idf.add_argument("images", nargs="+")
    _common(idf, gallery=True)
    idf.add_argument("--k", type=int, default=5, help="candidates per face")
    idf.add_argument("--far", type=float, default=None, help="false-accept rate (default 1e-3)")
    idf.add_argument("--policy", choices=("largest", "centre", "all"), default="largest")
    idf.add_argument("--score", choices=("max", "mean"), default="max",
                     help="person score: best template or mean template")
    idf.set_defaults(func=_cmd_identify)

    ga = sub.add_parser("gallery", help="list, remove or re-embed a gallery")
    gsub = ga.add_subparsers(dest="gallery_command", required=True)
    gl = gsub.add_parser("list", help="collections, persons and face counts")
    gl.add_argument("gallery")
    gl.add_argument("--json", action="store_true")
    gr = gsub.add_parser("remove", help="delete a person and their faces")
    gr.add_argument("gallery")
    gr.add_argument("person")
    gr.add_argument("--collection", default="default")
    gre = gsub.add_parser("reembed", help="re-embed a collection's stored faces with a new model")
    gre.add_argument("gallery")
    gre.add_argument("--model", required=True, help=MODEL_HELP)
    gre.add_argument("--collection", default="default")
    ga.set_defaults(func=_cmd_gallery)


__all__ = ["add_recognition_commands"]
