"""The package's layers, checked: what *uses* a model never loads the training loop, and the
library never imports the CLI or the experiments."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "facemetric"

USERS = [
    "facemetric.evaluation",
    "facemetric.evaluation.run",
    "facemetric.evaluation.heldout",
    "facemetric.inference",
    "facemetric.recognizer",
    "facemetric.gallery",
    "facemetric.index",
    "facemetric.service",
    "facemetric.pad",
    "facemetric.clustering",
    "facemetric.distillation",
]


@pytest.mark.parametrize("module", USERS)
def test_using_a_model_does_not_import_training(module):
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('facemetric.training'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_evaluation_package_loads_no_model_code():
    code = (
        "import sys, facemetric.evaluation\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith(('facemetric.models', "
        "'facemetric.inference', 'facemetric.losses')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_library_never_imports_the_cli_or_the_experiments():
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        # the CLI (cli.py and its *_cli.py parts) may import experiments; nothing else may
        if rel in ("cli.py", "__main__.py") or rel.endswith("_cli.py") or rel.startswith(
                "experiments/"):
            continue
        for name in _imports(path):
            if name.startswith(("facemetric.cli", "facemetric.experiments")) or (
                    name.startswith("facemetric.") and name.endswith("_cli")):
                offenders.append(f"{rel} imports {name}")
    assert offenders == []


def test_no_pickle_in_the_code_that_reads_user_files():
    """Models, thresholds and galleries are read with weights_only torch, ONNX and JSON."""
    for folder in ("inference", "gallery", "recognizer", "index"):
        for path in (SRC / folder).rglob("*.py"):
            assert "pickle" not in _imports(path), path
            text = path.read_text(encoding="utf-8")
            assert "weights_only=False" not in text, path
