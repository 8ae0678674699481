"""Calibrated thresholds: a decision threshold always travels with the false-accept rate it
stands for and the evidence behind it.

Scores are cosine similarities; a comparison is *accepted* (same person) when
``score >= threshold``. Given ``N`` impostor scores ``s_1 ≥ s_2 ≥ … ≥ s_N`` (sorted
descending), the false-accept rate of threshold ``t`` is ``FAR(t) = #{s_i ≥ t} / N``. For a
target ``f`` the calibrated threshold is the smallest ``t`` with ``FAR(t) ≤ f``: with
``k = ⌊f·N⌋`` impostors allowed above it, ``t = nextafter(s_{k+1}, +∞)`` — just above the
``(k+1)``-th highest impostor score, so exactly ``k`` impostors are accepted.

A FAR the data cannot resolve is refused: ``f`` needs at least ``min_false_accepts``
impostor comparisons *above* the threshold (``f·N ≥ min_false_accepts``, default 1), i.e.
``N ≥ min_false_accepts / f`` — below that the threshold is set by the single most
similar impostor and says nothing about ``f`` (ISO/IEC 19795-1's "rule of 3" asks for
``N ≥ 3/f`` for 95% confidence in a zero-error claim; pass ``min_false_accepts=3`` to
follow it). Each table entry records ``N``, the number of false accepts it allows and the
true-accept rate on the genuine comparisons when they are given.

A table is stored as JSON with the fingerprint of the model it was calibrated on
(``calibration.json`` beside a training run's checkpoints, and in the metadata of an
exported ONNX file); a table meant for another model is refused on load.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facemetric.atomic import atomic_write_text

DEFAULT_FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
"""FARs :func:`calibrate` tries when none are given (the unresolvable ones are skipped)."""

CALIBRATION_FILE = "calibration.json"
"""File name of a run's threshold table."""


@dataclass(frozen=True)
class Threshold:
    """A decision threshold and what it means: accept when ``score >= value``; ``far`` is
    the false-accept rate it was calibrated at, on ``impostors`` comparisons."""

    value: float
    far: float
    impostors: int

    def accepts(self, score: float) -> bool:
        return bool(score >= self.value)


@dataclass(frozen=True)
class CalibrationEntry:
    """One row of a :class:`ThresholdTable`."""

    far: float
    threshold: float
    false_accepts: int
    impostors: int
    tar: float | None = None


@dataclass(frozen=True)
class ThresholdTable:
    """FAR → threshold for one model (its contract's fingerprint) on one labelled set."""

    model_fingerprint: str
    entries: tuple[CalibrationEntry, ...]
    source: str
    impostors: int
    genuines: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fars(self) -> tuple[float, ...]:
        return tuple(e.far for e in self.entries)

    def threshold(self, far: float) -> Threshold:
        """The threshold calibrated at ``far``; a FAR between two calibrated ones takes the
        nearest *stricter* entry (lower FAR), and the answer says which FAR it stands for.

        Raises:
            ValueError: ``far`` is below every calibrated FAR (the data could not resolve
                it): the message lists the calibrated FARs.
        """
        if not 0.0 < far < 1.0:
            raise ValueError(f"far must lie in (0, 1), got {far}")
        usable = [e for e in self.entries if e.far <= far * (1 + 1e-9)]
        if not usable:
            raise ValueError(
                f"no threshold for FAR {far:g}: this model was calibrated at FARs "
                f"{[f'{f:g}' for f in self.fars]} on {self.impostors} impostor comparisons "
                f"({self.source}); resolving {far:g} needs at least {1 / far:,.0f} — "
                "recalibrate with more (facemetric calibrate MODEL --folder ...)"
            )
        best = max(usable, key=lambda e: e.far)
        return Threshold(best.threshold, best.far, best.impostors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.model_fingerprint,
            "source": self.source,
            "impostors": self.impostors,
            "genuines": self.genuines,
            "entries": [asdict(e) for e in self.entries],
            "extra": self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ThresholdTable:
        try:
            entries = tuple(CalibrationEntry(**e) for e in raw["entries"])
            return cls(
                model_fingerprint=str(raw["model_fingerprint"]),
                entries=tuple(sorted(entries, key=lambda e: e.far)),
                source=str(raw["source"]),
                impostors=int(raw["impostors"]),
                genuines=int(raw["genuines"]),
                extra=dict(raw.get("extra", {})),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed threshold table: {err!r}") from err

    @classmethod
    def from_json(cls, text: str) -> ThresholdTable:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"the threshold table is not valid JSON: {err}") from err

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically as JSON."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str], fingerprint: str | None = None) -> ThresholdTable:
        """Read a table; with ``fingerprint`` refuse one calibrated for another model."""
        table = cls.from_json(Path(path).read_text(encoding="utf-8"))
        table.check_model(fingerprint, str(path))
        return table

    def check_model(self, fingerprint: str | None, where: str = "the threshold table") -> None:
        if fingerprint is not None and fingerprint != self.model_fingerprint:
            raise ValueError(
                f"{where} was calibrated for model {self.model_fingerprint[:12]}, not for this "
                f"model ({fingerprint[:12]}): recalibrate it (facemetric calibrate)"
            )

    def summary(self) -> str:
        lines = [f"thresholds on {self.impostors} impostor / {self.genuines} genuine "
                 f"comparisons ({self.source}):",
                 f"{'FAR':>10}{'threshold':>12}{'false acc.':>12}{'TAR':>9}"]
        for e in self.entries:
            tar = "" if e.tar is None else f"{100 * e.tar:.2f}%"
            lines.append(f"{e.far:>10.0e}{e.threshold:>12.5f}{e.false_accepts:>12}{tar:>9}")
        return "\n".join(lines)


def threshold_at_far(impostor_scores: np.ndarray, far: float, min_false_accepts: int = 1
                     ) -> tuple[float, int]:
    """``(threshold, false accepts allowed)`` for ``far`` (module docstring).

    Raises:
        ValueError: no scores, non-finite scores, ``far`` outside (0, 1), or a FAR the
            impostor count cannot resolve.
    """
    s = np.asarray(impostor_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no impostor scores to calibrate on")
    if not np.isfinite(s).all():
        raise ValueError("impostor scores contain NaN or Inf")
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must lie in (0, 1), got {far}")
    n = s.size
    k = math.floor(far * n * (1 + 1e-12))
    if k < min_false_accepts:
        raise ValueError(
            f"FAR {far:g} cannot be resolved from {n} impostor comparisons: it needs at least "
            f"{min_false_accepts / far:,.0f} (min_false_accepts={min_false_accepts})"
        )
    # the (k+1)-th highest score: partition instead of a full sort
    kth = np.partition(s, n - k - 1)[n - k - 1]
    return float(np.nextafter(kth, np.inf)), int(k)


def calibrate(
    impostor_scores: np.ndarray,
    model_fingerprint: str,
    *,
    genuine_scores: np.ndarray | None = None,
    fars: Sequence[float] | None = None,
    source: str = "",
    min_false_accepts: int = 1,
) -> ThresholdTable:
    """A :class:`ThresholdTable` from impostor (and optionally genuine) similarity scores.

    ``fars=None`` tries :data:`DEFAULT_FARS` and keeps those the data resolves; explicitly
    requested FARs that cannot be resolved raise ``ValueError``.
    """
    imp = np.asarray(impostor_scores, dtype=np.float64).ravel()
    gen = None if genuine_scores is None else np.asarray(genuine_scores, np.float64).ravel()
    if gen is not None and not np.isfinite(gen).all():
        raise ValueError("genuine scores contain NaN or Inf")
    explicit = fars is not None
    entries = []
    for far in sorted(set(fars if explicit else DEFAULT_FARS), reverse=True):
        try:
            thr, k = threshold_at_far(imp, far, min_false_accepts)
        except ValueError:
            if explicit:
                raise
            continue
        tar = None if gen is None or gen.size == 0 else float((gen >= thr).mean())
        entries.append(CalibrationEntry(far, thr, k, int(imp.size), tar))
    if not entries:
        raise ValueError(
            f"{imp.size} impostor comparisons resolve none of the FARs {list(DEFAULT_FARS)}: "
            "calibrate on a larger labelled set"
        )
    return ThresholdTable(
        model_fingerprint=model_fingerprint,
        entries=tuple(sorted(entries, key=lambda e: e.far)),
        source=source,
        impostors=int(imp.size),
        genuines=0 if gen is None else int(gen.size),
    )


def all_pair_scores(
    embeddings: np.ndarray, labels: np.ndarray, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """``(genuine, impostor)`` cosine scores of every unordered pair of rows, computed in
    ``chunk × n`` blocks (memory bounded by the output). Rows must be unit vectors."""
    e = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(labels)
    if e.ndim != 2 or len(e) != len(y):
        raise ValueError(f"embeddings (n, D) and labels (n,) disagree: {e.shape}, {y.shape}")
    if not np.isfinite(e).all():
        raise ValueError("embeddings contain NaN or Inf")
    genuine: list[np.ndarray] = []
    impostor: list[np.ndarray] = []
    n = len(e)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        sims = e[a:b] @ e[a:].T  # rows a..b against columns a..n
        rows, cols = np.triu_indices(b - a, k=1, m=n - a)
        s = sims[rows, cols]
        same = y[rows + a] == y[cols + a]
        genuine.append(s[same])
        impostor.append(s[~same])
    return np.concatenate(genuine), np.concatenate(impostor)


__all__ = [
    "CALIBRATION_FILE",
    "DEFAULT_FARS",
    "CalibrationEntry",
    "Threshold",
    "ThresholdTable",
    "all_pair_scores",
    "calibrate",
    "threshold_at_far",
]
