"""The ``facemetric`` command: thin — parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facemetric import __version__

if TYPE_CHECKING:
    from facemetric.training.averaging import AveragedWeights


def _cmd_demo(args: argparse.Namespace) -> int:
    from facemetric.experiments.lfw_demo import DEMO_CONFIG_FILE, has_lfw, run_lfw_demo

    data = Path(args.data)
    if has_lfw(data):
        result = run_lfw_demo(
            data, out_dir=Path(args.out), cache_dir=Path(args.cache), max_steps=args.steps,
            config_file=Path(args.config) if args.config else DEMO_CONFIG_FILE,
            student=args.student, student_steps=args.student_steps,
            install_default=args.install_default,
        )
    else:
        from facemetric.experiments.orl import run_orl_example

        print(
            f"no LFW under {data / 'lfw'} (lfw-deepfunneled + peopleDevTrain.txt + "
            "pairsDevTest.txt, from vis-www.cs.umass.edu/lfw): running the short ORL example"
        )
        result = run_orl_example(data, out_dir=Path(args.out))
    print(result.summary())
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from facemetric.align import align_folder

    report = align_folder(
        Path(args.src),
        Path(args.dst),
        workers=args.workers,
        fallback=args.fallback,
    )
    print(report.summary())
    return 0 if report.failed == 0 else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from facemetric.training import run_from_cli

    result = run_from_cli(Path(args.config), resume=args.resume,
                          teacher=getattr(args, "teacher", None))
    last = result.losses[-1] if result.losses else float("nan")
    print(
        f"trained {result.steps} steps ({result.epochs} epochs) in {result.wall_seconds:.0f} s, "
        f"{result.images_per_second:.1f} img/s, last loss {last:.4f}\n"
        f"  checkpoint: {result.checkpoint}\n  log: {result.log_csv}\n"
        f"  loss curve: {result.loss_plot}"
    )
    if result.failures:
        print(f"  {len(result.failures)} images could not be loaded (listed in the log)")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from facemetric.training.averaging import (
        average_checkpoints,
        default_average_name,
        save_average,
        tail_checkpoints,
    )

    run = Path(args.run)
    paths = tail_checkpoints(run, from_step=args.from_step, to_step=args.to_step,
                             last_fraction=args.last_fraction)
    averaged = average_checkpoints(paths)
    if args.recompute_batchnorm:
        averaged = _recompute_batchnorm(averaged, args)
    elif args.data is not None or args.people is not None or args.min_images is not None:
        raise ValueError("--data, --people and --min-images choose the images of "
                         "--recompute-batchnorm; add that flag or drop them")
    out = Path(args.out) if args.out else run / default_average_name(averaged)
    save_average(averaged, out)
    steps = averaged.steps
    print(f"averaged {len(steps)} checkpoints of {run} (steps {steps[0]:,}–{steps[-1]:,}): "
          f"{out}\n  evaluate or export it like a checkpoint: facemetric eval --model {out} ...")
    return 0


def _recompute_batchnorm(averaged: AveragedWeights, args: argparse.Namespace) -> AveragedWeights:
    """``facemetric average --recompute-batchnorm``: the images are ``--data/--people/
    --min-images``, each defaulting to the run's stored ``[data]`` section."""
    from facemetric.training.averaging import recompute_average_batchnorm

    stored = averaged.config.get("data", {})
    root = args.data if args.data is not None else stored.get("root")
    people = args.people if args.people is not None else stored.get("people_file")
    min_images = args.min_images if args.min_images is not None else int(
        stored.get("min_images", 1))
    if root is None:
        raise ValueError("the run's configuration names no [data] root: pass --data")
    for flag, path in (("--data", root), ("--people", people)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(
                f"{path} (for {flag}; the run's own [data] unless given) does not exist from "
                f"{Path.cwd()}: pass {flag} with the training images' path")
    renewed = recompute_average_batchnorm(averaged, root, people_file=people,
                                          min_images=min_images, progress=True)
    record = renewed.batchnorm or {}
    print(f"BatchNorm statistics recomputed over {record.get('images', 0):,} images of {root}"
          + (f" ({len(record['unreadable'])} unreadable, replaced)"
             if record.get("unreadable") else ""))
    return renewed


def _cmd_eval(args: argparse.Namespace) -> int:
    from facemetric.evaluation.run import evaluate

    if (args.gallery is None) != (args.probe is None):
        raise ValueError("--gallery and --probe go together")
    result = evaluate(
        Path(args.model),
        data_root=None if args.data is None else Path(args.data),
        pairs_file=None if args.pairs is None else Path(args.pairs),
        cfp_root=None if args.cfp is None else Path(args.cfp),
        protocol=args.protocol,
        bin_file=None if args.bin is None else Path(args.bin),
        gallery=None if args.gallery is None else Path(args.gallery),
        probe=None if args.probe is None else Path(args.probe),
        out_dir=Path(args.out),
        flip=False if args.no_flip else None,
        folds=args.folds,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
    )
    print(result.summary())
    return 1 if result.failures else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from facemetric.experiments.compare import compare
    from facemetric.experiments.seeds import compare_seeds

    common: dict[str, Any] = {
        "out_dir": Path(args.out),
        "budget_steps": args.steps,
        "budget_seconds": args.seconds,
        "eval_every": args.eval_every,
        "eval_pairs": None if args.eval_pairs is None else Path(args.eval_pairs),
        "eval_root": None if args.eval_root is None else Path(args.eval_root),
        "max_eval_pairs": args.max_eval_pairs,
        "data_root": None if args.data is None else Path(args.data),
        "checkpoint_every": args.checkpoint_every,
    }
    configs = [Path(c) for c in args.configs]
    if args.seeds is not None:
        seeded = compare_seeds(configs, seeds=args.seeds, reference=args.reference, **common)
        print(seeded.summary())
        return 0
    if args.reference is not None:
        raise SystemExit("--reference needs --seeds (the paired differences are over seeds)")
    result = compare(configs, seed=args.seed, **common)
    print(result.summary())
    return 0


def _cmd_compare_summary(args: argparse.Namespace) -> int:
    from facemetric.experiments.seeds import summarize_seeds

    result = summarize_seeds(Path(args.out), args.seeds, runs=args.runs,
                             reference=args.reference, name=args.name)
    print(result.summary())
    return 0


def _cmd_compare_plot(args: argparse.Namespace) -> int:
    from facemetric.experiments.compare import plot_convergence, recorded_run

    if args.names is not None and len(args.names) != len(args.runs):
        raise SystemExit(f"--names gives {len(args.names)} names for {len(args.runs)} runs")
    names = args.names or [None] * len(args.runs)
    runs = [recorded_run(Path(r), n) for r, n in zip(args.runs, names, strict=True)]
    print(plot_convergence(runs, Path(args.out), args.title))
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from facemetric.evaluation.run import visualize_folder

    png, failures = visualize_folder(
        Path(args.model),
        Path(args.data),
        Path(args.out),
        max_identities=args.max_identities,
        max_images_per_identity=args.max_images,
        method=args.method,
    )
    print(f"embedding map: {png}")
    if failures:
        print(f"  {len(failures)} images could not be loaded and were left out:")
        for failure in failures:
            print(f"    {failure.path}: {failure.reason}")
    return 1 if failures else 0


def _cmd_heldout_pairs(args: argparse.Namespace) -> int:
    from facemetric.evaluation.heldout import heldout_pairs

    written = heldout_pairs(Path(args.data), Path(args.people), Path(args.out),
                            below=args.below, folds=args.folds, per_fold=args.per_fold,
                            seed=args.seed)
    print(written.summary())
    return 0


def _cmd_select_checkpoint(args: argparse.Namespace) -> int:
    from facemetric.evaluation.heldout import plot_selection, select_checkpoint

    chosen = select_checkpoint(Path(args.run), Path(args.pairs), Path(args.data),
                               out_dir=None if args.out is None else Path(args.out),
                               flip=not args.no_flip, device=args.device, every=args.every)
    print(chosen.summary())
    monitor: dict[str, tuple[list[int], list[float]]] = {}
    if (Path(args.run) / "compare_run.json").is_file():  # a run of `facemetric compare`
        from facemetric.experiments.compare import recorded_run

        watched = recorded_run(Path(args.run))
        kept = [(s, a) for s, a in zip(watched.eval_steps, watched.eval_accuracy,
                                         strict=True) if s > 0]  # not the untrained net
        if kept:
            monitor["the pairs compare watched (no flip): see, not choose by"] = (
                [s for s, _ in kept], [a for _, a in kept])
    try:
        png = plot_selection(chosen, chosen.markdown.with_suffix(".png"), monitor=monitor)
    except ImportError as err:
        print(f"no plot: {err}")
    else:
        print(f"plot: {png}")
    return 0


def _add_evaluation_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="verification/identification report of a checkpoint")
    ev.add_argument("--model", required=True,
                    help="a run folder, checkpoint_*.pt, exported .onnx file, or 'dlib'")
    ev.add_argument("--data", help="aligned images (LFW layout, or CFP's Data/Images layout)")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="LFW pairs.txt / pairsDevTest.txt")
    source.add_argument("--cfp", help="CFP root (holds Protocol/); images come from --data")
    source.add_argument("--bin", help="insightface .bin verification set")
    source.add_argument("--gallery", help="gallery tree DIR/<identity>/<image> (with --probe)")
    ev.add_argument("--probe", help="probe tree DIR/<identity>/<image> (with --gallery)")
    ev.add_argument("--protocol", choices=("FF", "FP"), default="FP", help="CFP protocol")
    ev.add_argument("--out", default="runs/eval", help="report folder")
    ev.add_argument("--no-flip", action="store_true", help="no flip test (mirror sum)")
    ev.add_argument("--folds", type=int, default=10, help="interleaved folds (View 1, gallery)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ev.add_argument("--workers", type=int, default=1, help="image-decoding threads")
    ev.set_defaults(func=_cmd_eval)

    cmp = sub.add_parser("compare", help="train configs on one budget and plot convergence")
    cmp.add_argument("--configs", nargs="+", required=True, help="experiment files")
    cmp.add_argument("--out", default="runs/compare", help="output folder")
    cmp.add_argument("--steps", type=int, help="step budget (replaces max_steps)")
    cmp.add_argument("--seconds", type=float, help="training-time budget per run")
    cmp.add_argument("--eval-every", type=int, default=100, help="held-out check interval")
    cmp.add_argument("--eval-pairs", help="LFW-format held-out pairs (e.g. pairsDevTest.txt)")
    cmp.add_argument("--eval-root", help="aligned images the held-out pairs name")
    cmp.add_argument("--max-eval-pairs", type=int, help="pairs checked while training")
    cmp.add_argument("--data", help="override every config's [data] root")
    seeding = cmp.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, default=0)
    seeding.add_argument("--seeds", type=int, nargs="+",
                         help="one compare per seed into OUT/seed<k>/, then mean ± std over "
                         "seeds and seed-band plots (OUT/seeds.md, OUT/seeds.png)")
    cmp.add_argument("--reference", help="with --seeds: the run the paired differences are "
                     "taken against (default: the first config)")
    cmp.add_argument("--checkpoint-every", type=int, default=100,
                     help="steps between checkpoints; rerun the same command to resume")
    cmp.set_defaults(func=_cmd_compare)

    hop = sub.add_parser("heldout-pairs", help="validation pairs over the training split's "
                         "identities a min_images run leaves out")
    hop.add_argument("--data", required=True, help="aligned images, LFW layout")
    hop.add_argument("--people", required=True, help="the training people file "
                     "(peopleDevTrain.txt)")
    hop.add_argument("--below", type=int, required=True,
                     help="the run's [data] min_images: identities with fewer images are used")
    hop.add_argument("--out", required=True, help="pairs file to write (LFW View 2 format)")
    hop.add_argument("--folds", type=int, default=10, help="identity-disjoint folds")
    hop.add_argument("--per-fold", type=int,
                     help="matched (= mismatched) pairs per fold (default: all a fold allows)")
    hop.add_argument("--seed", type=int, default=0)
    hop.set_defaults(func=_cmd_heldout_pairs)

    sel = sub.add_parser("select-checkpoint", help="score every checkpoint of a run on "
                         "held-out pairs and choose the best")
    sel.add_argument("run", help="a training run folder (checkpoint_*.pt, config.json)")
    sel.add_argument("--pairs", required=True, help="held-out pairs (facemetric heldout-pairs)")
    sel.add_argument("--data", required=True, help="aligned images the pairs name")
    sel.add_argument("--out", help="where selection.md/.json go (default: the run folder)")
    sel.add_argument("--no-flip", action="store_true", help="no flip test")
    sel.add_argument("--every", type=int, help="only the checkpoints of steps divisible by N "
                     "(and the last)")
    sel.add_argument("--device", default="cpu")
    sel.set_defaults(func=_cmd_select_checkpoint)

    cms = sub.add_parser("compare-summary",
                         help="mean ± std over seeds of a finished `compare --seeds` folder")
    cms.add_argument("out", help="the --out folder of `facemetric compare --seeds`")
    cms.add_argument("--seeds", type=int, nargs="+", required=True)
    cms.add_argument("--runs", nargs="+", help="keep these runs (config stems; default all)")
    cms.add_argument("--reference", help="run the paired differences are taken against")
    cms.add_argument("--name", default="seeds", help="file stem of the .md/.png/.json")
    cms.set_defaults(func=_cmd_compare_summary)

    cpl = sub.add_parser("compare-plot", help="one convergence plot over runs of different "
                         "compare invocations")
    cpl.add_argument("runs", nargs="+", help="run folders OUT/<config name>/ of compare")
    cpl.add_argument("--out", required=True, help="PNG to write")
    cpl.add_argument("--names", nargs="+", help="legend names, one per run (default: folders)")
    cpl.add_argument("--title", default="Convergence")
    cpl.set_defaults(func=_cmd_compare_plot)

    vis = sub.add_parser("visualize", help="2-D map of a folder's embeddings")
    vis.add_argument("--model", required=True, help="checkpoint_*.pt or a run folder")
    vis.add_argument("--data", required=True, help="tree DIR/<identity>/<image>")
    vis.add_argument("--max-identities", type=int, default=20,
                     help="the identities with the most images")
    vis.add_argument("--max-images", type=int, help="images per identity")
    vis.add_argument("--method", choices=("auto", "umap", "tsne", "pca"), default="auto")
    vis.add_argument("--out", default="runs/visualize/embeddings.png", help="PNG path")
    vis.set_defaults(func=_cmd_visualize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facemetric", description="Face recognition by deep metric learning."
    )
    parser.add_argument("--version", action="version", version=f"facemetric {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="short end-to-end training run on real faces")
    demo.add_argument("--data", required=True, help="data root (holds orl/, lfw/, cfp/)")
    demo.add_argument("--out", default="runs/demo", help="output folder (plots, logs)")
    demo.add_argument("--cache", default="cache", help="aligned faces, reused across runs")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default 680)")
    demo.add_argument("--config", default=None,
                      help="training configuration (default: configs/demo_lfw.toml)")
    demo.add_argument("--student", action=argparse.BooleanOptionalAction, default=True,
                      help="also distil dlib into the deployable student, export it to ONNX "
                           "and evaluate it (LFW demo; default: on)")
    demo.add_argument("--student-steps", type=int, default=None,
                      help="the student's training steps (default 400)")
    demo.add_argument("--install-default", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="install the student's export as the recognition API's default "
                           "model (default: on; see `facemetric default-model`)")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train a face-embedding model from a TOML config")
    train.add_argument("--config", required=True, help="experiment file (see configs/)")
    train.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    train.set_defaults(func=_cmd_train)

    avg = sub.add_parser("average", help="uniform average of a run's last checkpoints "
                         "(stochastic weight averaging)")
    avg.add_argument("run", help="the run folder holding checkpoint_*.pt")
    tail = avg.add_mutually_exclusive_group()
    tail.add_argument("--last-fraction", type=float,
                      help="the checkpoints of the last fraction of the run's steps (e.g. 0.33)")
    tail.add_argument("--from-step", type=int, help="first step averaged (inclusive)")
    avg.add_argument("--to-step", type=int, help="last step averaged (inclusive; default: the "
                     "last checkpoint)")
    avg.add_argument("--out", help="file to write (default: RUN/averaged_<first>-<last>.pt)")
    avg.add_argument("--recompute-batchnorm", action="store_true",
                     help="recompute BatchNorm's statistics for the averaged weights with one "
                     "pass over the training images (SWA), instead of averaging them")
    avg.add_argument("--data", help="with --recompute-batchnorm: the aligned images "
                     "(root/<identity>/<file>; default: the run's [data] root)")
    avg.add_argument("--people", help="with --recompute-batchnorm: the identities to use, an "
                     "LFW people list (default: the run's [data] people_file)")
    avg.add_argument("--min-images", type=int, help="with --recompute-batchnorm: leave out "
                     "identities with fewer images (default: the run's [data] min_images)")
    avg.set_defaults(func=_cmd_average)

    distill = sub.add_parser(
        "distill", help="train a student on a teacher's embeddings (knowledge distillation)")
    distill.add_argument("--teacher", required=True,
                         help="'dlib', a training run folder or an .onnx file")
    distill.add_argument("--config", required=True,
                         help="the student's experiment file; its [distill] section sets the "
                              "loss weights (docs/distillation.md)")
    distill.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    distill.set_defaults(func=_cmd_train)

    align = sub.add_parser("align", help="detect, 5-point align and crop a folder to 112×112")
    align.add_argument("src", help="input tree: SRC/<identity>/<image>")
    align.add_argument("dst", help="output tree (same layout); existing outputs are kept")
    align.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    align.add_argument(
        "--fallback", action="store_true", help="centre-crop images where no face is found"
    )
    align.set_defaults(func=_cmd_align)
    _add_evaluation_commands(sub)
    from facemetric.recognition_cli import add_recognition_commands

    add_recognition_commands(sub)
    from facemetric.service_cli import add_service_commands

    add_service_commands(sub)
    from facemetric.pad_cli import add_pad_commands

    add_pad_commands(sub)
    from facemetric.robustness_cli import add_robustness_commands

    add_robustness_commands(sub)
    from facemetric.cluster_cli import add_cluster_commands

    add_cluster_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input or a file that cannot be used (a missing, foreign or
    damaged checkpoint, an output folder that is taken) prints one sentence and returns 2,
    a training run stopped by NaN/Inf numbers prints its reason and returns 1."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, FileExistsError, ValueError, PermissionError) as exc:
        print(f"facemetric {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"facemetric {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
