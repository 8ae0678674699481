"""L2-constrained softmax (Ranjan et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import ClassifierLoss, linear_cross_entropy


class L2SoftmaxLoss(ClassifierLoss):
    """L2-softmax: features L2-normalised and scaled by α, then the ordinary linear softmax.

    ``ℓ = mean_b −log softmax(α·x_b/‖x_b‖·Wᵀ + β)[y_b]`` (mean over the batch); the centres
    and bias are not normalised. Ranjan, Castillo, Chellappa, "L2-constrained Softmax Loss
    for Discriminative Face Verification", 2017. Their lower bound for α is
    ``log(p·(C−2)/(1−p))`` for a target probability ``p``; the default 16 suits a few
    thousand classes.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        alpha: float = 16.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"L2SoftmaxLoss: alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.chunk_size = int(chunk_size)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_input(embeddings, labels)
        return linear_cross_entropy(
            embeddings,
            self.weight,
            self.bias,
            labels,
            scale=self.alpha,
            normalize_features=True,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
