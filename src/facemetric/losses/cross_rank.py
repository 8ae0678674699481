"""Batch statistics over every process of a data-parallel run.

Some losses keep state that their training-mode forward updates from the batch: center
loss's class centres, dynamic AdaCos's scale. Under data parallelism each process sees only
its shard of the global batch, so updating from the local shard makes the state differ
between processes (and DDP's ``broadcast_buffers`` would then overwrite every copy with
process 0's, i.e. the state would learn from process 0's shard only). A module that derives
from :class:`CrossRankStatistics` instead computes those statistics over the global batch:
while its :attr:`~CrossRankStatistics.statistics_group` is set, it gathers the per-sample
quantities it needs from every process of that group (:func:`gather_rows`) and applies the
same update everywhere, so its state stays identical on every process and equals what one
process would compute on the whole batch (the shards concatenated in rank order).

The training loop's DDP context sets the group (:func:`set_statistics_group`); outside a
distributed run it stays ``None`` and nothing is communicated. A module with a group set
performs a collective in every training-mode forward: every process of the group must call
it the same number of times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class CrossRankStatistics:
    """Mixin for modules whose training-mode forward updates state from batch statistics.

    ``statistics_group``: the ``torch.distributed`` process group over which the statistics
    are gathered (``torch.distributed.group.WORLD`` for all processes), or ``None`` (the
    default) for this process's batch alone.
    """

    statistics_group: Any = None


def set_statistics_group(module: nn.Module, group: Any) -> list[str]:
    """Set ``statistics_group = group`` on every :class:`CrossRankStatistics` submodule of
    ``module`` (``module`` itself included); returns their qualified names (``""`` for
    ``module``)."""
    names = []
    for name, sub in module.named_modules():
        if isinstance(sub, CrossRankStatistics):
            sub.statistics_group = group
            names.append(name)
    return names


def gather_rows(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Each of ``tensors`` concatenated along dimension 0 over every process of ``group``, in
    rank order; the tensors themselves when ``group`` is ``None`` or has one process (or
    ``torch.distributed`` is not initialised).

    The tensors of one call share their number of rows on each process (they describe the
    same samples); processes may hold different numbers of rows, the other dimensions and
    the dtypes must agree between processes. No gradient flows through the results. A
    collective: every process of the group must call it with the same number of tensors.
    """
    tensors = [t.detach() for t in tensors]
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensors  # (no process group any more: the module is used on its own)
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise ValueError(f"gather_rows: the tensors must have one number of rows, got {rows}")
    world = dist.get_world_size(group)
    device = tensors[0].device
    count = torch.tensor([rows.pop()], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    out = []
    for t in tensors:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out.append(torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]))
    return out


__all__ = ["CrossRankStatistics", "gather_rows", "set_statistics_group"]
