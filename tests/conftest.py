"""Shared fixtures: real-data roots (skip without data, fail when CI requires it), seeding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _data_root() -> Path | None:
    env = os.environ.get("FACEMETRIC_DATA")
    return Path(env) if env and Path(env).is_dir() else None


def _need(sub: str) -> Path:
    root = _data_root()
    path = None if root is None else root / sub
    if path is None or not path.exists():
        msg = (
            f"real data {sub!r} not found under FACEMETRIC_DATA="
            f"{os.environ.get('FACEMETRIC_DATA')!r}"
        )
        if os.environ.get("FACEMETRIC_REQUIRE_DATA") == "1":
            pytest.fail(msg + " and FACEMETRIC_REQUIRE_DATA=1")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def orl_root() -> Path:
    """``FACEMETRIC_DATA/orl`` (40 identities × 10 PGM images)."""
    return _need("orl")


@pytest.fixture(scope="session")
def lfw_root() -> Path:
    """``FACEMETRIC_DATA/lfw`` (deep-funneled images + protocol files)."""
    return _need("lfw")


@pytest.fixture(scope="session")
def cfp_root() -> Path:
    """``FACEMETRIC_DATA/cfp`` (CFP images, fiducials and protocol)."""
    return _need("cfp")


@pytest.fixture(scope="session")
def nuaa_root() -> Path:
    """``FACEMETRIC_DATA/nuaa`` (NUAA print-attack photos: live/ and spoof/, 9 subjects)."""
    return _need("nuaa")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
