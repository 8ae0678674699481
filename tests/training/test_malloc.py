"""retain_freed_memory: glibc stops re-mapping freed tensor memory (counted in page faults of a
fresh process), and refuses nonsense."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from facemetric.training.malloc import retain_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free a 48 MiB tensor 10 times; print the minor page faults it cost.
PROBE = """
import sys, torch
from facemetric.training.malloc import retain_freed_memory
if sys.argv[1] == "on":
    assert retain_freed_memory()
def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])
torch.set_num_threads(1)
x = torch.empty(12 * 2**20).fill_(1.0); del x
before = faults()
for _ in range(10):
    x = torch.empty(12 * 2**20).fill_(1.0)
    del x
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_freed_tensors_are_reused_without_page_faults() -> None:
    pages = 48 * 2**20 // 4096  # 12,288 pages per allocation
    default, retained = _faults("off"), _faults("on")
    assert default >= 9 * pages  # glibc maps and zero-fills the block again every time
    # the freed block is reused from the heap: at most one of the ten allocations touches
    # fresh pages (a clean-clone CI run once counted exactly one block, 12,288 faults)
    assert retained < 2 * pages


def test_a_threshold_below_glibc_default_is_refused() -> None:
    with pytest.raises(ValueError, match="threshold must be >= 131072"):
        retain_freed_memory(4096)
