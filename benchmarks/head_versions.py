"""Forward + backward time of the classifier heads on CPU for one source tree, to compare
commits (run it alternately on each tree, on an idle machine):

    .venv/bin/python benchmarks/head_versions.py /tmp/old_tree/src
    .venv/bin/python benchmarks/head_versions.py src

Cases: ArcFace over 10,000 and 430 classes (D 128, batch 64) and Partial FC 0.3 of 85,742
classes (D 512, batch 128; dense gradient). Prints one JSON line: the median milliseconds of
each case after 3 warm-up steps, 2 torch threads.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable


def main(src: str) -> None:
    sys.path.insert(0, src)
    import torch

    from facemetric.heads import PartialFC
    from facemetric.losses.classifier import ArcFaceLoss
    from facemetric.losses.margins import ArcMargin

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cases: list[tuple[str, Callable[[], torch.nn.Module], int, int, int]] = [
        ("arcface_10k", lambda: ArcFaceLoss(10_000, 128, scale=64.0, margin=0.5), 64, 128, 40),
        ("arcface_430", lambda: ArcFaceLoss(430, 128, scale=64.0, margin=0.5), 64, 128, 200),
        ("pfc_85k_0.3", lambda: PartialFC(85_742, 512, ArcMargin(0.5), 64.0, 0.3), 128, 512, 10),
    ]
    out = {}
    for name, make, batch, dim, reps in cases:
        head = make()
        x = torch.randn(batch, dim)
        y = torch.randint(0, head.num_classes, (batch,))
        times = []
        for i in range(reps + 3):
            xx = x.clone().requires_grad_()
            start = time.perf_counter()
            head(xx, y).backward()
            elapsed = time.perf_counter() - start
            head.weight.grad = None
            if i >= 3:
                times.append(elapsed)
        out[name] = round(statistics.median(times) * 1e3, 2)
    print(json.dumps({"src": src, "median_ms": out}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: head_versions.py SRC_DIR (the tree's src/ folder)")
    main(sys.argv[1])
