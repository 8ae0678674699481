"""Partial FC vs the full margin softmax at many identities, on CPU: step time and memory.

    .venv/bin/python benchmarks/partial_fc.py --classes 1000000            # D=512, B=128, ρ=0.1
    .venv/bin/python benchmarks/partial_fc.py --classes 100000 --threads 1 --steps 3

Each case runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own:
``full`` is ``ArcFaceLoss`` (the chunked full softmax over all ``N`` centres), ``partial``
is ``PartialFC`` of the same loss at ``--rate`` with a dense ``.weight`` gradient and
``torch.optim.SGD``, ``sparse`` the same with ``sparse_grad=True`` (a gradient of the sampled
rows only) and ``RowSparseSGD`` (the training loop's default for Partial FC with SGD).
Reported per case: the mean forward+backward time of ``--steps`` steps after one warm-up
step, the mean SGD step (momentum 0.9, weight decay 5e-4; gradients set to None between
steps, as in the training loop) after them, the resident memory once the centres exist
(``rss_params``) and the peak over the whole run (``peak_rss``), both in GiB, and
``peak − params``, the working memory of the steps (gradients, logits, optimiser state).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

CASES = ("sparse", "partial", "full")


def _rss_gib() -> float:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    import os

    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_case(case: str, classes: int, dim: int, batch: int, rate: float, steps: int,
             threads: int | None) -> dict[str, Any]:
    """One case in this process (call it in a fresh one for an honest peak memory)."""
    import torch

    from facemetric.heads import PartialFC
    from facemetric.losses.classifier import ArcFaceLoss
    from facemetric.losses.margins import ArcMargin
    from facemetric.training import RowSparseSGD

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    loss: torch.nn.Module
    if case in ("partial", "sparse"):  # built directly: from_loss would copy the centres
        loss = PartialFC(classes, dim, ArcMargin(0.5), 64.0, rate, sparse_grad=case == "sparse")
    else:
        loss = ArcFaceLoss(classes, dim, scale=64.0, margin=0.5)
    rss_params = _rss_gib()
    sgd = RowSparseSGD if case == "sparse" else torch.optim.SGD
    optimizer = sgd(loss.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    fwd_bwd: list[float] = []
    opt: list[float] = []
    for i in range(steps + 1):
        x = torch.randn(batch, dim, generator=gen, requires_grad=True)
        y = torch.randint(0, classes, (batch,), generator=gen)
        t0 = time.perf_counter()
        value = loss(x, y)
        value.backward()
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as the training loop does
        t2 = time.perf_counter()
        if i:  # the first step is a warm-up
            fwd_bwd.append(t1 - t0)
            opt.append(t2 - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    sampled = getattr(loss, "last_sampled", None)
    return {
        "case": case,
        "classes": classes,
        "dim": dim,
        "batch": batch,
        "rate": rate if case != "full" else 1.0,
        "sampled_rows": int(sampled.numel()) if sampled is not None else classes,
        "threads": torch.get_num_threads(),
        "fwd_bwd_s": sum(fwd_bwd) / len(fwd_bwd),
        "sgd_step_s": sum(opt) / len(opt),
        "rss_params_gib": rss_params,
        "peak_rss_gib": peak,
        "working_gib": peak - rss_params,
        "loss": float(value),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    common = [args.classes, args.dim, args.batch, args.rate, args.steps, args.threads]
    if args.case:
        print(json.dumps(run_case(args.case, *common)))
        return 0
    results = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--case", case, "--classes", str(args.classes),
               "--dim", str(args.dim), "--batch", str(args.batch), "--rate", str(args.rate),
               "--steps", str(args.steps)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{case}: failed (exit {proc.returncode}; out of memory?)\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    head = (f"{'case':8} {'rows/step':>10} {'fwd+bwd s':>10} {'sgd s':>8} {'params GiB':>11} "
            f"{'peak GiB':>9} {'working GiB':>12}")
    print(f"N={args.classes} D={args.dim} B={args.batch} rate={args.rate} steps={args.steps}")
    print(head)
    for r in results:
        print(f"{r['case']:8} {r['sampled_rows']:>10} {r['fwd_bwd_s']:>10.3f} "
              f"{r['sgd_step_s']:>8.3f} {r['rss_params_gib']:>11.2f} {r['peak_rss_gib']:>9.2f} "
              f"{r['working_gib']:>12.2f}")
    by = {r["case"]: r for r in results}
    for case in ("sparse", "partial"):
        if case in by and "full" in by:
            full = by["full"]["fwd_bwd_s"] + by["full"]["sgd_step_s"]
            mine = by[case]["fwd_bwd_s"] + by[case]["sgd_step_s"]
            print(f"{case}: whole step (fwd+bwd+sgd) {full / mine:.1f}x faster than full")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
