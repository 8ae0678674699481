"""Experiments: what trains several runs and reports on them — ``compare`` (losses side by
side on one budget), the LFW demo (``make demo``) and the ORL example. They use the library;
nothing in the library imports them."""
