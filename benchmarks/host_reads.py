"""Reads of device values per training step of the classifier heads, counted on the CPU.

    PYTHONPATH=src .venv/bin/python benchmarks/host_reads.py                 # MS1MV2's shape
    PYTHONPATH=src .venv/bin/python benchmarks/host_reads.py --classes 360232 --rate 0.2

On a GPU each read of a value, data-sized operator or host-to-device copy waits for every
queued kernel (see :mod:`facemetric.host_reads`). This counts them for one forward + backward
of Partial FC (one process, ArcFace, dense gradient) and of the full ArcFace head at the
given shape, with the chunked head's branches as a GPU takes them (``reads_are_free`` answers
False), after one warm-up step. One JSON line per case: the reads of a step, by name. Counts,
not time: what they cost on a GPU depends on the host and the queue.

For a tree without ``facemetric.host_reads`` (an older commit), copy
``src/facemetric/host_reads.py`` into it and point ``PYTHONPATH`` at it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=85_742)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="counted steps (after one warm-up)")
    parser.add_argument("--cases", nargs="+", choices=("partial_fc", "full"),
                        default=["partial_fc", "full"])
    args = parser.parse_args()

    from facemetric.heads import PartialFC
    from facemetric.host_reads import HostReads
    from facemetric.losses.classifier import ArcFaceLoss, chunked
    from facemetric.losses.margins import ArcMargin

    gpu_branches = hasattr(chunked, "reads_are_free")
    if gpu_branches:
        chunked.reads_are_free = lambda tensor: False  # type: ignore[attr-defined]
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dim)
    y = torch.randint(0, args.classes, (args.batch,))
    for case in args.cases:
        head: torch.nn.Module
        if case == "partial_fc":
            head = PartialFC(args.classes, args.dim, ArcMargin(0.5), 64.0, args.rate)
        else:
            head = ArcFaceLoss(args.classes, args.dim, scale=64.0, margin=0.5)
        per_step = []
        for step in range(args.steps + 1):
            xx = x.clone().requires_grad_()
            with HostReads() as reads:
                head(xx, y).backward()
            head.weight.grad = None
            if step:  # the first step may read once what later steps remember
                per_step.append(reads.reads)
        print(json.dumps({
            "case": case, "classes": args.classes, "rate": args.rate if case == "partial_fc"
            else 1.0, "dim": args.dim, "batch": args.batch, "gpu_branches": gpu_branches,
            "reads_per_step": [len(r) for r in per_step], "by_name": dict(Counter(per_step[-1])),
        }))


if __name__ == "__main__":
    main()
