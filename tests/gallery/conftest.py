"""Fixtures of the gallery tests: a fresh gallery file with one collection."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gallery_worker import COLLECTION, contract

from facemetric.gallery import SQLiteGallery
from facemetric.inference.contract import ModelContract


@pytest.fixture
def model() -> ModelContract:
    return contract()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gallery.db"


@pytest.fixture
def gallery(db_path: Path, model: ModelContract) -> Iterator[SQLiteGallery]:
    """A gallery (``synchronous=NORMAL``: these tests do not cut the power) holding the
    empty collection ``"main"`` pinned to ``model``."""
    with SQLiteGallery(db_path, synchronous="NORMAL") as store:
        store.create_collection(COLLECTION, model)
        yield store
