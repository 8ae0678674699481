"""Embedding throughput: ONNX Runtime against torch, on faces that are already aligned.

    .venv/bin/python benchmarks/inference.py [--aligned DIR] [--threads 2] [--seconds 3]

For each backbone — MobileFaceNet at 64 px with D=256 (the ``make demo`` model's shape)
and IResNet-50 at 112 px with D=512 — the same randomly initialised weights run as a
:class:`~facemetric.inference.TorchEncoder` (``torch.set_num_threads(threads)``,
channels-last) and as an :class:`~facemetric.inference.onnx.OnnxEncoder` exported from it
(onnxruntime CPU, ``intra_op_num_threads=threads``). Both are timed through
``embed_faces`` — resizing from 112 px, normalisation, the network and the final L2
normalisation — at batch 1 and batch 64, flip test off (it doubles either engine's time).
img/s is the median over repeated calls (at least ``--repeats`` calls and ``--seconds``
seconds each, after one warm-up call). Speed does not depend on the pixel values: without
``--aligned`` the faces are random 112×112 images.

Run it on an idle machine: the script prints the load average first, and a second busy
process on a 2-core machine halves these numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODELS = {
    # label: (registered name, embedding size, input size, options)
    "mobilefacenet-64": ("mobilefacenet", 256, 64, {"input_size": 64}),
    "iresnet50-112": ("iresnet50", 512, 112, {}),
}


def machine_state() -> str:
    load1, load5, load15 = os.getloadavg()
    cores = os.cpu_count() or 1
    idle = load1 < 0.5
    verdict = "idle" if idle else f"BUSY ({load1:.2f} runnable on {cores} cores): numbers are low"
    return (f"load average {load1:.2f} / {load5:.2f} / {load15:.2f} (1 / 5 / 15 min) on "
            f"{cores} cores: {verdict}")


def load_faces(aligned: Path | None, count: int) -> np.ndarray:
    if aligned is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, 112, 112, 3), dtype=np.uint8)
    from facemetric.data.images import load_image

    files = sorted(p for p in aligned.rglob("*") if p.suffix.lower() in {".png", ".jpg"})
    if not files:
        raise SystemExit(f"no .png/.jpg images under {aligned}")
    faces = [load_image(files[i % len(files)]) for i in range(count)]
    if len({f.shape for f in faces}) != 1:
        raise SystemExit(f"the images under {aligned} differ in size: align them first")
    return np.stack(faces)


def rate(encoder, faces: np.ndarray, batch: int, seconds: float, repeats: int) -> float:
    """Median img/s of ``embed_faces`` on ``batch`` faces per call."""
    chunk = faces[:batch]
    encoder.embed_faces(chunk, batch_size=batch)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        encoder.embed_faces(chunk, batch_size=batch)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aligned", type=Path, default=None,
                    help="folder of aligned 112×112 faces (default: random images)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="least time per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="least calls per measurement")
    args = ap.parse_args()

    from facemetric.inference import ModelContract, TorchEncoder, sha256_of_tensors
    from facemetric.inference.onnx import OnnxEncoder, export_onnx
    from facemetric.models import build_model

    print(machine_state())
    torch.set_num_threads(args.threads)
    faces = load_faces(args.aligned, max(args.batches))
    print(f"torch {torch.__version__}, {args.threads} threads each; faces "
          f"{'from ' + str(args.aligned) if args.aligned else 'random'}, flip test off\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            name, dim, size, options = MODELS[label]
            torch.manual_seed(0)
            model = build_model(name, dim, **options).eval()
            contract = ModelContract(
                backbone=name, input_size=size, template="arcface112", embedding_size=dim,
                weights_sha256=sha256_of_tensors(model.state_dict()), flip_test=False,
            )
            torch_enc = TorchEncoder(model, contract)
            t0 = time.perf_counter()
            path = export_onnx(torch_enc, Path(tmp) / f"{label}.onnx")
            export_s = time.perf_counter() - t0
            onnx_enc = OnnxEncoder(path, threads=args.threads)
            for batch in args.batches:
                r_torch = rate(torch_enc, faces, batch, args.seconds, args.repeats)
                r_onnx = rate(onnx_enc, faces, batch, args.seconds, args.repeats)
                rows.append((label, size, dim, batch, r_torch, r_onnx))
                print(f"  {label} batch {batch}: torch {r_torch:.1f} img/s, "
                      f"onnx {r_onnx:.1f} img/s (export {export_s:.1f} s)", flush=True)

    print("\n| model | input | D | batch | torch img/s | ONNX Runtime img/s | ONNX / torch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, size, dim, batch, r_torch, r_onnx in rows:
        print(f"| {label} | {size} | {dim} | {batch} | {r_torch:.1f} | {r_onnx:.1f} | "
              f"{r_onnx / r_torch:.2f}× |")
    print(f"\nafter the run: {machine_state()}")


if __name__ == "__main__":
    main()
