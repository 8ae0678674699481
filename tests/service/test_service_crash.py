"""A server killed with SIGKILL in the middle of enrollments: clients see errors only for
the requests in flight, the store stays consistent (every person all or nothing), and the
restarted server serves everything that was acknowledged — and the in-flight requests
are either wholly in or wholly absent. (Its fresh server also shows that there is no
default key.) The same with one of two uvicorn workers killed on a PostgreSQL gallery: the
supervisor restarts it, and the fresh workers serve everything enrolled."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, assert_envelope

from facemetric.gallery import SQLiteGallery
from facemetric.recognizer import Recognizer
from facemetric.service.keys import KeyStore

pytestmark = [pytest.mark.data]

CLIENTS = 3


def test_kill_9_during_enrollments(service_model, tmp_path, lfw_people):
    gallery = tmp_path / "g.db"
    # one worker, micro-batching on (the concurrent enrollments share forward passes)
    srv = Server(service_model, gallery, tmp_path / "server.log",
                 args=["--micro-batch"]).start()
    # a fresh service has no key at all: everything but health is refused
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/v1/health").status_code == 200
        assert_envelope(c.get("/v1/collections"), 401, "missing_key")
        for guess in ("admin", "default", "fmk_000000000000_" + "A" * 43):
            assert_envelope(c.get("/v1/collections", headers={
                "Authorization": f"Bearer {guess}"}), 401, "invalid_key")
    assert "no API key exists" in srv.log_text()
    key = KeyStore(tmp_path / "g.keys.db").create("admin")[1]
    headers = {"X-API-Key": key}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/collections", json={"name": "crash"}, headers=headers).status_code \
            == 201
    jobs: queue.Queue[tuple[str, list[bytes]]] = queue.Queue()
    for name, paths in lfw_people.items():
        jobs.put((name, [p.read_bytes() for p in paths[:3]]))
    done: dict[str, dict] = {}
    failed: dict[str, Exception] = {}
    in_flight: set[str] = set()
    unexpected: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while True:
                try:
                    name, images = jobs.get_nowait()
                except queue.Empty:
                    return
                with lock:
                    in_flight.add(name)
                try:
                    r = c.post(f"/v1/collections/crash/persons/{name}/faces", headers=headers,
                               files=[("images", b) for b in images],
                               data={"policy": "largest"})
                except httpx.TransportError as err:
                    with lock:
                        failed[name] = err
                    return  # the server is gone: this client stops
                finally:
                    with lock:
                        in_flight.discard(name)
                with lock:
                    if r.status_code not in (201, 422):
                        unexpected.append(r.text)
                        return
                    done[name] = r.json() if r.status_code == 201 else r.json()["error"][
                        "details"]

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once some are acknowledged and some in flight
        with lock:
            if len(done) >= 4 and in_flight:
                break
        time.sleep(0.005)
    srv.kill()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not unexpected, unexpected
    assert 4 <= len(done) < len(lfw_people)
    assert len(failed) <= CLIENTS  # only the requests in flight (one per client) failed

    # the store: consistent, and every person complete or absent
    with SQLiteGallery(gallery) as g:
        g.check()
        stored = {p.name: p.face_count for p in g.list_persons("crash", limit=1000)[0]}
    for name, answer in done.items():
        assert stored.get(name, 0) == answer["accepted"], name
    local = Recognizer(service_model, tmp_path / "local.db", collection="crash")
    for name in failed:
        complete = local.enroll(name, [p.read_bytes() for p in lfw_people[name][:3]],
                                policy="largest").accepted
        assert stored.get(name, 0) in (0, complete), (name, stored.get(name), complete)
    assert set(stored) <= set(done) | set(failed)  # nothing that was never sent
    local.close()

    # the restarted server — now two worker processes sharing the gallery — serves
    # everything in the store, whichever worker answers
    srv.args = ["--workers", "2"]
    srv.start()
    try:
        workers = srv.worker_pids()  # the first answered; wait for the other one too
        assert len(workers) == 2 and _answering_workers(srv, workers) == workers, workers
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            col = c.get("/v1/collections/crash", headers=headers).json()
            assert col["face_count"] == sum(stored.values())
            for name, count in stored.items():
                person = c.get(f"/v1/collections/crash/persons/{name}", headers=headers).json()
                assert person["face_count"] == count
                answer = done.get(name)
                first = next(i for i, o in enumerate(answer["images"]) if o["accepted"]) \
                    if answer else 0
                photo = lfw_people[name][first].read_bytes()
                r = c.post("/v1/collections/crash/identify", files={"image": photo},
                           headers=headers).json()
                assert r["faces"][0]["best"] == name
            # the failed requests can simply be sent again, and every worker then finds them
            for name in failed:
                r = c.post(f"/v1/collections/crash/persons/{name}/faces", headers=headers,
                           files=[("images", p.read_bytes()) for p in lfw_people[name][:3]],
                           data={"policy": "largest"})
                assert r.status_code == (422 if stored.get(name) else 201), r.text
        for name in failed:
            photo = lfw_people[name][0].read_bytes()
            answers = {httpx.post(f"{srv.url}/v1/collections/crash/identify", timeout=30,
                                  files={"image": photo}, headers={**headers, "Connection":
                                  "close"}).json()["faces"][0]["best"] for _ in range(6)}
            assert answers == {name}
    finally:
        srv.stop()


def _connections(pid: int, port: int) -> int:
    """How many established TCP connections to ``port`` the process ``pid`` holds (its
    socket inodes matched against /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "01" and int(cols[1].split(":")[1], 16) == port and cols[9] in inodes:
            count += 1
    return count


def _answering_workers(srv: Server, want: set[int], timeout_s: float = 120) -> set[int]:
    """The worker pids seen answering /v1/health on new connections, until ``want`` all
    have or ``timeout_s`` passed (the kernel hands each connection to one worker)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while not want <= seen and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            seen.add(httpx.get(f"{srv.url}/v1/health", timeout=30,
                               headers={"Connection": "close"}).json()["worker"])
        time.sleep(0.02)
    return seen


def _replaced(srv: Server, gone: int, deadline_s: float = 120) -> set[int]:
    """The workers once uvicorn has replaced ``gone`` and the new one answers."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        pids = srv.worker_pids()
        if len(pids) == 2 and gone not in pids and _answering_workers(srv, pids, 5) >= pids:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"worker {gone} was not replaced; log:\n{srv.log_text()[-3000:]}")


@pytest.mark.slow
def test_kill_9_of_one_worker_on_postgresql(pg_url, service_model, tmp_path, lfw_people):
    """Two uvicorn workers on a PostgreSQL gallery; one is SIGKILLed while it holds an
    enrollment. Only requests in flight at that moment fail — the clients go on, on new
    connections, and every later request succeeds; the store stays consistent; uvicorn
    restarts the worker, and once *both* workers are fresh processes (the other one is
    killed too, idle) they serve everything that was enrolled."""
    keys = tmp_path / "service.keys.db"
    srv = Server(service_model, pg_url, tmp_path / "server.log",
                 args=["--workers", "2", "--keys", str(keys)]).start()
    try:
        _kill_one_worker(srv, KeyStore(keys).create("admin")[1], pg_url, service_model,
                         tmp_path, lfw_people)
    finally:
        srv.stop()


def _kill_one_worker(srv: Server, key: str, pg_url: str, model: Path, tmp_path: Path,
                     people: dict[str, list[Path]]) -> None:
    headers = {"X-API-Key": key, "Connection": "close"}  # one connection per request
    first = srv.worker_pids()
    assert len(first) == 2 and _answering_workers(srv, first) == first, first
    assert httpx.post(f"{srv.url}/v1/collections", json={"name": "crash"}, headers=headers,
                      timeout=30).status_code == 201
    jobs: queue.Queue[str] = queue.Queue()
    for name in people:
        jobs.put(name)
    done: dict[str, dict] = {}
    failed: set[str] = set()
    in_flight: set[str] = set()
    unexpected: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                name = jobs.get_nowait()
            except queue.Empty:
                return
            with lock:  # registered before it is sent (the kill snapshots under the lock)
                in_flight.add(name)
            try:
                r = httpx.post(f"{srv.url}/v1/collections/crash/persons/{name}/faces",
                               headers=headers, data={"policy": "largest"}, timeout=60,
                               files=[("images", p.read_bytes()) for p in people[name][:3]])
            except httpx.TransportError:
                with lock:
                    failed.add(name)
                continue  # this client goes on with the next person
            finally:
                with lock:
                    in_flight.discard(name)
            with lock:
                if r.status_code == 201:
                    done[name] = r.json()
                else:
                    unexpected.append(f"{name}: {r.status_code} {r.text[:300]}")

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    victim, snapshot = None, set()
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        with lock:
            busy = [pid for pid in first if _connections(pid, srv.port)]
            if len(done) >= 3 and in_flight and busy:
                victim, snapshot = busy[0], set(in_flight)
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.002)
    assert victim is not None, "no moment with an enrollment in flight on a worker"
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not unexpected, unexpected
    assert failed <= snapshot, (failed, snapshot)  # only requests in flight at the kill
    assert set(done) | failed == set(people) and not set(done) & failed

    # the store: consistent; every acknowledged person as acknowledged; the rest all or none
    from facemetric.gallery.postgres import PostgresGallery

    with PostgresGallery(pg_url, create=False) as g:
        g.check()
        stored = {p.name: p.face_count for p in g.list_persons("crash", limit=1000)[0]}
    for name, answer in done.items():
        assert stored.get(name, 0) == answer["accepted"] >= 1, name
    local = Recognizer(model, tmp_path / "local.db", collection="crash")
    for name in failed:
        complete = local.enroll(name, [p.read_bytes() for p in people[name][:3]],
                                policy="largest").accepted
        assert stored.get(name, 0) in (0, complete), (name, stored.get(name), complete)
    local.close()

    # uvicorn restarts the killed worker; then the other original one goes too, so every
    # answer below comes from a process started after the enrollments
    pids = _replaced(srv, victim)
    (other,) = first - {victim}
    os.kill(other, signal.SIGKILL)
    pids = _replaced(srv, other)
    assert not pids & first
    with httpx.Client(base_url=srv.url, timeout=60, headers=headers) as c:
        assert c.get("/v1/collections/crash").json()["face_count"] == sum(stored.values())
        for name in failed:  # sent again: stored now (201), or already whole (422)
            r = c.post(f"/v1/collections/crash/persons/{name}/faces",
                       files=[("images", p.read_bytes()) for p in people[name][:3]],
                       data={"policy": "largest"})
            assert r.status_code == (422 if stored.get(name) else 201), r.text
    for name in people:
        answer = done.get(name)
        first_ok = next(i for i, o in enumerate(answer["images"]) if o["accepted"]) \
            if answer else 0
        photo = people[name][first_ok].read_bytes()
        for _ in range(2):  # new connections: either worker
            r = httpx.post(f"{srv.url}/v1/collections/crash/identify", timeout=60,
                           files={"image": photo}, headers=headers)
            assert r.status_code == 200 and r.json()["faces"][0]["best"] == name, r.text
