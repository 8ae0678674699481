"""Fixtures of the service tests: the test model, the shared server, keys, LFW photos
(helpers in :mod:`service_helpers`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
