"""Multi-process training with ``torch.distributed``: a DDP :class:`DistributedContext`.

``torchrun --nproc_per_node=N -m facemetric train --config X.toml`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them, starts the process group (NCCL when CUDA is available, gloo otherwise) and
returns a :class:`DDPContext`. Nothing happens at import time. Under it the training loop

- wraps the backbone in ``DistributedDataParallel`` (gradients averaged over processes);
- wraps the loss too when it has parameters that are not sharded (a classifier loss's
  centres, a learned distance), so they stay identical on every process; Partial FC's
  sharded ``.weight`` is left alone — each process owns its rows. Loss state updated from
  batch statistics (center loss's centres, AdaCos's scale) is computed over the global
  batch (:mod:`facemetric.losses.cross_rank`), not broadcast from process 0;
- makes every process agree before it stops: a NaN/Inf embedding or loss, or a non-finite
  gradient, on any process is seen by all (:meth:`DDPContext.all_values`), so they raise
  or skip together instead of leaving the others blocked in a collective;
- shards the batches by rank (``PKSampler`` / ``ShuffledBatchSampler``), so the global batch
  is ``world_size`` × ``[batch]`` size;
- averages the logged loss over processes and writes logs and checkpoints on rank 0 only.
  Sharded state (Partial FC's centres and their optimiser state) is gathered into the
  checkpoint first (:func:`gather_sharded_state`), so a checkpoint holds every class centre
  and loads into any world size (:func:`shard_loaded_state`).
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from facemetric.heads.partial_fc import PartialFC, shard_range
from facemetric.training.loop import DistributedContext

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DDPContext(DistributedContext):
    """A process of an initialised ``torch.distributed`` group (see the module docstring).

    ``backend`` is the group's backend (``"nccl"`` or ``"gloo"``).
    """

    backend: str = "gloo"

    def _device_ids(self, module: nn.Module) -> list[int] | None:
        param = next(module.parameters(), None)
        if param is not None and param.device.type == "cuda":
            return [param.device.index if param.device.index is not None else self.local_rank]
        return None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` (parameters broadcast from rank 0)."""
        return DistributedDataParallel(model, device_ids=self._device_ids(model))

    def wrap_loss(self, loss: nn.Module) -> nn.Module:
        """``DistributedDataParallel`` over the loss's non-sharded trainable parameters; the
        loss itself when it has none (a pair loss, or Partial FC's sharded centres only).

        Loss state updated from batch statistics (center loss's centres, AdaCos's scale:
        :class:`~facemetric.losses.cross_rank.CrossRankStatistics`) is computed over the
        global batch: their ``statistics_group`` is set to every process. DDP's buffer
        broadcast is off for the loss: its buffers are kept identical on every process by
        construction — constants, counters every process advances alike, or statistics
        reduced over all processes — whereas broadcasting would overwrite them with process
        0's each step (a loss whose buffers follow the local batch must reduce them itself).
        """
        from facemetric.losses.cross_rank import set_statistics_group

        set_statistics_group(loss, dist.group.WORLD)
        sharded = {f"{name}.weight".lstrip(".") for name, m in loss.named_modules()
                   if isinstance(m, PartialFC)}
        synced = [n for n, p in loss.named_parameters() if p.requires_grad and n not in sharded]
        if not synced:
            return loss
        if sharded:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                loss, sorted(sharded)
            )
        return DistributedDataParallel(loss, device_ids=self._device_ids(loss),
                                       broadcast_buffers=False)

    def reduce_mean(self, value: float) -> float:
        """Mean of ``value`` over the processes (an all-reduce)."""
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else None
        total = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total.item()) / self.world_size

    def all_values(self, value: float) -> list[float]:
        """``value`` of every process, in rank order (one all-reduce of ``world_size``
        float64 numbers; a NaN or Inf stays in its own process's slot)."""
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else None
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=device)
        slots[self.rank] = float(value)
        dist.all_reduce(slots, op=dist.ReduceOp.SUM)
        return [float(v) for v in slots.cpu().tolist()]

    def barrier(self) -> None:
        """Wait for every process."""
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def destroy(self) -> None:
        """End the process group (idempotent).

        Every rank first waits at a barrier (rank 0 may still be writing its checkpoint), and
        objects that hold the group — DDP's reducer sits in reference cycles — are collected
        while it is alive: freed after it, at interpreter exit, they can abort the process.
        """
        if dist.is_initialized():
            dist.barrier()
            gc.collect()
            dist.destroy_process_group()


def distributed_env() -> dict[str, str] | None:
    """torchrun's variables if this process was launched with ``WORLD_SIZE > 1``, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [key for key in _ENV if key not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; launch with "
            "torchrun (python -m torch.distributed.run)"
        )
    return {key: os.environ[key] for key in _ENV}


def init_distributed(
    backend: str | None = None, timeout_s: float = 1800.0
) -> DistributedContext:
    """The context of this process, starting the process group when launched by torchrun.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``MASTER_ADDR``/``MASTER_PORT`` are read
    by ``init_process_group``'s ``env://``). Without ``WORLD_SIZE > 1`` it returns the
    one-process :class:`DistributedContext` and starts nothing. ``backend`` defaults to NCCL
    when CUDA is available (this process then uses GPU ``LOCAL_RANK``), gloo otherwise.
    A group that is already initialised is reused.
    """
    env = distributed_env()
    if env is None:
        return DistributedContext()
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
    return DDPContext(rank=rank, world_size=world, local_rank=local, backend=backend)


# --------------------------------------------------------------------------- sharded state


def _sharded_heads(loss: nn.Module) -> list[tuple[str, PartialFC]]:
    return [
        (name, m) for name, m in loss.named_modules()
        if isinstance(m, PartialFC) and m.world_size > 1
    ]  # fmt: skip


def _gather_rows(shard: Tensor, head: PartialFC) -> Tensor:
    """The ``(num_classes, …)`` concatenation of every process's ``(num_local, …)`` rows."""
    sizes = [
        shard_range(head.num_classes, r, head.world_size) for r in range(head.world_size)
    ]
    longest = max(stop - start for start, stop in sizes)
    padded = shard.new_zeros((longest, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=head.process_group)
    return torch.cat([p[: stop - start] for p, (start, stop) in zip(parts, sizes, strict=True)])


def gather_sharded_state(
    loss: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(loss.state_dict(), optimizer.state_dict())`` with every sharded Partial FC weight —
    and each optimiser state tensor shaped like it (SGD's momentum) — gathered to all
    ``num_classes`` rows. A collective: every process must call it. Without sharded heads
    it is the two plain state dicts."""
    loss_state = loss.state_dict()
    optim_state = optimizer.state_dict()
    heads = _sharded_heads(loss)
    if not heads:
        return loss_state, optim_state
    ids = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    optim_state = {**optim_state, "state": dict(optim_state["state"])}
    for name, head in heads:
        key = f"{name}.weight".lstrip(".")
        loss_state[key] = _gather_rows(head.weight.detach(), head).cpu()
        index = ids.get(id(head.weight))
        entry = optim_state["state"].get(index) if index is not None else None
        if entry is None:
            continue
        entry = dict(entry)
        for field, value in sorted(entry.items()):
            if isinstance(value, Tensor) and value.shape == head.weight.shape:
                entry[field] = _gather_rows(value, head).cpu()
        optim_state["state"][index] = entry
    return loss_state, optim_state


def shard_loaded_state(loss: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a gathered checkpoint: cut each sharded
    Partial FC weight's optimiser state tensors (``(num_classes, D)``) to this process's
    rows. (``PartialFC.load_state_dict`` cuts the weight itself.)"""
    for _, head in _sharded_heads(loss):
        state = optimizer.state.get(head.weight)
        if not state:
            continue
        stop = head.class_start + head.num_local
        full = (head.num_classes, head.embedding_size)
        for field, value in list(state.items()):
            if isinstance(value, Tensor) and tuple(value.shape) == full:
                state[field] = value[head.class_start : stop].clone()


__all__ = [
    "DDPContext",
    "distributed_env",
    "gather_sharded_state",
    "init_distributed",
    "shard_loaded_state",
]
