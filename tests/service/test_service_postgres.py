"""``facemetric serve --gallery postgresql://...`` end to end: the service on the
PostgreSQL store (a throwaway cluster from ``tests/gallery/pg_cluster.py``), with its key
file given by ``--keys``; a worker's connections bounded by ``--max-threads``. The store's
own multi-process guarantees are tested with the store (tests/gallery)."""

from __future__ import annotations

import threading

import httpx
import pytest
from service_helpers import Server, assert_envelope

from facemetric.service.keys import KeyStore

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_the_service_on_a_postgresql_gallery(pg_url, service_model, tmp_path, lfw_people):
    keys = tmp_path / "service.keys.db"
    srv = Server(service_model, pg_url, tmp_path / "server.log", args=["--keys", str(keys)])
    srv.start()
    try:
        store = KeyStore(keys)
        record, key = store.create("admin")
        h = {"X-API-Key": key}
        name, photos = next(iter(lfw_people.items()))
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            health = c.get("/v1/health").json()
            assert health["gallery"]["backend"] == "postgresql"
            assert c.post("/v1/collections", json={"name": "pg"}, headers=h).status_code == 201
            r = c.post(f"/v1/collections/pg/persons/{name}/faces", headers=h,
                       files=[("images", p.read_bytes()) for p in photos[:2]],
                       data={"policy": "largest"})
            assert r.status_code == 201 and r.json()["accepted"] >= 1, r.text
            r = c.post("/v1/collections/pg/identify", files={"image": photos[0].read_bytes()},
                       headers=h)
            assert r.json()["faces"][0]["best"] == name
            page = c.get("/v1/collections/pg/persons", headers=h).json()
            assert [p["name"] for p in page["items"]] == [name]
            assert c.delete(f"/v1/collections/pg/persons/{name}", headers=h).status_code == 200
            r = c.post("/v1/collections/pg/identify", files={"image": photos[0].read_bytes()},
                       headers=h)
            assert r.json()["faces"][0]["candidates"] == []
            store.revoke(record.id)
            assert_envelope(c.get("/v1/collections", headers=h), 401, "invalid_key")
    finally:
        srv.stop()


def test_a_worker_holds_at_most_max_threads_connections(pg_url, service_model, tmp_path,
                                                        lfw_people):
    """64 clients at once against a worker started with ``--max-threads 6``: every request
    answered, and the database saw at most 6 + 1 connections from it (one per handler
    thread, plus the one that opened the gallery) — counted by PostgreSQL itself."""
    import psycopg

    keys = tmp_path / "service.keys.db"
    srv = Server(service_model, pg_url, tmp_path / "server.log",
                 args=["--keys", str(keys), "--max-threads", "6"]).start()
    try:
        h = {"X-API-Key": KeyStore(keys).create("admin")[1]}
        name, photos = next(iter(lfw_people.items()))
        with httpx.Client(base_url=srv.url, timeout=60, headers=h) as c:
            assert c.post("/v1/collections", json={"name": "t"}).status_code == 201
            r = c.post(f"/v1/collections/t/persons/{name}/faces",
                       files={"images": photos[0].read_bytes()}, data={"policy": "largest"})
            assert r.status_code == 201, r.text
        statuses: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(base_url=srv.url, timeout=120, headers=h) as c:
                got = [c.post("/v1/collections/t/identify",
                              files={"image": photos[1].read_bytes()}).status_code,
                       c.get("/v1/collections/t/persons").status_code,
                       c.get(f"/v1/collections/t/persons/{name}/faces").status_code]
            with lock:
                statuses.extend(got)

        threads = [threading.Thread(target=client) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert statuses == [200] * (3 * 64)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            opened = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'facemetric'").fetchone()[0]
        assert 2 <= opened <= 6 + 1, opened
    finally:
        srv.stop()
