"""Cross-batch memory (Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding
Learning", CVPR 2020): pairs between this batch and the embeddings of earlier batches.

A P×K batch of 16 identities offers each anchor 15 identities as negatives. Once the network
changes slowly ("slow drift": the embedding of an image moves little from one step to the
next), the embeddings of the last few thousand images are nearly what the current network
would compute, so a pair loss can take them as extra references at the price of one
``B × M`` matrix product instead of ``M`` forward passes. The memory is a FIFO queue of
detached embeddings and their labels; the paper switches it on after a warm-up (its
``start_step`` here) because the early network drifts fast.
"""

from __future__ import annotations

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
        """The loss over the pairs ``(a, j)``: ``a`` in the batch, ``j`` in the batch
        (``j ≠ a``) or among ``references`` (``(M, D)``, detached)."""
        ...


class CrossBatchMemory(CrossRankStatistics, nn.Module):
    """A pair loss whose batch is also paired with the last ``size`` embeddings it saw::

        L(x, y) = ℓ(x, y; R)     R = the memory's (embedding, label) rows, no gradient

    where ``ℓ(·; R)`` is the wrapped loss's :meth:`ReferenceLoss.reference_loss`: every
    anchor of the batch is paired with the other samples of the batch and with every row of
    ``R`` — a row of the same identity is a positive, any other a negative.

    **Schedule**: a training-mode forward counts a step (buffer ``iteration``). Before
    ``start_step`` the memory is neither read nor written and the value is the wrapped loss
    alone. From ``start_step`` on, each training-mode forward computes the loss against the
    memory *as it was before the call* and then enqueues the batch (detached), overwriting the
    oldest rows once ``size`` are held (a FIFO ring: buffer ``pointer`` is the next row to
    write, ``filled`` the rows held). An evaluation-mode forward reads the memory and changes
    nothing.

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
    """

    memory: Tensor
    memory_labels: Tensor
    pointer: Tensor
    filled: Tensor
    iteration: Tensor

    def __init__(
        self, loss: nn.Module, embedding_size: int, size: int, start_step: int = 0
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
        self.loss = loss
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
        if active and held > 0:
            value = self.loss.reference_loss(
                embeddings, labels, self.memory[:held], self.memory_labels[:held]
            )
        else:
            value = self.loss(embeddings, labels)
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
        return f"size={self.size}, start_step={self.start_step}"


def reference_masks(
    labels: Tensor, reference_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """``(B, B + M)`` boolean masks of positive and negative pairs between a batch and the
    columns ``[batch, references]``: same label (the anchor's own column excluded), and
    different label."""
    columns = torch.cat([labels, reference_labels.to(labels.device)])
    same = labels[:, None] == columns[None, :]
    pos = same.clone()
    pos[:, : labels.numel()].fill_diagonal_(False)
    return pos, ~same


__all__ = ["CrossBatchMemory", "ReferenceLoss", "reference_masks"]
