"""Counting what would make a GPU wait: reads of device values back to the host.

On a GPU the host queues kernels and goes on; a read of a value (``.item()``, ``int(t)``,
``bool(t)``, ``.tolist()``), an operator whose output size depends on the data (``nonzero``,
``unique``, boolean indexing, ``bincount``, ``masked_select``) or a copy from the host
(``torch.tensor(..., device=...)``) blocks until every queued kernel has run, and a step full
of them is bound by the host rather than the GPU. :class:`HostReads` records them while a
piece of code runs — on the CPU too, where they cost nothing, so a test or a benchmark
without a GPU can hold a training step to a count of them.

It is a proxy, not a profiler: it sees operators through a ``TorchDispatchMode`` and wraps
``Tensor.tolist`` and ``torch.tensor`` (which on the CPU run no operator); it cannot see a
``.to(device)`` from the CPU when everything is on the CPU, nor reads that C++ code makes
without dispatching. ``torch.cuda.set_sync_debug_mode`` is the check on a real GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

#: operators that copy a value to the host or size their output by the data
READING_OPERATORS = frozenset(
    {
        _aten._local_scalar_dense.default,  # item(), int(t), float(t), bool(t)
        _aten.nonzero.default,
        _aten._unique2.default,
        _aten.unique_dim.default,
        _aten.unique_consecutive.default,
        _aten.masked_select.default,
        _aten.repeat_interleave.Tensor,
        _aten.bincount.default,
        _aten.equal.default,
        _aten.is_nonzero.default,
    }
)
#: indexing operators that read the device when an index is a boolean mask
_MASKABLE = frozenset({_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default})


class HostReads(TorchDispatchMode):
    """Record every read of device values made inside ``with HostReads() as reads:``.

    ``reads.reads`` is the list of their names in order: an aten operator's name (``"(boolean
    mask)"`` added for indexing by a mask), ``"Tensor.tolist"`` or
    ``"torch.tensor(device=...)"``. Not thread-safe (it patches ``torch.tensor`` and
    ``Tensor.tolist`` while active); not reentrant.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._originals = (torch.Tensor.tolist, torch.tensor)

    def __enter__(self) -> HostReads:
        tolist_, tensor_ = self._originals

        def tolist(tensor: Tensor) -> Any:
            self.reads.append("Tensor.tolist")
            return tolist_(tensor)

        def tensor(data: Any, *args: Any, **kwargs: Any) -> Tensor:
            if kwargs.get("device") is not None:
                self.reads.append("torch.tensor(device=...)")
            return tensor_(data, *args, **kwargs)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        torch.tensor = tensor  # type: ignore[assignment]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist, torch.tensor = self._originals  # type: ignore[method-assign,assignment]
        super().__exit__(*exc)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in READING_OPERATORS:
            self.reads.append(str(func))
        elif func in _MASKABLE and any(
            isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self.reads.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


__all__ = ["READING_OPERATORS", "HostReads"]
