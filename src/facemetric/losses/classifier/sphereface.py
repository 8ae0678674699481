"""SphereFace / A-Softmax (Liu et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss, work_dtype
from facemetric.losses.margins import MultiplicativeAngularMargin


class SphereFaceLoss(NormalizedClassifierLoss):
    """A-Softmax: normalised centres, un-normalised features, multiplicative angular margin.

    Logits ``‖x_b‖·cos θ_bc`` for ``c ≠ y``, target ``‖x_b‖·ψ_λ(θ_by)`` with
    ``ψ(θ) = (−1)^k cos(mθ) − 2k`` on ``[kπ/m, (k+1)π/m]`` annealed as
    ``ψ_λ = (λ cos θ + ψ(θ))/(1 + λ)``, ``λ = max(lambda_min, base·(1 + gamma·it)^(−power))``,
    ``it`` counting training-mode forward calls (see
    :class:`~facemetric.losses.margins.MultiplicativeAngularMargin`). ``ℓ`` is the mean over
    the batch of the cross-entropy; ``scale`` multiplies ``‖x_b‖`` (1 in the paper).
    The gradient flows through ``‖x_b‖`` too. Liu et al., "SphereFace: Deep Hypersphere
    Embedding for Face Recognition", CVPR 2017.
    """

    margin: MultiplicativeAngularMargin

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        scale: float = 1.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        margin = MultiplicativeAngularMargin(m, base, gamma, power, lambda_min)
        super().__init__(num_classes, embedding_size, margin, scale, chunk_size=chunk_size)

    def batch_scale(self, embeddings: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(embeddings.to(work_dtype(embeddings)), dim=1)
        return norms * self.scale if self.scale != 1.0 else norms
