"""Softmax-family classifier losses: a class-centre matrix ``.weight`` and a cross-entropy.

Every loss is ``loss(embeddings (B, D), labels (B,)) -> scalar`` (mean over the batch).
The normalised ones are :class:`NormalizedClassifierLoss` with a named margin from
:mod:`facemetric.losses.margins`; :func:`margin_cross_entropy` is the same head as a
function of any centre rows (the seam Partial FC uses).
"""

from facemetric.losses.classifier.adacos import AdaCosLoss
from facemetric.losses.classifier.arcface import ArcFaceLoss
from facemetric.losses.classifier.combined_margin import CombinedMarginLoss
from facemetric.losses.classifier.cosface import CosFaceLoss
from facemetric.losses.classifier.dynamic_margin_arcface import DynamicMarginArcFaceLoss
from facemetric.losses.classifier.head import (
    ClassifierLoss,
    NormalizedClassifierLoss,
    margin_cross_entropy,
)
from facemetric.losses.classifier.l2_softmax import L2SoftmaxLoss
from facemetric.losses.classifier.large_margin_softmax import LargeMarginSoftmaxLoss
from facemetric.losses.classifier.normface import NormFaceLoss
from facemetric.losses.classifier.softmax import SoftmaxLoss
from facemetric.losses.classifier.sphereface import SphereFaceLoss
from facemetric.losses.classifier.subcenter_arcface import SubCenterArcFaceLoss

__all__ = [
    "AdaCosLoss",
    "ArcFaceLoss",
    "ClassifierLoss",
    "CombinedMarginLoss",
    "CosFaceLoss",
    "DynamicMarginArcFaceLoss",
    "L2SoftmaxLoss",
    "LargeMarginSoftmaxLoss",
    "NormFaceLoss",
    "NormalizedClassifierLoss",
    "SoftmaxLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "margin_cross_entropy",
]
