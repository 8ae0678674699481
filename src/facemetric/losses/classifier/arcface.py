"""ArcFace / additive angular margin loss (Deng et al. 2019)."""

from __future__ import annotations

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.margins import ArcMargin


class ArcFaceLoss(NormalizedClassifierLoss):
    """Additive angular margin: target logit ``s·cos(θ_y + m)``, others ``s·cos θ_c``.

    ``ℓ = mean_b −log softmax(z_b)[y_b]`` (mean over the batch), features and centres
    normalised. Where ``θ_y > π − m`` (so ``θ_y + m`` would pass π and the target rise again)
    the target is ``s·(cos θ_y − m·sin m)`` instead when ``fallback=True`` (default); both
    pieces are differentiated exactly (see :class:`~facemetric.losses.margins.ArcMargin`).
    Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
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
            chunk_size=chunk_size,
        )
