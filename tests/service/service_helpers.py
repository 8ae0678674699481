"""Helpers of the service tests: a fast real model (an ONNX file with its contract and a
threshold table), real ``facemetric serve`` processes on loopback, envelope checks.

The model is a fixed random projection of the aligned face's pixels, exported to ONNX:
the server loads it through the same ``load_model`` path as any exported model, it embeds
in microseconds, and — unlike a randomly initialised CNN, which maps every face to nearly
the same direction — different faces get clearly different embeddings, so ranking and
duplicate checks are not vacuous.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from facemetric.inference import ModelContract, ThresholdTable, TorchEncoder
from facemetric.inference.calibration import CalibrationEntry

HOST = "127.0.0.1"
START_TIMEOUT = 90.0
THRESHOLDS = {1e-3: 0.5, 1e-2: 0.35}


class PixelProjection(torch.nn.Module):
    """Mean-centred pixels times a fixed Gaussian matrix (see the module docstring)."""

    def __init__(self, side: int, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3 * side * side, dim, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return (x - x.mean(1, keepdim=True)) @ self.w


def make_model(path: Path, seed: int = 0, dim: int = 32) -> Path:
    """Export the test model with a threshold table to ``path`` (an ``.onnx`` file)."""
    from facemetric.inference.onnx import export_onnx

    contract = ModelContract(backbone="pixel_projection", input_size=24, template="arcface112",
                             embedding_size=dim, weights_sha256=f"service-test-{seed}-{dim}")
    encoder = TorchEncoder(PixelProjection(24, dim, seed).eval(), contract, channels_last=False)
    entries = tuple(CalibrationEntry(f, t, 0, 100_000) for f, t in sorted(THRESHOLDS.items()))
    table = ThresholdTable(contract.fingerprint(), entries, "service tests", 100_000, 0)
    return export_onnx(encoder, path, thresholds=table)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A ``facemetric serve`` process on loopback (stdout and stderr in ``log``); without a
    ``model`` it is started without ``--model`` (the installed default model)."""

    model: Path | None
    gallery: Path | str
    log: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Server:
        for _attempt in range(3):  # a port taken between free_port() and bind: retry
            self.port = free_port()
            model = [] if self.model is None else ["--model", str(self.model)]
            cmd = [sys.executable, "-m", "facemetric", "serve", *model,
                   "--gallery", str(self.gallery), "--host", HOST, "--port", str(self.port),
                   *self.args]
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if self._wait_ready():
                return self
        raise RuntimeError(f"the server did not start; its log:\n{self.log_text()[-4000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def worker_pids(self) -> set[int]:
        """The uvicorn worker processes of a ``--workers N`` server (its children that run
        ``spawn_main``; not multiprocessing's resource tracker)."""
        assert self.proc is not None
        pid = self.proc.pid
        out = set()
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    out.add(int(child))
            except FileNotFoundError:  # it has just ended
                continue
        return out

    def rss_peak_kb(self) -> int:
        """The server process's peak resident memory (VmHWM), in KiB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc status")


def start_servers(servers: list[Server]) -> list[Server]:
    """Start several servers at once (each loads its model while the others do)."""
    errors: list[BaseException] = []

    def start(srv: Server) -> None:
        try:
            srv.start()
        except BaseException as err:  # re-raised below, after every start has ended
            errors.append(err)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for srv in servers:
            srv.stop()
        raise errors[0]
    return servers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_envelope(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """``r`` is the error envelope with this status (and code), with its request id."""
    assert r.status_code == status, (r.status_code, r.text[:2000])
    body = r.json()
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["request_id"] == r.headers["x-request-id"]
    assert body["error"]["message"] and "Traceback" not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal JSON values; floats within 1e-5 (the server may batch faces differently)."""
    if isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, abs=1e-5), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


__all__ = ["HOST", "THRESHOLDS", "PixelProjection", "Server", "assert_envelope", "assert_same",
           "free_port", "make_model", "start_servers", "unique"]
