"""L-Softmax / large-margin softmax (Liu et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.losses.classifier.chunked import (
    DEFAULT_CHUNK_SIZE,
    NORM_EPS,
    HeadSpec,
    chunked_cross_entropy,
)
from facemetric.losses.classifier.head import ClassifierLoss, work_dtype
from facemetric.losses.margins import MultiplicativeAngularMargin


class LargeMarginSoftmaxLoss(ClassifierLoss):
    """L-Softmax: a linear classifier without bias whose target logit gets an angular margin.

    Logits ``‖w_c‖‖x_b‖cos θ_bc = x_b·w_c`` for ``c ≠ y``, target
    ``‖w_y‖‖x_b‖·(λ cos θ_by + ψ(θ_by))/(1 + λ)`` with ``ψ(θ) = (−1)^k cos(mθ) − 2k`` on
    ``[kπ/m, (k+1)π/m]``, ``cos(mθ)`` the Chebyshev polynomial of ``cos θ``, and
    ``λ = max(lambda_min, base·(1 + gamma·it)^(−power))``, ``it`` counting training-mode
    forward calls (see :class:`~facemetric.losses.margins.MultiplicativeAngularMargin`).
    ``ℓ`` is the mean over the batch of the cross-entropy. ``m = 1`` is the plain softmax
    without bias. Gradients flow through both norms. Liu, Wen, Yu, Yang, "Large-Margin
    Softmax Loss for Convolutional Neural Networks", ICML 2016.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        self.margin = MultiplicativeAngularMargin(m, base, gamma, power, lambda_min)
        self.chunk_size = int(chunk_size)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_input(embeddings, labels)
        work = work_dtype(embeddings, self.weight)
        x = embeddings.to(work)
        labels = labels.long()

        def target(u: Tensor, weight_norm: Tensor) -> Tensor:
            # u = x̂·w_y = ‖w_y‖·cos θ; the head multiplies by ‖x‖
            norm = weight_norm.clamp(min=NORM_EPS)
            return norm * self.margin(u / norm, labels)

        spec = HeadSpec(target, False, True, 1, self.chunk_size)
        norms = torch.linalg.vector_norm(x, dim=1)
        return chunked_cross_entropy(x, self.weight.to(work), labels, spec, norms)
