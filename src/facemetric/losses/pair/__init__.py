"""Pair and tuple losses: ``loss(embeddings, labels, tuples=None)``."""

from facemetric.losses.pair.base import TupleLoss
from facemetric.losses.pair.contrastive import ContrastiveLoss
from facemetric.losses.pair.lifted_structure import LiftedStructureLoss
from facemetric.losses.pair.multi_similarity import MultiSimilarityLoss
from facemetric.losses.pair.npair import NPairLoss
from facemetric.losses.pair.quadruplet import QuadrupletLoss
from facemetric.losses.pair.triplet import TripletLoss

__all__ = [
    "ContrastiveLoss",
    "LiftedStructureLoss",
    "MultiSimilarityLoss",
    "NPairLoss",
    "QuadrupletLoss",
    "TripletLoss",
    "TupleLoss",
]
