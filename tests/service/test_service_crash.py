"""A server killed with SIGKILL in the middle of enrollments: clients see errors only for
the requests in flight, the store stays consistent (every person all or nothing), and the
restarted server serves everything that was acknowledged — and the in-flight requests
are either wholly in or wholly absent. (Its fresh server also shows that there is no
default key.)"""

from __future__ import annotations

import queue
import threading
import time

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
        pids = set()
        for _ in range(60):  # a new connection each time: the kernel picks the worker
            pids.add(httpx.get(f"{srv.url}/v1/health", timeout=30).json()["worker"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
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
