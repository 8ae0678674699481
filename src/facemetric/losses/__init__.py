"""Losses that shape a face-embedding space.

- Pair/tuple losses (:mod:`facemetric.losses.pair`): ``loss(embeddings, labels, tuples=None)``,
  with an optional miner and a distance object.
- Classifier losses (:mod:`facemetric.losses.classifier`): own their class centres
  ``.weight`` (``num_classes × embedding_size``), ``loss(embeddings, labels)``; the margins
  (:mod:`facemetric.losses.margins`) are separate parts that any normalised head, Partial FC
  included, takes.
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
from facemetric.losses.margins import (
    ArcMargin,
    CombinedMargin,
    CosMargin,
    DynamicArcMargin,
    Margin,
    MultiplicativeAngularMargin,
    NoMargin,
)
from facemetric.losses.pair import (
    ContrastiveLoss,
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
    "DynamicArcMargin",
    "DynamicMarginArcFaceLoss",
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
    "SoftmaxLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "TripletLoss",
    "TupleLoss",
    "margin_cross_entropy",
]
