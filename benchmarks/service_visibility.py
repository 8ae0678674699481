"""Cross-worker visibility of the REST service: how long after an enrollment through one
worker is the face identifiable through another?

Two ``facemetric serve`` processes (two workers, each with its own model and in-memory
index) share one gallery — PostgreSQL (a throwaway cluster, or ``--postgres URL``) and/or
an SQLite file. ``--clients`` threads each take LFW DevTest persons in turn: enroll one
photo through worker A, and the moment the 201 arrives send that photo to worker B's
identify — once, no retry. Reported: how many of those first searches found the person
(the bound is 0 when all do: a search that starts after the enrollment's answer sees it),
the latency of that first search, and the price of the mechanism — each search first reads
the collection's version (one ``SELECT`` on PostgreSQL, one read on SQLite) and applies the
change log since the version its index holds.

    .venv/bin/python benchmarks/service_visibility.py --lfw ../shared/data/lfw --persons 64
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service import start_server, synthetic_thresholds, throwaway_postgres

COLLECTION = "visibility"


def lfw_persons(lfw: Path, n: int) -> list[tuple[str, bytes]]:
    """The first photo of each of the first ``n`` DevTest persons."""
    root = lfw / "lfw-deepfunneled"
    names = [line.split()[0] for line in (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
             if line.strip()]
    return [(name, (root / name / f"{name}_0001.jpg").read_bytes()) for name in names[:n]]


def version_cost(gallery: str, calls: int = 500) -> float:
    """Mean milliseconds of ``store.version(collection)``, the read before every search."""
    from facemetric.service.settings import open_gallery

    with contextlib.closing(open_gallery(gallery)) as store:
        store.version(COLLECTION)
        start = time.perf_counter()
        for _ in range(calls):
            store.version(COLLECTION)
        return (time.perf_counter() - start) / calls * 1000


def run(gallery: str, model: str, thresholds: Path, keys: Path, key: str,
        persons: list[tuple[str, bytes]], clients: int, log: Path) -> dict[str, Any]:
    import httpx

    servers = [start_server(model, thresholds, gallery, keys, False, 1, log) for _ in range(2)]
    (_, a), (_, b) = servers
    headers = {"X-API-Key": key}
    try:
        r = httpx.post(f"{a}/v1/collections", json={"name": COLLECTION}, headers=headers,
                       timeout=60)
        r.raise_for_status()
        httpx.post(f"{b}/v1/collections/{COLLECTION}/identify", headers=headers, timeout=120,
                   files={"image": persons[0][1]}).raise_for_status()  # B's index exists
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        lock = threading.Lock()
        todo = iter(persons)

        def client() -> None:
            with httpx.Client(timeout=120, headers=headers) as http:
                while True:
                    with lock:
                        job = next(todo, None)
                    if job is None:
                        return
                    name, photo = job
                    r = http.post(f"{a}/v1/collections/{COLLECTION}/persons/{name}/faces",
                                  files={"images": photo}, data={"policy": "largest"})
                    if r.status_code != 201:
                        with lock:
                            errors.append(f"enroll {name}: {r.status_code} {r.text[:200]}")
                        continue
                    acked = time.perf_counter()
                    s = http.post(f"{b}/v1/collections/{COLLECTION}/identify",
                                  files={"image": photo})
                    answered = time.perf_counter()
                    faces = s.json().get("faces", []) if s.status_code == 200 else []
                    with lock:
                        results.append({"person": name, "found": bool(faces) and
                                        faces[0]["best"] == name,
                                        "first_search_ms": (answered - acked) * 1000})

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    ms = np.asarray([r["first_search_ms"] for r in results])
    return {"enrolled": len(results), "errors": errors,
            "found_at_first_search": sum(r["found"] for r in results),
            "missed": [r["person"] for r in results if not r["found"]],
            "first_search_p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "first_search_p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "version_read_ms": version_cost(gallery)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lfw", type=Path, required=True)
    ap.add_argument("--model", default="dlib")
    ap.add_argument("--persons", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--backends", default="postgresql,sqlite")
    ap.add_argument("--postgres", help="URL of an existing empty database")
    ap.add_argument("--out", type=Path, default=Path("runs/service_visibility.json"))
    args = ap.parse_args()
    persons = lfw_persons(args.lfw, args.persons)
    out: dict[str, Any] = {"persons": len(persons), "clients": args.clients,
                           "load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp_dir, contextlib.ExitStack() as stack:
        tmp = Path(tmp_dir)
        thresholds, _ = synthetic_thresholds(args.model, tmp / "thresholds.json")
        from facemetric.service.keys import KeyStore

        keys = tmp / "keys.db"
        key = KeyStore(keys).create("admin", name="visibility")[1]
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if backend == "postgresql":
                gallery = args.postgres or stack.enter_context(throwaway_postgres())
            elif backend == "sqlite":
                gallery = str(tmp / "gallery.db")
            else:
                raise SystemExit(f"unknown backend {backend!r}: sqlite or postgresql")
            res = run(gallery, args.model, thresholds, keys, key, persons, args.clients,
                      tmp / "server.log")
            out[backend] = res
            print(f"{backend:<10} found at the first search through the other worker: "
                  f"{res['found_at_first_search']}/{res['enrolled']} (errors "
                  f"{len(res['errors'])}); that search p50 {res['first_search_p50_ms']:.0f} ms"
                  f", p99 {res['first_search_p99_ms']:.0f} ms; version read before each "
                  f"search {res['version_read_ms']:.3f} ms", flush=True)
    out["load_average_after"] = os.getloadavg()
    print(f"# {args.clients} clients, load average before {out['load_average_before'][0]:.1f}"
          f", after {out['load_average_after'][0]:.1f}, {os.cpu_count()} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"written {args.out}")
    if any(out[b]["errors"] or out[b]["missed"] for b in out if isinstance(out[b], dict)):
        raise SystemExit("some enrollments failed or were not found at the first search")


if __name__ == "__main__":
    main()
