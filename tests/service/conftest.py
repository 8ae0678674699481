"""Fixtures of the service tests: the test model, the shared server, keys, LFW photos, a
throwaway PostgreSQL cluster (helpers in :mod:`service_helpers`)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from service_helpers import Server, make_model, unique

from facemetric.service.keys import KeyStore


@pytest.fixture(scope="session")
def service_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("service_model") / "model.onnx")


@pytest.fixture(scope="session")
def server(service_model, tmp_path_factory) -> Iterator[Server]:
    """The shared server (one worker, SQLite gallery). Tests use collection names with a
    random suffix, so they never see each other's data."""
    tmp = tmp_path_factory.mktemp("service")
    srv = Server(service_model, tmp / "gallery.db", tmp / "server.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def keys(server) -> KeyStore:
    """The shared server's key file (keys created here work on its next request)."""
    return KeyStore(server.gallery.with_name(f"{server.gallery.stem}.keys.db"))


@pytest.fixture(scope="session")
def admin(keys) -> dict[str, str]:
    """Headers carrying an unbound admin key."""
    return {"Authorization": f"Bearer {keys.create('admin', name='tests')[1]}"}


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture
def collection(client, admin) -> str:
    """A new, empty collection on the shared server."""
    name = unique("c")
    r = client.post("/v1/collections", json={"name": name}, headers=admin)
    assert r.status_code == 201, r.text
    return name


@pytest.fixture(scope="session")
def lfw_people(lfw_root: Path) -> dict[str, list[Path]]:
    """DevTest identities with at least four photos (their first four), by name."""
    root = lfw_root / "lfw-deepfunneled"
    out: dict[str, list[Path]] = {}
    for line in (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]:
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) >= 4:
            out[parts[0]] = [root / parts[0] / f"{parts[0]}_{k:04d}.jpg" for k in range(1, 5)]
        if len(out) == 16:
            break
    return out


def _pg_cluster_module() -> Any:
    """tests/gallery/pg_cluster.py (the gallery tests' throwaway cluster), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "gallery" / "pg_cluster.py"
    spec = importlib.util.spec_from_file_location("service_pg_cluster", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (unix socket only), started on first use; skipped
    without PostgreSQL unless ``FACEMETRIC_REQUIRE_DATA=1``."""
    pg = _pg_cluster_module()
    try:
        cluster = pg.start_cluster()
    except pg.ClusterUnavailableError as err:
        if os.environ.get("FACEMETRIC_REQUIRE_DATA") == "1":
            pytest.fail(f"PostgreSQL is required but unavailable: {err}")
        pytest.skip(f"PostgreSQL unavailable: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A ``postgresql://`` URL of a fresh database on the cluster."""
    dsn = pg_cluster.create_database("svc")
    dbname = dict(part.split("=", 1) for part in dsn.split())["dbname"]
    return (f"postgresql://postgres@/{dbname}?host={quote(str(pg_cluster.root), safe='')}"
            f"&port={pg_cluster.port}")
