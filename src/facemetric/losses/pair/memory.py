"""Cross-batch memory (Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding
Learning", CVPR 2020): pairs between this batch and the embeddings of earlier batches.

A P×K batch of 16 identities offers each anchor 15 identities as negatives. Once the network
changes slowly ("slow drift": the embedding of an image moves little from one step to the
next), the embeddings of the last few thousand images are nearly what the current network
would compute, so a pair loss can take them as extra references at the price of one
``B × M`` matrix product instead of ``M`` forward passes. The memory is a FIFO queue of
detached embeddings and their labels; the paper switches it on after a warm-up (its
``start_step`` here) because the early network drifts fast, and adds the memory's loss to
the batch's own rather than mixing the two sets of pairs in one loss.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from facemetric.losses.cross_rank import CrossRankStatistics, gather_rows
from facemetric.validation import check_embeddings


@runtime_checkable
class ReferenceLoss(Protocol):
    """A pair loss that can also pair its batch with references that carry no gradient."""

    def reference_loss(
        self, embeddings: Tensor, labels: Tensor, references: Tensor, reference_labels: Tensor
    ) -> Tensor:
        """The loss over the pairs ``(a, r)``: ``a`` in the batch, ``r`` a row of
        ``references`` (``(M, D)``, no gradient)."""
        ...


class CrossBatchMemory(CrossRankStatistics, nn.Module):
    """A pair loss on the batch plus the same loss between the batch and the last ``size``
    embeddings seen (Wang et al. 2020, their Algorithm 1)::

        L(x, y) = ℓ(x, y) + λ · ℓ_R(x, y; R)     R = the memory's (embedding, label) rows

    ``ℓ`` is the wrapped loss on the batch alone, ``ℓ_R`` its
    :meth:`ReferenceLoss.reference_loss`: every anchor of the batch against every row of
    ``R`` — a row of the same identity is a positive, any other a negative. ``R`` carries no
    gradient, so ``ℓ_R`` moves the anchors only. (Pairing the batch with ``R`` inside *one*
    N-pair softmax instead was tried and fails: the batch positives are pulled towards their
    anchors while the pushes on the negatives go almost all to memory rows, which cannot
    move, so every embedding drifts along one shared direction — measured: norms 9 → 32 in
    400 steps, the mean vector holding all but 0.4% of the norm; docs/benchmarks.md.)

    **Schedule**: a training-mode forward counts a step (buffer ``iteration``). Before
    ``start_step`` the memory is neither read nor written and ``L = ℓ``. From ``start_step``
    on, each training-mode forward computes ``ℓ_R`` against the memory *as it was before the
    call* (empty at first: ``L = ℓ``) and then enqueues the batch (detached), overwriting
    the oldest rows once ``size`` are held (a FIFO ring: buffer ``pointer`` is the next row
    to write, ``filled`` the rows held). An evaluation-mode forward reads the memory and
    changes nothing.

    **State**: the rows, labels and counters are buffers, so checkpoints hold them and a
    resumed run continues exactly. Under data parallelism (``statistics_group`` set by the
    training loop) every process enqueues the whole global batch (:func:`gather_rows`), so
    the memories stay identical; each process's loss still pairs only its own shard of the
    batch with them.

    Args:
        loss: a pair loss with ``reference_loss`` (N-pair, contrastive) and no miner (the
            memory pairs every anchor with every row).
        embedding_size: ``D``, the embeddings' width.
        size: ``M``, the rows the memory holds (≥ 1); the paper uses a few thousand to the
            whole dataset.
        start_step: the training step from which the memory is used (≥ 0).
        weight: ``λ`` (finite, > 0; the paper's 1).
    """

    memory: Tensor
    memory_labels: Tensor
    pointer: Tensor
    filled: Tensor
    iteration: Tensor

    def __init__(
        self,
        loss: nn.Module,
        embedding_size: int,
        size: int,
        start_step: int = 0,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(loss, ReferenceLoss):
            raise ValueError(
                f"CrossBatchMemory: {type(loss).__name__} cannot pair its batch with a memory "
                "(it has no reference_loss); use it with the N-pair or contrastive loss, or "
                "remove memory_size"
            )
        if getattr(loss, "miner", None) is not None:
            raise ValueError(
                f"CrossBatchMemory: {type(loss).__name__} has a miner, but the memory pairs "
                "every anchor with every row; remove the miner or memory_size"
            )
        for name, value, low in (("embedding_size", embedding_size, 1), ("size", size, 1),
                                 ("start_step", start_step, 0)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"CrossBatchMemory: {name} must be an integer >= {low}, "
                                 f"got {value!r}")
        if isinstance(weight, bool) or not (isinstance(weight, int | float)
                                            and math.isfinite(weight) and weight > 0):
            raise ValueError(f"CrossBatchMemory: weight must be a finite number > 0, got "
                             f"{weight!r}")
        self.loss = loss
        self.weight = float(weight)
        self.size = int(size)
        self.start_step = int(start_step)
        self.register_buffer("memory", torch.zeros(self.size, int(embedding_size)))
        self.register_buffer("memory_labels", torch.full((self.size,), -1, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    @property
    def active(self) -> bool:
        """Whether the next training-mode forward reads and writes the memory."""
        return int(self.iteration) >= self.start_step

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_embeddings(embeddings, labels)
        if embeddings.shape[1] != self.memory.shape[1]:
            raise ValueError(
                f"CrossBatchMemory: the embeddings have {embeddings.shape[1]} dimensions, the "
                f"memory holds {self.memory.shape[1]}; build it with the model's "
                "embedding_size"
            )
        active = self.active
        held = int(self.filled)
        value = self.loss(embeddings, labels)
        if active and held > 0:
            # copies: the graph keeps them for the backward pass, the enqueue below writes
            value = value + self.weight * self.loss.reference_loss(
                embeddings, labels, self.memory[:held].clone(), self.memory_labels[:held].clone()
            )
        if self.training:
            if active:
                rows, row_labels = gather_rows([embeddings.detach(), labels],
                                               self.statistics_group)
                self._enqueue(rows, row_labels)
            self.iteration += 1
        return value

    @torch.no_grad()
    def _enqueue(self, rows: Tensor, labels: Tensor) -> None:
        """Write ``rows`` at the ring's pointer, oldest rows first out."""
        rows, labels = rows[-self.size:], labels[-self.size:]  # a batch above the size
        n = rows.shape[0]
        where = (int(self.pointer) + torch.arange(n, device=rows.device)) % self.size
        self.memory[where] = rows.to(self.memory.dtype)
        self.memory_labels[where] = labels.to(torch.int64)
        self.pointer.fill_((int(self.pointer) + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def extra_repr(self) -> str:
        return f"size={self.size}, start_step={self.start_step}, weight={self.weight:g}"


__all__ = ["CrossBatchMemory", "ReferenceLoss"]
