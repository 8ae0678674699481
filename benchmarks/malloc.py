"""The training loop with and without ``retain_freed_memory`` (glibc mmap/trim thresholds).

    .venv/bin/python benchmarks/malloc.py --config configs/npair_mobilefacenet_lfw.toml \\
        --steps 40 --repeats 2

Each measurement is a fresh process (the setting is process-wide and cannot be undone):
``facemetric.training.train`` on the given config for ``--steps`` steps, ``off`` with the
call replaced by a no-op, ``on`` as ``train`` runs it; the two alternate ``--repeats``
times. Reported per process: img/s from the loop's own log after its first row, minor page
faults and user/system CPU seconds of the whole process (``getrusage``). Run it on an idle
machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import csv, json, resource, sys
from pathlib import Path
import facemetric.training.loop as loop
from facemetric.training import load_config, train

config_path, out, steps, mode = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "off":
    loop.retain_freed_memory = lambda: False
cfg = load_config(config_path)
cfg.output_dir = out
cfg.data.verify = False
cfg.train.max_steps, cfg.train.log_every, cfg.train.checkpoint_every = steps, 5, 10**9
train(cfg, progress=False)
rows = list(csv.DictReader((out / "log.csv").open(newline="")))
first, last = rows[0], rows[-1]
images = (int(last["step"]) - int(first["step"])) * cfg.batch.effective_size
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"img_s": images / (float(last["wall_s"]) - float(first["wall_s"])),
                  "minflt": usage.ru_minflt, "user_s": usage.ru_utime,
                  "sys_s": usage.ru_stime}))
"""


def run(config: Path, steps: int, mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(config), str(Path(tmp) / "run"), str(steps), mode],
            capture_output=True, text=True, check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"{'mode':5} {'img/s':>7} {'minor faults':>13} {'user s':>7} {'sys s':>6}")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            r = run(args.config, args.steps, mode)
            rates[mode].append(r["img_s"])
            print(f"{mode:5} {r['img_s']:>7.1f} {r['minflt']:>13,} {r['user_s']:>7.1f} "
                  f"{r['sys_s']:>6.1f}", flush=True)
    on, off = sum(rates["on"]) / len(rates["on"]), sum(rates["off"]) / len(rates["off"])
    print(f"on / off: {on / off:.2f}× img/s (means of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
