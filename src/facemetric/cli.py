"""The ``facemetric`` command: thin — parses arguments, calls the library, prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from facemetric import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from facemetric.demo import run_demo

    result = run_demo(Path(args.data), out_dir=Path(args.out))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facemetric", description="Face recognition by deep metric learning."
    )
    parser.add_argument("--version", action="version", version=f"facemetric {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="short end-to-end training run on real faces")
    demo.add_argument("--data", required=True, help="data root (holds orl/, lfw/, cfp/)")
    demo.add_argument("--out", default="runs/demo", help="output folder (plots, logs)")
    demo.set_defaults(func=_cmd_demo)

    align = sub.add_parser("align", help="detect, 5-point align and crop a folder to 112×112")
    align.add_argument("src", help="input tree: SRC/<identity>/<image>")
    align.add_argument("dst", help="output tree (same layout); existing outputs are kept")
    align.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    align.add_argument(
        "--fallback", action="store_true", help="centre-crop images where no face is found"
    )
    align.set_defaults(func=_cmd_align)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"facemetric {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
