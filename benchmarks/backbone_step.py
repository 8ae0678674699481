"""Backbones side by side: the bare training step at one input size.

    .venv/bin/python benchmarks/backbone_step.py --size 64 \\
        --models mobilefacenet iresnet18 mobilefacenet:pool=gem

Each model (``name`` or ``name:option=value,...``) is built with ``embedding_size`` 128 and
``input_size = --size``, in channels-last (the training loop's default), and runs
``--steps`` timed steps of forward, N-pair loss (the recipe's), backward and an SGD step with
momentum on one in-memory P×K batch, after two warm-up steps. Reported: median step time,
img/s, parameters, and each model's img/s as a ratio to the first model's. One process, one
model at a time: run it on an idle machine (a second busy process halves these numbers).
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
    args = parser.parse_args()

    import torch

    from facemetric.losses import NPairLoss
    from facemetric.models import build_model

    torch.manual_seed(0)
    batch = args.p * args.k
    x = torch.randn(batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    labels = torch.arange(args.p).repeat_interleave(args.k)
    loss_fn = NPairLoss(l2_reg=0.02)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch} "
          f"({args.p}×{args.k}), {args.size} px")
    print("| model | ms/step | img/s | × first | parameters |")
    print("|---|---:|---:|---:|---:|")
    first: float | None = None
    for spec in args.models:
        name, options = _parse(spec)
        model = build_model(name, 128, input_size=args.size, **options)
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        times = []
        for i in range(2 + args.steps):
            start = time.perf_counter()
            loss = loss_fn(model(x), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        step = statistics.median(times)
        rate = batch / step
        first = first or rate
        n_params = sum(p.numel() for p in model.parameters())
        print(f"| {spec} | {step * 1000:.0f} | {rate:.1f} | {rate / first:.2f} | {n_params:,} |")


if __name__ == "__main__":
    main()
