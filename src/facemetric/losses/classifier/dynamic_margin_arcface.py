"""ArcFace with per-class dynamic margins (Google Landmark Recognition 2020 winners)."""

from __future__ import annotations

from torch import Tensor

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.margins import DynamicArcMargin


class DynamicMarginArcFaceLoss(NormalizedClassifierLoss):
    """ArcFace whose margin depends on the class size: ``m_c = a·n_c^(−λ) + b``.

    Target logit ``s·cos(θ_y + m_y)``, others ``s·cos θ_c``; mean over the batch of the
    cross-entropy. Rare classes get larger margins. ``class_counts`` ``(num_classes,)`` are
    the training-set counts ``n_c ≥ 1``. ArcFace's fallback applies per class (see
    :class:`~facemetric.losses.margins.DynamicArcMargin`). Ha, Liu, Liu, Liao, "Google
    Landmark Recognition 2020 Competition Third Place Solution", arXiv:2010.05350.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        class_counts: Tensor,
        a: float,
        b: float,
        lam: float,
        scale: float = 30.0,
        fallback: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        margin = DynamicArcMargin.from_counts(class_counts, a, b, lam, fallback=fallback)
        if margin.margins.numel() != num_classes:
            raise ValueError(
                f"DynamicMarginArcFaceLoss: class_counts has {margin.margins.numel()} entries "
                f"for {num_classes} classes"
            )
        super().__init__(num_classes, embedding_size, margin, scale, chunk_size=chunk_size)
