"""32 clients enrolling and identifying at once through two ``facemetric serve`` processes
(two workers, each with its own model and in-memory index) sharing one throwaway PostgreSQL
gallery, on real LFW photos:

- nothing lost, nothing doubled: every accepted face id is in the store exactly once, under
  the person whose request accepted it, and the store holds nothing else;
- cross-worker visibility with bound 0: a face enrolled through one worker is identified
  through the *other* worker by the first search sent after the enrollment's 201 — no
  waiting, no retry;
- the answers are the Python API's: once the writes are over, every identification through
  HTTP (sent concurrently again) equals ``Recognizer.identify`` on the same store.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, assert_same, start_servers

from facemetric.recognizer import Recognizer
from facemetric.service.keys import KeyStore

pytestmark = [pytest.mark.data, pytest.mark.slow]

CLIENTS = 32
COLLECTION = "crowd"


@pytest.fixture(scope="module")
def people(lfw_root: Path) -> dict[str, list[bytes]]:
    """32 DevTest identities with at least three photos: their first three."""
    root = lfw_root / "lfw-deepfunneled"
    out: dict[str, list[bytes]] = {}
    for line in (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]:
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) >= 3:
            out[parts[0]] = [(root / parts[0] / f"{parts[0]}_{k:04d}.jpg").read_bytes()
                             for k in range(1, 4)]
        if len(out) == CLIENTS:
            break
    assert len(out) == CLIENTS
    return out


def test_32_clients_on_two_workers_sharing_postgresql(pg_url, service_model, tmp_path,
                                                      people):
    keys = tmp_path / "service.keys.db"
    servers = start_servers([
        Server(service_model, pg_url, tmp_path / f"server{i}.log", args=["--keys", str(keys)])
        for i in range(2)])
    try:
        _run(servers, KeyStore(keys).create("admin")[1], pg_url, service_model, people)
    finally:
        for srv in servers:
            srv.stop()


def _run(servers: list[Server], key: str, pg_url: str, model: Path,
         people: dict[str, list[bytes]]) -> None:
    from facemetric.gallery.postgres import PostgresGallery  # needs psycopg: not at import

    headers = {"X-API-Key": key}
    pids = {httpx.get(f"{s.url}/v1/health", timeout=30).json()["worker"] for s in servers}
    assert len(pids) == 2
    r = httpx.post(f"{servers[0].url}/v1/collections", json={"name": COLLECTION},
                   headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    names = list(people)
    enrolled: dict[str, dict] = {}
    first_search: dict[str, dict] = {}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)
    writes_over = threading.Barrier(CLIENTS)
    final: dict[tuple[str, int], dict] = {}

    def client(i: int) -> None:
        name = names[i]
        here, there = servers[i % 2], servers[(i + 1) % 2]
        try:
            with httpx.Client(base_url=here.url, timeout=120) as a, \
                    httpx.Client(base_url=there.url, timeout=120) as b:
                start.wait(timeout=60)
                r = a.post(f"/v1/collections/{COLLECTION}/persons/{name}/faces",
                           headers=headers, data={"policy": "largest"},
                           files=[("images", p) for p in people[name][:2]])
                if r.status_code != 201:
                    raise AssertionError(f"enroll {name}: {r.status_code} {r.text[:500]}")
                # the other worker, at once: the first search after the 201 must find it
                s = b.post(f"/v1/collections/{COLLECTION}/identify", headers=headers,
                           files={"image": people[name][0]})
                if s.status_code != 200:
                    raise AssertionError(f"identify {name}: {s.status_code} {s.text[:500]}")
                with lock:
                    enrolled[name], first_search[name] = r.json(), s.json()
                writes_over.wait(timeout=120)
                for k in (0, 2):  # an enrolled photo and one never enrolled
                    s = b.post(f"/v1/collections/{COLLECTION}/identify", headers=headers,
                               files={"image": people[name][k]})
                    if s.status_code != 200:
                        raise AssertionError(f"identify {name}: {s.status_code} {s.text}")
                    with lock:
                        final[name, k] = s.json()
        except BaseException as err:  # reported by the main thread
            with lock:
                errors.append(f"{name}: {type(err).__name__}: {err}")
            start.abort()
            writes_over.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]

    # nothing lost, nothing doubled
    answered = {name: sorted(o["face_id"] for o in body["images"] if o["accepted"])
                for name, body in enrolled.items()}
    assert all(answered.values()), answered
    with PostgresGallery(pg_url, create=False) as store:
        store.check()
        persons, _ = store.list_persons(COLLECTION, limit=1000)
        stored = {p.name: sorted(f.id for f in store.faces(COLLECTION, p.name))
                  for p in persons}
        assert store.get_collection(COLLECTION).face_count == sum(map(len, answered.values()))
    assert stored == answered
    every_id = [i for ids in stored.values() for i in ids]
    assert len(every_id) == len(set(every_id))

    # bound 0: the first search through the other worker found the person
    for name, body in first_search.items():
        assert body["faces"][0]["best"] == name, (name, body["faces"][0]["candidates"][:2])

    # once the writes are over, HTTP answers equal the Python API's on the same store
    local = Recognizer(model, PostgresGallery(pg_url, create=False), collection=COLLECTION)
    try:
        for (name, k), body in final.items():
            want = local.identify(people[name][k]).to_dict()
            assert_same(body, {"collection": COLLECTION, **want}, f"{name}[{k}]")
            if k == 0:
                assert body["faces"][0]["best"] == name
    finally:
        local.close()
