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

    Losses built on the ``B × B`` distance matrix (``uses_distance_matrix = True``) get it in
    ``compute`` as ``dist`` (with gradient); when the miner uses the same distance object (the
    default: a loss given a miner and no distance adopts the miner's) the miner receives that
    matrix detached instead of building its own.
    """

    #: set False in losses that can work without a positive pair
    needs_positive_pair: bool = True
    #: set False in losses that never look at the pairwise distance matrix
    uses_distance_matrix: bool = True

    def __init__(self, distance: Distance | None = None, miner: Miner | None = None) -> None:
        super().__init__()
        if distance is None:
            distance = miner.distance if miner is not None else EuclideanDistance()
        self.distance: Distance = distance
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
        dist = self.distance.matrix(embeddings) if self.uses_distance_matrix else None
        if tuples is None and self.miner is not None:
            shared = dist if dist is not None and self.miner.distance is self.distance else None
            tuples = self.miner.mine_checked(embeddings, labels, shared)
        if tuples is not None:
            check_tuples(tuples, embeddings.shape[0])
        return self.compute(embeddings, labels, tuples, dist)

    @abstractmethod
    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        """The loss on checked input; ``tuples=None`` means all valid tuples of the batch.

        ``dist`` is ``self.distance.matrix(embeddings)`` (with gradient) when
        ``uses_distance_matrix`` is set, else ``None``.
        """


def has_positive_pair(labels: Tensor) -> bool:
    """Whether at least two entries of ``labels`` are equal."""
    return bool(torch.unique(labels).numel() < labels.numel())


def zero_loss(embeddings: Tensor) -> Tensor:
    """A 0 loss that keeps the graph (for an empty set of mined tuples)."""
    return embeddings.sum() * 0.0
