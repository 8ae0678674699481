"""NormFace (Wang et al. 2017)."""

from __future__ import annotations

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.margins import NoMargin


class NormFaceLoss(NormalizedClassifierLoss):
    """Normalised softmax: normalised features and centres, a scale, no margin.

    ``ℓ = mean_b −log softmax(s·cos θ_b)[y_b]`` (mean over the batch), ``cos θ_bc =
    x_b·w_c/(‖x_b‖‖w_c‖)``. Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding
    for Face Verification", 2017.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 16.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(num_classes, embedding_size, NoMargin(), scale, chunk_size=chunk_size)
