"""``facemetric serve`` without ``--model`` serves the installed default model, resolved to
its file once at start: a default installed while the service runs reaches none of its
workers, not even one uvicorn starts afresh after a crash; with no default installed the
command says how to get one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, make_model

from facemetric.inference.default import HOME_ENV, install_default_model


def _models_seen(srv: Server, workers: set[int], timeout_s: float = 120) -> dict[int, dict]:
    """``/v1/health``'s model of each worker in ``workers`` (the kernel hands each new
    connection to one of them), once every one has answered."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while not workers <= set(seen) and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            body = httpx.get(f"{srv.url}/v1/health", timeout=30,
                             headers={"Connection": "close"}).json()
            seen[body["worker"]] = body["model"]
        time.sleep(0.02)
    assert workers <= set(seen), (workers, set(seen), srv.log_text()[-3000:])
    return {w: seen[w] for w in workers}


@pytest.mark.slow
def test_serve_without_model_keeps_the_default_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    first = install_default_model(make_model(tmp_path / "a.onnx", seed=11))
    srv = Server(None, tmp_path / "gallery.db", tmp_path / "server.log",
                 args=["--workers", "2"]).start()
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = srv.worker_pids()
            time.sleep(0.1)
        models = _models_seen(srv, workers)
        for model in models.values():
            assert model["fingerprint"] == first.fingerprint
            assert model["extra"]["onnx_file"] == str(first.path)
        second = install_default_model(make_model(tmp_path / "b.onnx", seed=12))
        assert second.fingerprint != first.fingerprint
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        fresh: set[int] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            fresh = srv.worker_pids()
            if len(fresh) == 2 and victim not in fresh:
                break
            time.sleep(0.2)
        assert len(fresh) == 2 and victim not in fresh, srv.log_text()[-3000:]
        for model in _models_seen(srv, fresh).values():  # the new worker too
            assert model["fingerprint"] == first.fingerprint
            assert model["extra"]["onnx_file"] == str(first.path)
    finally:
        srv.stop()


def test_serve_without_model_or_default_says_how_to_get_one(tmp_path: Path):
    env = {**os.environ, HOME_ENV: str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "facemetric", "serve", "--gallery", str(tmp_path / "g.db")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no default model is installed" in proc.stderr and "make demo" in proc.stderr
    assert not (tmp_path / "g.db").exists()
