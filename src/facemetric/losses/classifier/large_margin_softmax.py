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

    **Defaults are L-Softmax's own, not SphereFace's.** The paper starts from a very large
    ``λ`` (close to the plain softmax) and lowers it during training towards zero, the full
    margin ("a small value will usually suffice"); its authors' released models (the MNIST
    and CIFAR-10 definitions of the paper's code, ``m = 4``) use ``base = 1000``,
    ``gamma = 2.5e-5``, ``power = 35``, ``lambda_min = 0``: ``λ`` is 1000 at the start,
    ≈ 421 after 1k iterations, ≈ 35.6 after 4k, < 0.01 after 16k, and keeps falling.
    SphereFace (:class:`~facemetric.losses.SphereFaceLoss`) anneals faster and stops at
    ``λ = 5`` (``gamma = 0.12``, ``power = 1``, ``lambda_min = 5``). The paper's code counts
    ``it`` from 1 at the first forward, ours from 0: the schedule is the same one step later.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 2.5e-5,
        power: float = 35.0,
        lambda_min: float = 0.0,
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
