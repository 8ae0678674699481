"""Backbones side by side: the bare training step at one input size.

    .venv/bin/python benchmarks/backbone_step.py --size 64 \\
        --models mobilefacenet iresnet18 mobilefacenet:pool=gem
    .venv/bin/python benchmarks/backbone_step.py --size 64 --steps 20 \\
        --models mobilefacenet mobilefacenet:compile=1     # [train] compile, eager vs compiled

Each model (``name`` or ``name:option=value,...``) is built with ``embedding_size`` 128 and
``input_size = --size``, in channels-last (the training loop's default), and runs
``--steps`` timed steps of forward, N-pair loss (the recipe's), backward and an SGD step with
momentum on one in-memory P×K batch, after two warm-up steps. Reported: median step time,
img/s, parameters, and each model's img/s as a ratio to the first model's. One process, one
model at a time: run it on an idle machine (a second busy process halves these numbers).
``compile=1`` calls the model through ``torch.compile`` as ``[train] compile`` does; its
first step, which compiles, is reported on its own ("first step") and is not in the median.
``--retain-freed-memory`` first raises glibc's malloc thresholds as the training loop does
(``facemetric.training.malloc``); without it, glibc's defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _parse(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"model option {item!r} in {spec!r} is not key=value")
        options[key] = int(value) if value.isdigit() else value
    return name, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilefacenet", "iresnet18"])
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--p", type=int, default=16, help="identities per batch")
    parser.add_argument("--k", type=int, default=4, help="images per identity")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="raise glibc's malloc thresholds as the training loop does")
    args = parser.parse_args()

    import torch

    from facemetric.losses import NPairLoss
    from facemetric.models import build_model

    if args.retain_freed_memory:
        from facemetric.training.malloc import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("--retain-freed-memory: this C library has no mallopt (not glibc)")
    torch.manual_seed(0)
    batch = args.p * args.k
    x = torch.randn(batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    labels = torch.arange(args.p).repeat_interleave(args.k)
    loss_fn = NPairLoss(l2_reg=0.02)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch} "
          f"({args.p}×{args.k}), {args.size} px, malloc "
          f"{'as the training loop' if args.retain_freed_memory else 'glibc defaults'}")
    print("| model | first step, s | ms/step | img/s | × first | parameters |")
    print("|---|---:|---:|---:|---:|---:|")
    first: float | None = None
    for spec in args.models:
        name, options = _parse(spec)
        compiled = bool(options.pop("compile", 0))
        model = build_model(name, 128, input_size=args.size, **options)
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        net = torch.compile(model) if compiled else model
        times: list[float] = []
        first_step = 0.0
        for i in range(2 + args.steps):
            start = time.perf_counter()
            loss = loss_fn(net(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i == 0:
                first_step = time.perf_counter() - start
            if i >= 2:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        rate = batch / step
        first = first or rate
        n_params = sum(p.numel() for p in model.parameters())
        print(f"| {spec} | {first_step:.1f} | {step * 1000:.0f} | {rate:.1f} | "
              f"{rate / first:.2f} | {n_params:,} |")


if __name__ == "__main__":
    main()
