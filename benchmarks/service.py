"""Load test of the REST service on loopback: requests/s and p50/p99 latency of
``POST /v1/verify`` and ``POST /v1/collections/{c}/identify`` with 32 concurrent clients,
against galleries of 1k and 100k templates in SQLite and in PostgreSQL, with
micro-batching off and on; the share of server time spent in the model (detection +
embedding, from the ``Server-Timing`` header) versus the rest of the pipeline (decoding,
alignment), the index search and the web layer (HTTP parsing, auth, JSON), as shares of the
time a request is being worked on (not waiting for its turn).

The galleries hold synthetic random unit templates (4 per synthetic person) inserted
straight into the store with ``GalleryStore.add_faces`` — not enrolled from photos (100k
enrollments would take hours); the probes are real LFW photos, so every identification
runs detection, alignment, the network and an exact search over all templates. Verify
touches no gallery (only the key file), so it is measured once per micro-batching mode, on
the SQLite server. PostgreSQL: ``--postgres URL`` (an existing, empty database), else a
throwaway cluster (``initdb``/``pg_ctl`` in a temporary folder, unix socket only, via
``tests/gallery/pg_cluster.py``; durability off, like the tests).

Every cell starts from a running ``facemetric serve`` (one worker unless ``--workers``),
warms it up (the first identification loads the collection's index), then keeps
``--clients`` requests in flight for ``--seconds`` (or until ``--requests``), from
``httpx.AsyncClient`` in this process — on the same machine, so the client's CPU counts
against the server's: read the numbers as a lower bound on a dedicated server. The run
fails if any request fails.

    .venv/bin/python benchmarks/service.py --lfw ../shared/data/lfw --quick   # ~3 min
    .venv/bin/python benchmarks/service.py --lfw ../shared/data/lfw           # ~10 min

The model defaults to ``dlib`` (a real 128-d ResNet, no download) with a synthetic
threshold table (the speed does not depend on where the threshold lies). Results: a table
on stdout and ``--out`` (JSON, with the machine's CPU count and load averages).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

CLIENTS = 32
ROOT = Path(__file__).resolve().parents[1]

Request = tuple[str, dict[str, bytes]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="PNG")
    return buf.getvalue()


def collection_name(templates: int) -> str:
    return f"bench-{templates}"


def fill_gallery(store: Any, contract: Any, templates: int, seed: int = 0) -> float:
    """``templates`` random unit templates, 4 per synthetic person, into a new collection
    of ``store`` (any :class:`~facemetric.gallery.GalleryStore`); returns the seconds."""
    from facemetric.gallery import NewFace

    start = time.perf_counter()
    name = collection_name(templates)
    rng = np.random.default_rng(seed)
    crop = _tiny_png()
    points = ((2.0, 3.0), (6.0, 3.0), (4.0, 5.0), (3.0, 6.0), (5.0, 6.0))
    store.create_collection(name, contract)
    for p in range(0, templates, 4):
        n = min(4, templates - p)
        vecs = rng.standard_normal((n, contract.embedding_size)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        faces = [NewFace(template=v, crop=crop, landmarks=points, landmark_scheme="dlib5",
                         box=(0, 0, 8, 8), quality=1.0,
                         source_sha256=hashlib.sha256(f"{seed}-{p + i}".encode()).hexdigest())
                 for i, v in enumerate(vecs)]
        store.add_faces(name, f"synthetic-{p // 4:06d}", faces, contract=contract)
    return time.perf_counter() - start


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A URL of a database on a throwaway cluster (tests/gallery/pg_cluster.py)."""
    from urllib.parse import quote

    spec = importlib.util.spec_from_file_location("bench_pg_cluster",
                                                  ROOT / "tests" / "gallery" / "pg_cluster.py")
    assert spec is not None and spec.loader is not None
    pg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pg)
    try:
        cluster = pg.start_cluster()
    except pg.ClusterUnavailableError as err:
        raise SystemExit(f"no PostgreSQL for the benchmark ({err}); pass --postgres URL or "
                         f"--backends sqlite") from err
    try:
        dsn = cluster.create_database("bench")
        db = dict(part.split("=", 1) for part in dsn.split())["dbname"]
        yield (f"postgresql://postgres@/{db}?host={quote(str(cluster.root), safe='')}"
               f"&port={cluster.port}")
    finally:
        cluster.stop()


def open_store(gallery: str) -> Any:
    """The gallery to fill: SQLite without an fsync per transaction (``synchronous=NORMAL``:
    the benchmark does not cut the power), or the PostgreSQL URL's store."""
    from facemetric.gallery import SQLiteGallery
    from facemetric.service.settings import is_postgres_url, open_gallery

    return open_gallery(gallery) if is_postgres_url(gallery) else SQLiteGallery(
        Path(gallery), synchronous="NORMAL")


def synthetic_thresholds(model: str, out: Path) -> tuple[Path, Any]:
    from facemetric.inference import ThresholdTable, load_model
    from facemetric.inference.calibration import CalibrationEntry

    contract = load_model(model).contract
    entries = (CalibrationEntry(1e-3, 0.9, 0, 1_000_000), CalibrationEntry(1e-2, 0.8, 0, 1_000_000))
    table = ThresholdTable(contract.fingerprint(), entries, "synthetic (benchmark)", 1_000_000, 0)
    return table.save(out), contract


def start_server(model: str, thresholds: Path, gallery: str, keys: Path, micro_batch: bool,
                 workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "facemetric", "serve", "--model", model, "--thresholds",
           str(thresholds), "--gallery", gallery, "--keys", str(keys), "--port", str(port),
           "--workers", str(workers), "--micro-batch" if micro_batch else "--no-micro-batch"]
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


async def load(url: str, key: str, make: Callable[[int], Request], clients: int,
               seconds: float, max_requests: int | None = None) -> dict[str, Any]:
    """Keep ``clients`` requests in flight (``make(i)`` builds the i-th) until ``seconds``
    have passed or ``max_requests`` were sent; latency and server timings per request."""
    import httpx

    latencies: list[float] = []
    server: list[dict[str, float]] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < deadline and (max_requests is None or sent < max_requests):
            path, files = make(sent)
            sent += 1
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
        "requests": sent, "errors": len(errors), "error_samples": errors[:3],
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


def identify_requests(collection: str, photos: list[bytes]) -> Callable[[int], Request]:
    """The i-th identification: photo i (cycling)."""
    return lambda i: (f"/v1/collections/{collection}/identify",
                      {"image": photos[i % len(photos)]})


def verify_requests(photos: list[bytes]) -> Callable[[int], Request]:
    """The i-th verification: photos i and i + 7 (cycling)."""
    return lambda i: ("/v1/verify", {"a": photos[i % len(photos)],
                                     "b": photos[(i + 7) % len(photos)]})


HEADER = (f"{'backend':<10} {'templates':>9} {'endpoint':<8} {'micro':<5} {'req/s':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  busy time: model / search / "
          f"decode+align / web   waiting")


def row_text(r: dict[str, Any]) -> str:
    return (f"{r['backend']:<10} {r['templates']:>9} {r['endpoint']:<8} "
            f"{'on' if r['micro_batch'] else 'off':<5} {r['rps']:6.1f} {r['p50_ms']:7.0f} "
            f"{r['p99_ms']:7.0f} {r['errors']:>6}  {r['model_share']:4.0%} / "
            f"{r['search_share']:4.0%} / {r['pipeline_other_share']:4.0%} / "
            f"{r['web_share']:4.0%}   {r['waiting_share_of_total']:4.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True, help="LFW root (probe photos)")
    ap.add_argument("--model", default="dlib", help="run folder, .onnx or 'dlib'")
    ap.add_argument("--quick", action="store_true",
                    help="1k templates only, 8 s per cell (a shared machine)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="load time per cell (default 25; --quick: 8)")
    ap.add_argument("--requests", type=int, default=None, help="at most this many per cell")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--sizes", help="comma-separated template counts (default 1000,100000; "
                                    "--quick: 1000)")
    ap.add_argument("--backends", default="sqlite,postgresql",
                    help="comma-separated: sqlite, postgresql")
    ap.add_argument("--postgres", help="URL of an existing empty database (default: a "
                                       "throwaway cluster)")
    ap.add_argument("--micro-batch", choices=("both", "off", "on"), default="both")
    ap.add_argument("--label", default="", help="said in the JSON, e.g. 'shared machine'")
    ap.add_argument("--out", type=Path, default=Path("runs/service_benchmark.json"))
    args = ap.parse_args()
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [1_000] if args.quick else [1_000, 100_000])
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown or not backends:
        raise SystemExit(f"--backends takes sqlite and/or postgresql, got {args.backends!r}")
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.micro_batch]
    seconds = args.seconds or (8.0 if args.quick else 25.0)
    photos = lfw_photos(args.lfw, 64)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    fills: list[dict[str, Any]] = []
    started = time.perf_counter()
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir, contextlib.ExitStack() as stack:
        tmp = Path(tmp_dir)
        thresholds, contract = synthetic_thresholds(args.model, tmp / "thresholds.json")
        from facemetric.service.keys import KeyStore

        keys = tmp / "bench.keys.db"
        key = KeyStore(keys).create("read", name="benchmark")[1]
        for backend in backends:
            if backend == "sqlite":
                gallery = str(tmp / "gallery.db")
            else:
                gallery = args.postgres or stack.enter_context(throwaway_postgres())
            with contextlib.closing(open_store(gallery)) as store:
                for size in sizes:
                    took = fill_gallery(store, contract, size)
                    fills.append({"backend": backend, "templates": size, "seconds": took})
                    print(f"# {backend}: {size:,} synthetic templates inserted through the "
                          f"store in {took:.1f} s", flush=True)
            for micro in modes:
                proc, url = start_server(args.model, thresholds, gallery, keys, micro,
                                         args.workers, tmp / "server.log")
                try:
                    cells: list[tuple[str, int | str, Callable[[int], Request]]] = [
                        ("identify", size, identify_requests(collection_name(size), photos))
                        for size in sizes]
                    if backend == backends[0]:  # verify touches no gallery: once per mode
                        cells.insert(0, ("verify", "-", verify_requests(photos)))
                    for endpoint, size, make in cells:
                        asyncio.run(load(url, key, make, 4, 600, 8))  # warm-up: index, caches
                        res = asyncio.run(load(url, key, make, args.clients, seconds,
                                               args.requests))
                        res.update(backend=backend if endpoint == "identify" else "-",
                                   templates=size, endpoint=endpoint, micro_batch=micro,
                                   clients=args.clients, workers=args.workers)
                        rows.append(res)
                        print(row_text(res), flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    total_s = time.perf_counter() - started
    print(f"\n{HEADER}\n" + "\n".join(row_text(r) for r in rows))
    print(f"# {args.clients} clients, {args.workers} worker(s), model {args.model}, "
          f"{seconds:g} s per cell; {os.cpu_count()} CPUs; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; {total_s:.0f} s in all"
          + (f"; {args.label}" if args.label else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": rows, "fills": fills, "cpus": os.cpu_count(), "load_average_before":
        load_before, "load_average_after": os.getloadavg(), "quick": args.quick,
        "seconds_per_cell": seconds, "model": args.model, "label": args.label,
        "total_seconds": total_s}, indent=2))
    print(f"written {args.out}")
    failed = sum(r["errors"] for r in rows)
    if failed:
        raise SystemExit(f"{failed} requests failed: {[r['error_samples'] for r in rows]}")


if __name__ == "__main__":
    main()
