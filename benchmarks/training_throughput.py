"""Training throughput: the whole loop against the bare model + loss + optimiser step.

    .venv/bin/python benchmarks/training_throughput.py --aligned cache/lfw112 \\
        --people ../shared/data/lfw/peopleDevTrain.txt

The ``make demo`` configuration (``configs/demo_lfw.toml``: MobileFaceNet 64×64,
ArcFace over the DevTrain identities, batch 128, SGD, clipping), in one process each:

- ``loop``: ``facemetric.training.train`` for ``--steps`` steps — JPEG decoding and
  augmentation in the DataLoader worker(s), loss, clipping, step, logging; img/s from the
  loop's own log over the steps after the first logging window (setup excluded);
- ``bare``: the same model, loss and optimiser on one in-memory batch, ``--steps`` steps
  (forward, backward, clipping, step), median step time after two warm-up steps.

Each runs with ``channels_last`` on and off (``--layouts``), so the NHWC speed-up is
measured too. Run it on an idle machine: a second busy process halves these numbers.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _config(aligned: Path, people: Path, out: Path, steps: int, channels_last: bool,
            workers: int) -> Any:
    from facemetric.experiments.lfw_demo import load_demo_config
    from facemetric.training import config_from_dict

    raw = load_demo_config()
    raw["output_dir"] = str(out)
    raw["data"].update(root=str(aligned), people_file=str(people), verify=False,
                       num_workers=workers)
    raw["train"].update(max_steps=steps, log_every=5, checkpoint_every=10**9,
                        channels_last=channels_last)
    return config_from_dict(raw)


def loop_rate(config: Any) -> float:
    """img/s of the training loop over its log rows after the first one."""
    from facemetric.training import train

    train(config, progress=False)
    with (Path(config.output_dir) / "log.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    first, last = rows[0], rows[-1]
    steps = int(last["step"]) - int(first["step"])
    seconds = float(last["wall_s"]) - float(first["wall_s"])
    return steps * config.batch.size / seconds


def bare_rate(config: Any, num_classes: int, steps: int) -> float:
    """img/s of model + loss + clipping + step on one in-memory batch (median step)."""
    import torch

    from facemetric.training.builders import build_loss, build_model, build_optimizer

    torch.manual_seed(0)
    layout = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = build_model(config.model).to(memory_format=layout)
    loss = build_loss(config.loss, num_classes, config.model.embedding_size)
    optimizer = build_optimizer(config.optimizer, [model, loss])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    size, batch = config.data.image_size, config.batch.size
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, num_classes, (batch,))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        value = loss(model(x).float(), y)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", type=Path, required=True, help="aligned LFW (lfw112/)")
    parser.add_argument("--people", type=Path, required=True, help="peopleDevTrain.txt")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (loop)")
    parser.add_argument("--layouts", nargs="+", choices=("nhwc", "nchw"),
                        default=["nhwc", "nchw"])
    args = parser.parse_args(argv)
    from facemetric.data.folders import IdentityFolder

    num_classes = IdentityFolder(args.aligned, people_file=args.people).num_classes
    print(f"{'layout':8} {'loop img/s':>11} {'bare img/s':>11} {'loop/bare':>10}")
    for layout in args.layouts:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _config(args.aligned, args.people, Path(tmp) / "run", args.steps,
                          layout == "nhwc", args.workers)
            loop = loop_rate(cfg)
            bare = bare_rate(cfg, num_classes, min(args.steps, 12))
        print(f"{layout:8} {loop:>11.1f} {bare:>11.1f} {loop / bare:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
