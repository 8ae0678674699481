"""Losses that shape a face-embedding space.

- Pair/tuple losses (:mod:`facemetric.losses.pair`): ``loss(embeddings, labels, tuples=None)``,
  with an optional miner and a distance object.
- Classifier losses (:mod:`facemetric.losses.classifier`): own their class centres
  ``.weight`` (``num_classes × embedding_size``), ``loss(embeddings, labels)``; the margins
  (:mod:`facemetric.losses.margins`) are separate parts that any normalised head, Partial FC
  included, takes.
- :class:`~facemetric.losses.combined.WeightedLossSum`: ``Σ w_i·ℓ_i(x, y)``, e.g. a pair
  loss beside a classifier loss (a config's ``[[aux_loss]]`` sections).
- Distillation losses (:mod:`facemetric.losses.distillation`): ``loss(student, teacher)``
  against a teacher's embeddings of the same images, and ``DistillationObjective`` adding
  them to a label loss (built from a config's ``[distill]`` section, not from ``[loss]``).
"""

from facemetric.losses.center import CenterLoss
from facemetric.losses.classifier import (
    AdaCosLoss,
    ArcFaceLoss,
    ClassifierLoss,
    CombinedMarginLoss,
    CosFaceLoss,
    DynamicMarginArcFaceLoss,
    L2SoftmaxLoss,
    LargeMarginSoftmaxLoss,
    NormalizedClassifierLoss,
    NormFaceLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    margin_cross_entropy,
)
from facemetric.losses.combined import WeightedLossSum
from facemetric.losses.distillation import (
    DistillationObjective,
    EmbeddingDistillationLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    SimilarityMatrixLoss,
)
from facemetric.losses.margins import (
    ArcMargin,
    CombinedMargin,
    CosMargin,
    DynamicArcMargin,
    Margin,
    MultiplicativeAngularMargin,
    NoMargin,
    WarmupMargin,
)
from facemetric.losses.pair import (
    ContrastiveLoss,
    CrossBatchMemory,
    FacilityLocationLoss,
    HierarchicalTripletLoss,
    LiftedStructureLoss,
    MagnetLoss,
    MultiSimilarityLoss,
    NPairLoss,
    QuadrupletLoss,
    TripletLoss,
    TupleLoss,
)

__all__ = [
    "AdaCosLoss",
    "ArcFaceLoss",
    "ArcMargin",
    "CenterLoss",
    "ClassifierLoss",
    "CombinedMargin",
    "CombinedMarginLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CosMargin",
    "CrossBatchMemory",
    "DistillationObjective",
    "DynamicArcMargin",
    "DynamicMarginArcFaceLoss",
    "EmbeddingDistillationLoss",
    "FacilityLocationLoss",
    "HierarchicalTripletLoss",
    "L2SoftmaxLoss",
    "LargeMarginSoftmaxLoss",
    "LiftedStructureLoss",
    "MagnetLoss",
    "Margin",
    "MultiSimilarityLoss",
    "MultiplicativeAngularMargin",
    "NPairLoss",
    "NoMargin",
    "NormFaceLoss",
    "NormalizedClassifierLoss",
    "QuadrupletLoss",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "SimilarityMatrixLoss",
    "SoftmaxLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "TripletLoss",
    "TupleLoss",
    "WarmupMargin",
    "WeightedLossSum",
    "margin_cross_entropy",
]
