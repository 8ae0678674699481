"""The large-scale configs on one GPU: training-step throughput and memory, bare and in the loop.

    python3 benchmarks/gpu_scale.py step --config configs/ms1mv2_iresnet50_pfc.toml \\
        --classes 85742 --amp bf16 fp16 off
    python3 benchmarks/gpu_scale.py step --config configs/glint360k_iresnet100_pfc.toml \\
        --classes 360232
    python3 benchmarks/gpu_scale.py loop --config configs/ms1mv2_iresnet50_pfc.toml \\
        --classes 85742 --faces DIR --work /tmp/gpu_scale --steps 300

``step`` times what one process of a ``torchrun`` run computes per step, built from the config
file by the training loop's own builders (``build_model``, ``build_loss``,
``build_partial_fc``, ``build_optimizer``) at ``--classes`` identities: the backbone under
``torch.autocast`` in channels-last (``--amp``: the config's dtype, ``bf16``, ``fp16`` with a
``GradScaler``, or ``off`` for float32), the margin softmax in float32 through Partial FC at
the config's rate (``--rate 1`` for the full softmax), backward, gradient clipping and the
SGD step (row-sparse for the centres when the config says ``sparse_update``). The batch is
random images and labels already on the GPU, so no data loading is timed. On one GPU the
process holds every centre and samples ``rate · C`` of them for a batch of ``[batch] size``;
on 8 GPUs each holds ``C / 8`` and samples from its shard for the gathered global batch —
logits of the same size, ``B · rate · C`` elements per GPU. Each case is timed with CUDA
events over ``--steps`` steps after ``--warmup``; reported: the median step, img/s, the
memory once model, centres and optimiser exist (``params``; the momentum appears at the first
step) and the peak over the timed steps (``torch.cuda.max_memory_allocated``).

``loop`` runs the real ``facemetric.training.train`` on the GPU for ``--steps`` steps: an
insightface ``.rec`` of ``--classes × --per-class`` records is written under ``--work`` from
the JPEG files found under ``--faces`` (reused in turn: the pixels do not matter for speed,
the decoding of real face JPEGs does), the config's data root, length, logging and workers
are replaced, and the img/s is read from the run's ``log.csv`` (median over the windows after
the first, which holds the start-up). This includes the DataLoader workers' decoding and
augmentation, the loop's finiteness checks (three device-to-host reads per step) and EMA if
configured.

Needs a CUDA GPU (``--device cpu`` runs the same code on the CPU, for a check at small
sizes); prints one JSON object per case and a table at the end; ``--out`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (--device cpu to check it)")
    return torch.device(name)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _now_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _round(gib: float | None) -> float | None:
    return None if gib is None else round(gib, 3)


def step_case(config_path: Path, classes: int, amp: str, rate: float | None, batch: int | None,
              steps: int, warmup: int, device: Any, cudnn_benchmark: bool,
              profile_dir: Path | None = None, layout: str = "nhwc") -> dict[str, Any]:
    """One bare-step case (see the module docstring)."""
    import torch

    from facemetric.training.builders import (
        build_loss,
        build_model,
        build_optimizer,
        build_partial_fc,
    )
    from facemetric.training.config import load_config
    from facemetric.training.row_sparse_sgd import clip_grad_norm

    torch.backends.cudnn.benchmark = cudnn_benchmark
    config = load_config(config_path)
    dtype_name = config.train.amp_dtype if amp == "config" else amp
    use_amp = dtype_name != "off" and (config.train.amp or amp != "config")
    amp_dtype = torch.float16 if dtype_name == "fp16" else torch.bfloat16
    sample_rate = config.partial_fc.sample_rate if rate is None else rate
    b = batch or config.batch.size
    if b is None:
        raise SystemExit(f"{config_path}: [batch] size is not set; pass --batch")
    side = config.data.image_size
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    memory_format = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    model = build_model(config.model).to(device).to(memory_format=memory_format)
    loss: torch.nn.Module = build_loss(config.loss, classes, config.model.embedding_size)
    sparse = False
    if sample_rate is not None and sample_rate < 1.0:
        sparse = bool(config.partial_fc.sparse_update)
        loss = build_partial_fc(loss, sample_rate, sparse_grad=sparse)
    loss.to(device)
    optimizer = build_optimizer(config.optimizer, [model, loss])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    params_gib = _now_gib(device)
    images = [torch.randn(b, 3, side, side, device=device).contiguous(
        memory_format=memory_format) for _ in range(2)]
    labels = [torch.randint(0, classes, (b,), device=device) for _ in range(2)]

    def one(i: int) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            embeddings = model(images[i % 2])
        value = loss(embeddings.float(), labels[i % 2])
        scaler.scale(value).backward()
        if config.train.grad_clip is not None:
            scaler.unscale_(optimizer)
            clip_grad_norm(params, config.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return value

    model.train()
    loss.train()
    for i in range(warmup):
        one(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        values = []
        for i in range(steps):
            starts[i].record()
            values.append(one(i).detach())
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        times, values = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            values.append(one(i).detach())
            times.append((time.perf_counter() - t0) * 1e3)
    if profile_dir is not None:
        _profile(one, steps, device, profile_dir / (
            f"profile_{config.model.name}_{dtype_name}_"
            f"{'full' if not 0 < (sample_rate or 1) < 1 else sample_rate}_b{b}.txt"))
    last = float(values[-1])
    median = statistics.median(times)
    return {
        "mode": "step", "config": config_path.name, "model": config.model.name,
        "loss": config.loss.name, "classes": classes,
        "partial_fc": sample_rate if sample_rate is not None and sample_rate < 1 else None,
        "sparse_update": sparse, "batch": b, "amp": dtype_name if use_amp else "off",
        "cudnn_benchmark": cudnn_benchmark, "layout": layout, "steps": steps,
        "median_ms": round(median, 3),
        "min_ms": round(min(times), 3), "img_s": round(b / median * 1e3, 1),
        "params_gib": _round(params_gib), "peak_gib": _round(_peak_gib(device)),
        "last_loss": last, "finite": bool(torch.isfinite(torch.tensor(last))),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def _profile(one: Any, steps: int, device: Any, path: Path) -> None:
    """``torch.profiler`` tables of ``min(steps, 5)`` more steps: by self device time and by
    self CPU time (a host-device synchronisation shows as CPU time in ``aten::item``,
    ``aten::_local_scalar_dense`` or ``cudaStreamSynchronize``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for i in range(min(steps, 5)):
            one(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    tables = []
    for key in ("self_device_time_total", "self_cpu_time_total"):
        if key == "self_device_time_total" and device.type != "cuda":
            continue
        tables.append(f"sorted by {key}\n" + averages.table(sort_by=key, row_limit=25))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables))


def _write_rec(faces: Path, classes: int, per_class: int, rec: Path) -> tuple[Path, int]:
    from facemetric.data.recordio import write_record_file

    pool = sorted(p for p in faces.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not pool:
        raise SystemExit(f"no .jpg files under {faces}: --faces needs aligned face JPEGs")
    blobs = [p.read_bytes() for p in pool]
    items = ((blobs[i % len(blobs)], i // per_class) for i in range(classes * per_class))
    rec.parent.mkdir(parents=True, exist_ok=True)
    return write_record_file(items, rec)


def loop_case(config_path: Path, classes: int, per_class: int, faces: Path, work: Path,
              steps: int, log_every: int, workers: int | None, amp: str,
              device: Any, cudnn_benchmark: bool = True) -> dict[str, Any]:
    """The training loop on a written ``.rec`` (see the module docstring)."""
    import csv
    import shutil

    import torch

    from facemetric.training import train
    from facemetric.training.config import check_config, load_config

    rec = work / f"c{classes}_k{per_class}" / "train.rec"
    t0 = time.perf_counter()
    if not rec.is_file():
        _write_rec(faces, classes, per_class, rec)
    write_s = time.perf_counter() - t0
    config = load_config(config_path)
    config.data.root = rec
    config.output_dir = work / f"run_{config_path.stem}_{amp}_{int(cudnn_benchmark)}"
    shutil.rmtree(config.output_dir, ignore_errors=True)
    config.train.max_steps = steps
    config.train.log_every = log_every
    config.train.checkpoint_every = steps + 1  # one checkpoint, at the end
    config.train.device = device.type
    config.train.cudnn_benchmark = cudnn_benchmark
    if workers is not None:
        config.data.num_workers = workers
    if amp != "config":
        config.train.amp = amp != "off"
        if amp != "off":
            config.train.amp_dtype = amp
    check_config(config, "gpu_scale loop")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(config, progress=False)
    with open(result.log_csv, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    rates = [float(r[4]) for r in rows[1:]] or [float(r[4]) for r in rows]
    return {
        "mode": "loop", "config": config_path.name, "model": config.model.name,
        "classes": classes, "partial_fc": config.partial_fc.sample_rate,
        "images": classes * per_class, "batch": config.batch.size,
        "amp": config.train.amp_dtype if config.train.amp else "off",
        "workers": config.data.num_workers, "cudnn_benchmark": cudnn_benchmark,
        "steps": result.steps,
        "img_s": round(statistics.median(rates), 1), "windows": [float(r[4]) for r in rows],
        "wall_s": round(result.wall_seconds, 1), "rec_write_s": round(write_s, 1),
        "peak_gib": _round(_peak_gib(device)), "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | model | classes | PFC | batch | amp | cudnn bench | layout | img/s "
             "| median step | params | peak |",
             "|---|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        pfc = r.get("partial_fc", "")
        lines.append(
            f"| {r['mode']} | {r['model']} | {r['classes']:,} | "
            f"{'full' if r['mode'] == 'step' and pfc is None else pfc or ''} | {r['batch']} | "
            f"{r['amp']} | {r.get('cudnn_benchmark', '')} | {r.get('layout', 'nhwc')} | "
            f"{r['img_s']:,.0f} | {r.get('median_ms', '')} | "
            f"{r.get('params_gib', '')} | {r['peak_gib']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("step", "loop"):
        p = sub.add_parser(name)
        p.add_argument("--config", type=Path, required=True)
        p.add_argument("--classes", type=int, required=True, help="identities of the run")
        p.add_argument("--steps", type=int, default=30 if name == "step" else 300)
        p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
        p.add_argument("--out", type=Path, help="append the JSON rows to this file")
    step = sub.choices["step"]
    step.add_argument("--amp", nargs="+", default=["config"],
                      choices=("config", "bf16", "fp16", "off"))
    step.add_argument("--rate", type=float, nargs="+", default=[None],
                      help="Partial FC sample rate(s) in place of the config's; 1 = full softmax")
    step.add_argument("--batch", type=int, nargs="+", default=[None])
    step.add_argument("--warmup", type=int, default=5)
    step.add_argument("--cudnn-benchmark", type=int, nargs="+", default=[1], choices=(0, 1))
    step.add_argument("--layout", nargs="+", default=["nhwc"], choices=("nhwc", "nchw"),
                      help="channels-last (the loop's default) or contiguous NCHW")
    step.add_argument("--profile-dir", type=Path,
                      help="write a torch.profiler table of each case into this folder")
    loop = sub.choices["loop"]
    loop.add_argument("--faces", type=Path, required=True, help="folder of face JPEGs")
    loop.add_argument("--work", type=Path, required=True, help="scratch folder (.rec, run)")
    loop.add_argument("--per-class", type=int, default=2)
    loop.add_argument("--log-every", type=int, default=25)
    loop.add_argument("--workers", type=int)
    loop.add_argument("--amp", default="config", choices=("config", "bf16", "fp16", "off"))
    loop.add_argument("--cudnn-benchmark", type=int, nargs="+", default=[1], choices=(0, 1),
                      help="[train] cudnn_benchmark of each run, in this order")
    args = parser.parse_args()
    device = _device(args.device)
    rows: list[dict[str, Any]] = []
    if args.mode == "step":
        for amp in args.amp:
            for rate in args.rate:
                for batch in args.batch:
                    for bench in args.cudnn_benchmark:
                        for layout in args.layout:
                            rows.append(step_case(args.config, args.classes, amp, rate, batch,
                                                  args.steps, args.warmup, device, bool(bench),
                                                  args.profile_dir, layout))
                            print(json.dumps(rows[-1]), flush=True)
    else:
        for bench in args.cudnn_benchmark:
            rows.append(loop_case(args.config, args.classes, args.per_class, args.faces,
                                  args.work, args.steps, args.log_every, args.workers, args.amp,
                                  device, bool(bench)))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    print(_table(rows), file=sys.stdout)


if __name__ == "__main__":
    main()
