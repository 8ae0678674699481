"""Plain softmax classifier loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import ClassifierLoss, linear_cross_entropy


class SoftmaxLoss(ClassifierLoss):
    """Softmax cross-entropy of a linear classifier with bias.

    ``ℓ = mean_b −log softmax(x_b·Wᵀ + β)[y_b]`` (mean over the batch). ``.weight`` is
    ``(num_classes, embedding_size)`` and ``.bias`` ``(num_classes,)``, as in ``nn.Linear``.
    The reference point of the margin losses (e.g. Taigman et al. 2014, DeepFace).
    """

    def __init__(
        self, num_classes: int, embedding_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        super().__init__(num_classes, embedding_size)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.chunk_size = int(chunk_size)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_input(embeddings, labels)
        return linear_cross_entropy(
            embeddings, self.weight, self.bias, labels, chunk_size=self.chunk_size
        )
