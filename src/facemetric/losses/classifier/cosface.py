"""CosFace / large margin cosine loss (Wang et al. 2018)."""

from __future__ import annotations

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.margins import CosMargin


class CosFaceLoss(NormalizedClassifierLoss):
    """Additive cosine margin: target logit ``s·(cos θ_y − m)``, others ``s·cos θ_c``.

    ``ℓ = mean_b −log [e^{s(cos θ_by − m)} / (e^{s(cos θ_by − m)} + Σ_{c≠y} e^{s cos θ_bc})]``
    (mean over the batch), features and centres normalised. Wang et al., "CosFace: Large
    Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 64.0,
        margin: float = 0.35,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, CosMargin(margin), scale, chunk_size=chunk_size
        )
