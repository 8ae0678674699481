"""The pair/tuple loss interface: ``loss(embeddings, labels, tuples=None) -> scalar``."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn

from facemetric.distances import Distance, EuclideanDistance
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, check_tuples
from facemetric.validation import check_embeddings


class TupleLoss(nn.Module):
    """Base of every pair/tuple loss.

    ``forward(embeddings, labels, tuples=None)``: tuples given explicitly win; otherwise the
    loss's ``miner`` (if any) picks them; otherwise the loss forms every valid tuple of the
    batch itself. Input is checked first (shapes, NaN, label dtype, tuple indices), and a
    batch whose labels form no positive pair raises ``ValueError`` — there is nothing to
    pull together, which means the sampler is misconfigured (use ``PKSampler`` with k ≥ 2).
    Mined tuple sets that come back empty give a loss of 0 that is still connected to the
    graph (``embeddings.sum() * 0``), so a training step never breaks on an easy batch.
    """

    #: set False in losses that can work without a positive pair (none here do)
    needs_positive_pair: bool = True

    def __init__(self, distance: Distance | None = None, miner: Miner | None = None) -> None:
        super().__init__()
        self.distance: Distance = EuclideanDistance() if distance is None else distance
        self.miner = miner

    def forward(
        self, embeddings: Tensor, labels: Tensor, tuples: Pairs | Triplets | None = None
    ) -> Tensor:
        check_embeddings(embeddings, labels)
        if self.needs_positive_pair and not has_positive_pair(labels):
            raise ValueError(
                f"{type(self).__name__}: the batch of {labels.numel()} labels has no two "
                "samples of the same identity, so no positive pair exists; sample batches "
                "with several images per identity (facemetric.samplers.PKSampler, k >= 2)"
            )
        if tuples is None and self.miner is not None:
            tuples = self.miner(embeddings, labels)
        if tuples is not None:
            check_tuples(tuples, embeddings.shape[0])
        return self.compute(embeddings, labels, tuples)

    @abstractmethod
    def compute(
        self, embeddings: Tensor, labels: Tensor, tuples: Pairs | Triplets | None
    ) -> Tensor:
        """The loss on checked input; ``tuples=None`` means all valid tuples of the batch."""


def has_positive_pair(labels: Tensor) -> bool:
    """Whether at least two entries of ``labels`` are equal."""
    return bool(torch.unique(labels).numel() < labels.numel())


def zero_loss(embeddings: Tensor) -> Tensor:
    """A 0 loss that keeps the graph (for an empty set of mined tuples)."""
    return embeddings.sum() * 0.0
