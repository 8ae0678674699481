"""Miners: pick informative pairs/triplets of a batch for the pair losses."""

from facemetric.miners.base import Miner
from facemetric.miners.batch_all import BatchAllMiner
from facemetric.miners.batch_hard import BatchHardMiner
from facemetric.miners.distance_weighted import DistanceWeightedMiner
from facemetric.miners.global_index import EmbeddingIndex, HardIdentitySampler, IndexRefresher
from facemetric.miners.multi_similarity import MultiSimilarityMiner
from facemetric.miners.semi_hard import SemiHardMiner

__all__ = [
    "BatchAllMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "EmbeddingIndex",
    "HardIdentitySampler",
    "IndexRefresher",
    "Miner",
    "MultiSimilarityMiner",
    "SemiHardMiner",
]
