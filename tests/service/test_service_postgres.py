"""``facemetric serve --gallery postgresql://...`` end to end: the service on the
PostgreSQL store (a throwaway cluster from ``tests/gallery/pg_cluster.py``), with its key
file given by ``--keys``. The store's own multi-process guarantees are tested with the
store (tests/gallery)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from service_helpers import Server, assert_envelope

from facemetric.service.keys import KeyStore

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _pg_cluster_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "gallery" / "pg_cluster.py"
    spec = importlib.util.spec_from_file_location("service_pg_cluster", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A URL of a fresh database on a cluster of this module's own (unix socket only)."""
    pg = _pg_cluster_module()
    try:
        cluster = pg.start_cluster()
    except pg.ClusterUnavailableError as err:
        if os.environ.get("FACEMETRIC_REQUIRE_DATA") == "1":
            pytest.fail(f"PostgreSQL is required but unavailable: {err}")
        pytest.skip(f"PostgreSQL unavailable: {err}")
    try:
        dsn = cluster.create_database("svc")
        dbname = dict(part.split("=", 1) for part in dsn.split())["dbname"]
        yield (f"postgresql://postgres@/{dbname}?host={quote(str(cluster.root), safe='')}"
               f"&port={cluster.port}")
    finally:
        cluster.stop()


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
