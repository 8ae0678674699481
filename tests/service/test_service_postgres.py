"""``facemetric serve --gallery postgresql://...`` end to end: the service on the
PostgreSQL store (a throwaway cluster from ``tests/gallery/pg_cluster.py``), with its key
file given by ``--keys``. The store's own multi-process guarantees are tested with the
store (tests/gallery)."""

from __future__ import annotations

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
