"""Pair and tuple losses: ``loss(embeddings, labels, tuples=None)``; ``CrossBatchMemory``
pairs a batch with the embeddings of earlier batches too."""

from facemetric.losses.pair.base import TupleLoss
from facemetric.losses.pair.contrastive import ContrastiveLoss
from facemetric.losses.pair.facility_location import FacilityLocationLoss
from facemetric.losses.pair.hierarchical_triplet import (
    AnchorNeighborSampler,
    ClassTree,
    HierarchicalTripletLoss,
)
from facemetric.losses.pair.lifted_structure import LiftedStructureLoss
from facemetric.losses.pair.magnet import MagnetBatchSampler, MagnetClusterIndex, MagnetLoss
from facemetric.losses.pair.memory import CrossBatchMemory
from facemetric.losses.pair.multi_similarity import MultiSimilarityLoss
from facemetric.losses.pair.npair import NPairLoss
from facemetric.losses.pair.quadruplet import QuadrupletLoss
from facemetric.losses.pair.triplet import TripletLoss

__all__ = [
    "AnchorNeighborSampler",
    "ClassTree",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "FacilityLocationLoss",
    "HierarchicalTripletLoss",
    "LiftedStructureLoss",
    "MagnetBatchSampler",
    "MagnetClusterIndex",
    "MagnetLoss",
    "MultiSimilarityLoss",
    "NPairLoss",
    "QuadrupletLoss",
    "TripletLoss",
    "TupleLoss",
]
