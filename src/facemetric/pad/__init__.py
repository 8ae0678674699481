"""Presentation-attack detection (placeholder, filled below)."""
