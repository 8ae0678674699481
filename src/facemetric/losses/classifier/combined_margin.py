"""Combined margin loss (InsightFace's cos(m1·θ + m2) − m3)."""

from __future__ import annotations

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.margins import CombinedMargin


class CombinedMarginLoss(NormalizedClassifierLoss):
    """Target logit ``s·(cos(m1·θ_y + m2) − m3)``, others ``s·cos θ_c``.

    ``ℓ = mean_b −log softmax(z_b)[y_b]`` (mean over the batch), features and centres
    normalised. ``(1, m, 0)`` is ArcFace and ``(1, 0, m)`` CosFace exactly; ``m1 > 1`` a
    SphereFace-style multiplicative margin. The behaviour past ``m1·θ + m2 > π`` is that of
    :class:`~facemetric.losses.margins.CombinedMargin`. Introduced with ArcFace (Deng et al.,
    CVPR 2019, §3.3).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        fallback: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            CombinedMargin(m1, m2, m3, fallback=fallback),
            scale,
            chunk_size=chunk_size,
        )
