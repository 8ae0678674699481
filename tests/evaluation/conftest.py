"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture
def keep_figures(monkeypatch) -> Callable[[ModuleType], list[Any]]:
    """``keep_figures(module)`` patches ``module._save_figure`` so that every figure it saves
    is also appended to the returned list (and still saved), for reading the plotted data."""

    def keep(module: ModuleType) -> list[Any]:
        figures: list[Any] = []
        original = module._save_figure

        def spy(fig, path, title):
            figures.append(fig)
            return original(fig, path, title)

        monkeypatch.setattr(module, "_save_figure", spy)
        return figures

    return keep
