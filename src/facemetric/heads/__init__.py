"""Classification heads that scale beyond one dense softmax: Partial FC (sampled, sharded
class centres reusing any margin of :mod:`facemetric.losses.margins`)."""

from facemetric.heads.partial_fc import PartialFC, sample_count, shard_range

__all__ = ["PartialFC", "sample_count", "shard_range"]
