"""``facemetric robustness MODEL [MODEL ...]``: accuracy and TAR@FAR against degradation
severity, one line per model. Thin: parses, calls
:func:`facemetric.experiments.robustness.run_robustness`, prints."""

from __future__ import annotations

import argparse
import os

from facemetric.data.degradations import DEFAULT_SEVERITIES


def _severities(args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    names = args.degradations or list(DEFAULT_SEVERITIES)
    unknown = [n for n in names if n not in DEFAULT_SEVERITIES]
    if unknown:
        raise ValueError(f"unknown degradation(s) {unknown}; choose from "
                         f"{sorted(DEFAULT_SEVERITIES)}")
    return {n: DEFAULT_SEVERITIES[n] for n in names}


def _cmd_robustness(args: argparse.Namespace) -> int:
    import torch

    from facemetric.experiments.robustness import merge_reports, run_robustness

    if args.merge:
        merged = merge_reports(args.models, args.out)
        print(merged.table())
        print(f"report: {merged.files['report']}")
        return 0
    torch.set_num_threads(min(torch.get_num_threads(), args.threads))
    data = args.data or os.environ.get("FACEMETRIC_DATA")
    if not data:
        raise ValueError("give --data (the folder holding lfw/ and cfp/) or set FACEMETRIC_DATA")
    result = run_robustness(
        args.models, protocol=args.protocol, data_root=data, out_dir=args.out,
        pairs=args.pairs, seed=args.seed, fars=args.far, severities=_severities(args),
        detect=not args.no_detect, batch_size=args.batch_size, device=args.device,
        progress=not args.quiet, log=print,
    )
    print(result.table())
    print(f"report: {result.files['report']}  ({result.seconds / 60:.1f} min)")
    return 0


def add_robustness_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``facemetric robustness``."""
    p = sub.add_parser("robustness", help="verification accuracy against degradation severity "
                                          "(blur, resolution, JPEG, light, occlusion, rotation)")
    p.add_argument("models", nargs="+",
                   help="training run folders, checkpoint_*.pt, exported .onnx files, or "
                        "'dlib' (with --merge: report folders)")
    p.add_argument("--merge", action="store_true",
                   help="the arguments are report folders of runs on the same protocol, "
                        "pairs and seed: draw their models on shared plots in --out")
    p.add_argument("--protocol", choices=("lfw-devtest", "cfp-ff", "cfp-fp"),
                   default="lfw-devtest")
    p.add_argument("--data", help="folder holding lfw/ and cfp/ (default $FACEMETRIC_DATA)")
    p.add_argument("--pairs", type=int, help="use this many pairs (balanced, seeded)")
    p.add_argument("--seed", type=int, default=0,
                   help="pairs, degraded side and random degradations")
    p.add_argument("--far", type=float, nargs="+", default=[1e-3, 1e-2],
                   help="FARs whose TAR is reported (the first resolvable one is plotted)")
    p.add_argument("--degradations", nargs="+", metavar="NAME",
                   help=f"subset of {', '.join(DEFAULT_SEVERITIES)}")
    p.add_argument("--no-detect", action="store_true",
                   help="do not run the detector on the degraded photos")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (checkpoints)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (at most)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=_cmd_robustness)


__all__ = ["add_robustness_commands"]
