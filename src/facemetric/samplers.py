"""Batch samplers (``facemetric.samplers.PKSampler``); they live in ``facemetric.data``."""

from facemetric.data.samplers import PKSampler

__all__ = ["PKSampler"]
