"""Keep freed tensor memory inside the process (glibc), so that a training step does not pay
the kernel to map and zero its activations again.

glibc's ``malloc`` serves a request above its mmap threshold (128 KiB, rising with what was
freed up to 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when freed, and
trims the top of the heap beyond ``M_TRIM_THRESHOLD``. A CPU training step allocates and
frees the same tens of megabytes of activations every step, so every step the kernel maps and
zero-fills them again. Measured with ``benchmarks/malloc.py`` (64×64 MobileFaceNet, N-pair on
P×K = 64 batches of LFW, 30 steps, a fresh process each): **2.06–2.12 M minor page faults
and 8–9 s of system time per process at glibc's defaults; 0.37 M faults and 2.1–2.5 s after
:func:`retain_freed_memory`; 1.16× the loop's img/s** (``docs/benchmarks.md``, "Training
throughput"). The cost: the process keeps its peak heap instead of returning it to the system
between steps.

The setting is process-wide (``mallopt``); :func:`~facemetric.training.loop.train` applies it
when it starts. Processes forked after it (DataLoader workers) inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: 1 GiB: larger than any activation of the CPU runs here. (32 MiB, the most older glibc
#: accepts, removed only about a third of the faults in a check on the bare training step;
#: glibc 2.36 takes 1 GiB.)
DEFAULT_THRESHOLD = 1 << 30
OLD_GLIBC_MAX = 32 * 1024 * 1024

_applied: int | None = None


def retain_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes (to 32 MiB where an
    older glibc refuses more); ``True`` when set (or set before by this function), ``False``
    where there is no glibc (macOS, musl, Windows) or it refused even that.

    Raises:
        ValueError: ``threshold`` below 128 KiB (glibc's own default: nothing to gain).
    """
    global _applied
    if threshold < 128 * 1024:
        raise ValueError(f"threshold must be >= 131072 bytes (glibc's default), got {threshold}")
    if _applied is not None and _applied >= threshold:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for value in dict.fromkeys((threshold, min(threshold, OLD_GLIBC_MAX))):
        if mallopt(M_MMAP_THRESHOLD, value) and mallopt(M_TRIM_THRESHOLD, value):
            _applied = value
            return True
        logger.debug("glibc refused mallopt thresholds of %d bytes", value)
    return False


__all__ = ["DEFAULT_THRESHOLD", "retain_freed_memory"]
