"""Sub-center ArcFace (Deng et al. 2020)."""

from __future__ import annotations

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.margins import ArcMargin


class SubCenterArcFaceLoss(NormalizedClassifierLoss):
    """ArcFace with ``k`` sub-centres per class: ``cos θ_bc = max_j cos(x_b, w_{c,j})``.

    ``.weight`` is ``(num_classes·k, embedding_size)``; the rows of class ``c`` are
    contiguous, ``c·k … c·k + k − 1``. Then the ArcFace loss on the pooled cosines (target
    ``s·cos(θ_y + m)`` with :class:`~facemetric.losses.margins.ArcMargin`'s fallback), mean
    over the batch; the gradient of a class's cosine goes to the sub-centre that attained
    the max. Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale
    Noisy Web Faces", ECCV 2020.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        k: int = 3,
        scale: float = 64.0,
        margin: float = 0.5,
        fallback: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            ArcMargin(margin, fallback=fallback),
            scale,
            subcenters=k,
            chunk_size=chunk_size,
        )
