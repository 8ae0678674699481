"""The miner interface: ``(embeddings, labels) -> Pairs | Triplets``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from facemetric.distances import Distance, EuclideanDistance
from facemetric.tuples import Pairs, Triplets
from facemetric.validation import check_embeddings


class Miner(ABC):
    """Picks informative tuples from a batch. Runs without gradient; returns batch indices.

    Subclasses implement ``mine``; calling the miner checks the input first. A loss that
    already computed the batch's distance matrix with the miner's own distance object passes
    it in (``distance_matrix``), so the ``B × B`` matrix is built once per step.
    """

    def __init__(self, distance: Distance | None = None) -> None:
        self.distance: Distance = EuclideanDistance() if distance is None else distance

    def __call__(
        self, embeddings: Tensor, labels: Tensor, distance_matrix: Tensor | None = None
    ) -> Pairs | Triplets:
        check_embeddings(embeddings, labels)
        return self.mine_checked(embeddings, labels, distance_matrix)

    def mine_checked(
        self, embeddings: Tensor, labels: Tensor, distance_matrix: Tensor | None = None
    ) -> Pairs | Triplets:
        """``__call__`` without the input checks, for callers that already made them."""
        with torch.no_grad():
            emb = embeddings.detach()
            dist = self.distance.matrix(emb) if distance_matrix is None else distance_matrix
            return self.mine(emb, labels, dist.detach())

    @abstractmethod
    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Pairs | Triplets:
        """Return the mined tuples for a checked batch; ``dist`` is ``self.distance.matrix``."""
