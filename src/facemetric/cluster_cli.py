"""``facemetric cluster``: group a photo folder by person, and the user's decisions on the
groups. Thin: parses, calls :class:`facemetric.clustering.PhotoCollection`, prints.

    facemetric cluster FOLDER --out DIR --model M [--far 1e-3] [--method agglomerative|hdbscan]
                       [--linkage average|single|complete] [--min-size 2] [--neighbours 30]
    facemetric cluster list DIR
    facemetric cluster name DIR CLUSTER PERSON [--gallery G [--collection C]]
    facemetric cluster merge DIR INTO OTHER
    facemetric cluster split DIR CLUSTER FACE [FACE ...]
    facemetric cluster move DIR FACE [FACE ...] [--to CLUSTER]

(a folder literally named like an action is given as ``./name``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ACTIONS = ("list", "name", "merge", "split", "move")


def _ints(values: list[str], what: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as err:
        raise ValueError(f"{what} are numbers (see faces.csv): {err}") from None


def _need(args: list[str], count: int, usage: str) -> None:
    if len(args) < count:
        raise ValueError(f"usage: facemetric cluster {usage}")


def _run(args: argparse.Namespace, folder: str) -> int:
    from facemetric.clustering import ClusterOptions, PhotoCollection
    from facemetric.recognizer import Recognizer

    if args.out is None or args.model is None:
        raise ValueError("clustering a folder needs --out DIR and --model MODEL")
    thresholds = None
    if args.thresholds:
        from facemetric.inference import ThresholdTable

        thresholds = ThresholdTable.load(args.thresholds)
    rec = Recognizer(args.model, thresholds=thresholds, min_face_size=args.min_face)
    options = ClusterOptions(far=args.far, method=args.method, linkage=args.linkage,
                             min_size=args.min_size, neighbours=args.neighbours)
    with PhotoCollection(Path(args.out), rec, options=options, progress=not args.json) as pc:
        stored = pc.state.get_meta("options")
        if stored is not None and stored != options.to_dict():
            print(f"note: {args.out} keeps the options of its first run: {stored}")
        report = pc.update_folder(folder)
    if args.json:
        print(json.dumps({"photos_seen": report.photos_seen, "photos_new": report.photos_new,
                          "faces_new": report.faces_new, "assigned": report.assigned,
                          "new_clusters": report.new_clusters, "clusters": report.clusters,
                          "unclustered": report.unclustered, "refused": report.refused,
                          "split": report.split, "threshold": report.threshold,
                          "far": report.far,
                          "problems": [p.__dict__ for p in report.problems]}, indent=2))
    else:
        print(report.summary())
    return 0


def _list(pc: Any) -> None:
    rows = pc.state.faces()
    min_size = pc.state.options().min_size
    sizes: dict[int, list[int]] = {}
    names: dict[int, str | None] = {}
    for r in rows:
        if r.cluster is not None:
            sizes.setdefault(r.cluster, []).append(r.id)
            names[r.cluster] = r.name
    print(f"{'cluster':>8}  {'faces':>5}  person / faces")
    for c, faces in sorted(sizes.items(), key=lambda t: (-len(t[1]), t[0])):
        if len(faces) < min_size and not names[c]:
            continue
        shown = ", ".join(map(str, faces[:8])) + (" ..." if len(faces) > 8 else "")
        print(f"{c:>8}  {len(faces):>5}  {names[c] or '-'}  [{shown}]")
    loose = sum(len(f) for c, f in sizes.items() if len(f) < min_size and not names[c])
    print(f"{loose} unclustered faces (DIR/unclustered)")


def _action(args: argparse.Namespace) -> int:
    from facemetric.clustering import PhotoCollection

    action, rest = args.target[0], args.target[1:]
    _need(rest, 1, f"{action} DIR ...")
    with PhotoCollection(Path(rest[0])) as pc:
        if action == "list":
            _list(pc)
            return 0
        if action == "name":
            _need(rest, 3, "name DIR CLUSTER PERSON [--gallery G]")
            (cluster,) = _ints(rest[1:2], "cluster ids")
            pc.name(cluster, " ".join(rest[2:]))
            print(f"cluster {cluster} is {' '.join(rest[2:])!r}")
            if args.gallery:
                added = pc.enroll(cluster, args.gallery, args.collection)
                print(f"enrolled {added} faces into {args.gallery} ({args.collection})")
        elif action == "merge":
            _need(rest, 3, "merge DIR INTO OTHER")
            into, other = _ints(rest[1:3], "cluster ids")
            pc.merge(into, other)
            print(f"merged cluster {other} into {into}")
        elif action == "split":
            _need(rest, 3, "split DIR CLUSTER FACE [FACE ...]")
            cluster, *faces = _ints(rest[1:], "cluster and face ids")
            print(f"new cluster {pc.split(cluster, faces)} from cluster {cluster}")
        else:
            _need(rest, 2, "move DIR FACE [FACE ...] [--to CLUSTER]")
            faces = _ints(rest[1:], "face ids")
            target = pc.move(faces, args.to)
            print(f"moved {len(faces)} faces to cluster {target}" if args.to is not None
                  else f"moved {len(faces)} faces each into a cluster of its own")
        pc.export()
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    if args.target[0] in ACTIONS:
        return _action(args)
    if len(args.target) != 1:
        raise ValueError(f"expected one FOLDER or an action {ACTIONS}, got {args.target}")
    return _run(args, args.target[0])


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    from facemetric.clustering import DEFAULT_CLUSTER_FAR, DEFAULT_NEIGHBOURS, LINKAGES, METHODS

    p = sub.add_parser(
        "cluster", help="group a photo folder by person (incremental), and edit the groups",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="+", help="FOLDER, or an action: " + ", ".join(ACTIONS))
    p.add_argument("--out", help="output folder: state, faces.csv, crops, contact sheets")
    p.add_argument("--model", help="a training run, checkpoint, .onnx file, or 'dlib'")
    p.add_argument("--thresholds", help="a threshold table JSON (default: the model's own)")
    p.add_argument("--far", type=float, default=DEFAULT_CLUSTER_FAR,
                   help="false-accept rate of the calibrated threshold (first run)")
    p.add_argument("--method", choices=METHODS, default="agglomerative")
    p.add_argument("--linkage", choices=LINKAGES, default="average")
    p.add_argument("--min-size", type=int, default=2,
                   help="smaller clusters go to unclustered/")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help="k of the k-NN graph")
    p.add_argument("--min-face", type=int, default=32, help="smallest face box side, px")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    p.add_argument("--gallery", help="name: also enroll the cluster into this gallery")
    p.add_argument("--collection", default="default", help="name: the gallery collection")
    p.add_argument("--to", type=int, help="move: the target cluster (default: new ones)")
    p.set_defaults(func=_cmd_cluster)


__all__ = ["add_cluster_commands"]
