"""Load test of the REST service on loopback: requests/s and p50/p99 latency of
``POST /v1/verify`` and ``POST /v1/collections/{c}/identify`` with 32 concurrent clients,
against galleries of 1k and 100k templates (synthetic unit templates inserted through the
store), with micro-batching off and on; the share of server time spent in the model
(detection + embedding, from the ``Server-Timing`` header) versus the rest of the
pipeline (decoding, alignment), the index search and the web layer (HTTP parsing, auth,
JSON), as shares of the time a request is being worked on (not waiting for its turn).

Every run starts a real ``facemetric serve`` process (SQLite gallery, one worker unless
``--workers``) and drives it with ``httpx.AsyncClient`` from this process — on the same
machine, so the client's CPU counts against the server's: read the numbers as a lower
bound on a dedicated server. Requests are bounded (``--requests`` per cell); the run fails
if any request fails.

    .venv/bin/python benchmarks/service.py --lfw ../shared/data/lfw --quick   # ~2 min
    .venv/bin/python benchmarks/service.py --lfw ../shared/data/lfw           # full

The model defaults to ``dlib`` (a real 128-d ResNet, no download) with a synthetic
threshold table (the speed does not depend on where the threshold lies).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLIENTS = 32
COLLECTION = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="PNG")
    return buf.getvalue()


def fill_gallery(path: Path, contract, templates: int, seed: int = 0) -> None:
    """``templates`` random unit templates, 4 per synthetic person, through the store."""
    from facemetric.gallery import NewFace, SQLiteGallery

    rng = np.random.default_rng(seed)
    crop = _tiny_png()
    points = ((2.0, 3.0), (6.0, 3.0), (4.0, 5.0), (3.0, 6.0), (5.0, 6.0))
    with SQLiteGallery(path, synchronous="NORMAL") as store:
        store.create_collection(COLLECTION, contract)
        for p in range(0, templates, 4):
            n = min(4, templates - p)
            vecs = rng.standard_normal((n, contract.embedding_size)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            faces = [NewFace(template=v, crop=crop, landmarks=points, landmark_scheme="dlib5",
                             box=(0, 0, 8, 8),
                             source_sha256=hashlib.sha256(f"{p + i}".encode()).hexdigest(),
                             quality=1.0) for i, v in enumerate(vecs)]
            store.add_faces(COLLECTION, f"synthetic-{p // 4:06d}", faces, contract=contract)


def synthetic_thresholds(model: str, out: Path) -> tuple[Path, object]:
    from facemetric.inference import ThresholdTable, load_model
    from facemetric.inference.calibration import CalibrationEntry

    contract = load_model(model).contract
    entries = (CalibrationEntry(1e-3, 0.9, 0, 1_000_000), CalibrationEntry(1e-2, 0.8, 0, 1_000_000))
    table = ThresholdTable(contract.fingerprint(), entries, "synthetic (benchmark)", 1_000_000, 0)
    return table.save(out), contract


def start_server(model: str, thresholds: Path, gallery: Path, micro_batch: bool, workers: int,
                 log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "facemetric", "serve", "--model", model, "--thresholds",
           str(thresholds), "--gallery", str(gallery), "--port", str(port), "--workers",
           str(workers), "--micro-batch" if micro_batch else "--no-micro-batch"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start in 180 s; see {log}")


def _timings(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


async def load(url: str, key: str, requests: list[tuple[str, dict]], clients: int) -> dict:
    """Send ``requests`` with ``clients`` concurrent connections; latency per request."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies: list[float] = []
    server: list[dict[str, float]] = []
    errors: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                path, files = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:
                r = await client.post(path, files=files, headers={"X-API-Key": key})
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            server.append(_timings(r.headers.get("server-timing", "")))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000

    def mean(name: str) -> float:
        return float(np.mean([s.get(name, 0.0) for s in server])) if server else 0.0

    total, admit, queue_ms = mean("total"), mean("admit"), mean("queue")
    active = max(1e-9, total - admit - queue_ms)  # the time the request was being worked on
    model = (mean("detect") + mean("embed")) / active
    search = mean("search") / active
    web = max(0.0, total - admit - mean("engine")) / active
    return {
        "requests": len(requests), "errors": len(errors), "error_samples": errors[:3],
        "wall_s": wall, "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "server_ms_mean": total, "waiting_share_of_total": (admit + queue_ms) / max(total, 1e-9),
        "model_share": model, "search_share": search, "web_share": web,
        "pipeline_other_share": max(0.0, 1.0 - model - search - web),
    }


def lfw_photos(lfw: Path, n: int) -> list[bytes]:
    root = lfw / "lfw-deepfunneled"
    names = [line.split()[0] for line in (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
             if line.strip()]
    out = []
    for name in names:
        out.extend(p.read_bytes() for p in sorted((root / name).glob("*.jpg"))[:2])
        if len(out) >= n:
            break
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True, help="LFW root (probe photos)")
    ap.add_argument("--model", default="dlib", help="run folder, .onnx or 'dlib'")
    ap.add_argument("--quick", action="store_true",
                    help="1k templates only, fewer requests (a shared machine)")
    ap.add_argument("--requests", type=int, default=None, help="requests per cell")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--sizes", help="comma-separated template counts (default 1000,100000; "
                                    "--quick: 1000)")
    ap.add_argument("--micro-batch", choices=("both", "off", "on"), default="both")
    ap.add_argument("--out", type=Path, default=Path("runs/service_benchmark.json"))
    args = ap.parse_args()
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [1_000] if args.quick else [1_000, 100_000])
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.micro_batch]
    per_cell = args.requests or (96 if args.quick else 1000)
    photos = lfw_photos(args.lfw, 64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        thresholds, contract = synthetic_thresholds(args.model, tmp / "thresholds.json")
        for size in sizes:
            gallery = tmp / f"g{size}.db"
            t0 = time.perf_counter()
            fill_gallery(gallery, contract, size)
            print(f"{size:,} synthetic templates inserted in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            from facemetric.service.keys import KeyStore

            key = KeyStore(tmp / f"g{size}.keys.db").create("read", name="benchmark")[1]
            for micro in modes:
                proc, url = start_server(args.model, thresholds, gallery, micro, args.workers,
                                         tmp / "server.log")
                try:
                    for endpoint in ("verify", "identify"):
                        if endpoint == "verify":
                            reqs = [("/v1/verify", {"a": photos[i % len(photos)],
                                                    "b": photos[(i + 7) % len(photos)]})
                                    for i in range(per_cell)]
                        else:
                            reqs = [(f"/v1/collections/{COLLECTION}/identify",
                                     {"image": photos[i % len(photos)]})
                                    for i in range(per_cell)]
                        asyncio.run(load(url, key, reqs[:8], 4))  # warm up (index, caches)
                        res = asyncio.run(load(url, key, reqs, args.clients))
                        res.update(templates=size, endpoint=endpoint, micro_batch=micro,
                                   clients=args.clients, workers=args.workers)
                        rows.append(res)
                        print(f"{size:>7,} {endpoint:<8} micro-batch {'on ' if micro else 'off'}"
                              f" {res['rps']:6.1f} req/s  p50 {res['p50_ms']:7.1f} ms  p99 "
                              f"{res['p99_ms']:7.1f} ms  errors {res['errors']} | busy time: "
                              f"model {res['model_share']:.0%} search "
                              f"{res['search_share']:.0%} decode/align "
                              f"{res['pipeline_other_share']:.0%} web {res['web_share']:.0%}"
                              f" | waiting {res['waiting_share_of_total']:.0%} of server time",
                              flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(),
                                    "load_average": os.getloadavg(), "quick": args.quick},
                                   indent=2))
    print(f"written {args.out}")
    failed = sum(r["errors"] for r in rows)
    if failed:
        raise SystemExit(f"{failed} requests failed: {[r['error_samples'] for r in rows]}")


if __name__ == "__main__":
    main()
