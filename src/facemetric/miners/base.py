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

    Subclasses implement ``mine``; calling the miner checks the input first.
    """

    def __init__(self, distance: Distance | None = None) -> None:
        self.distance: Distance = EuclideanDistance() if distance is None else distance

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Pairs | Triplets:
        check_embeddings(embeddings, labels)
        with torch.no_grad():
            return self.mine(embeddings.detach(), labels)

    @abstractmethod
    def mine(self, embeddings: Tensor, labels: Tensor) -> Pairs | Triplets:
        """Return the mined tuples for a checked batch."""
