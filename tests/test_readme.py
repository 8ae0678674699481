"""The README's Python example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    loss = namespace["arcface"]
    assert tuple(loss.weight.shape) == (10_000, 512)
    assert namespace["embeddings"].grad is not None  # both losses reached the embeddings
    batches = list(namespace["sampler"])
    assert batches and all(len(b) == 4 for b in batches)


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make demo" in text
