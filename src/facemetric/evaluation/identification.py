"""Face identification (1:N): closed-set CMC, open-set DIR at FPIR, gallery/probe splits.

Scores
------
A probe is compared with every gallery image by cosine similarity (``normalize=True``; the
inner product of the raw embeddings otherwise). A gallery may hold several images of one
identity: the probe's score for an identity is the **maximum** over that identity's images
(the nearest enrolled image decides). Probe × gallery blocks are computed ``chunk_size``
probes at a time, so memory stays ``O(chunk_size × gallery size)``.

Closed set: CMC
---------------
The rank of a probe is the number of gallery identities whose score is ≥ the score of its
true identity (its own included): ties are broken **against** the probe, so degenerate
embeddings (all scores equal) get the worst rank, not rank 1. ``CMC(r)`` is the fraction of
probes of rank ≤ r, for ``r = 1..num_identities``. Every probe must be enrolled.

Post-processing (``postprocess=``, a :class:`facemetric.index.PostProcessing`)
--------------------------------------------------------------------------------
Each probe's ``shortlist_size`` best gallery images by cosine are reordered (query
expansion, database-side augmentation, k-reciprocal re-ranking); identities are ranked by
their first image in that order, and identities with no image in the shortlist follow,
ranked by score as above. An identity's *score* stays its best-image cosine, so the
open-set top score is the cosine of the re-ranked first identity (the threshold keeps its
meaning). It needs ``normalize=True``.

Open set: DIR at FPIR (Grother et al., NIST FRVT / ISO/IEC 19795-1)
-------------------------------------------------------------------
Mated probes have an enrolled identity; non-mated probes must be rejected. With a threshold
``τ`` on the top identity score:

- ``FPIR(τ)`` = fraction of non-mated probes whose top score is ≥ ``τ``;
- ``DIR(τ)``  = fraction of mated probes whose true identity is at rank 1 with score ≥ ``τ``.

For a target FPIR ``f`` over ``M`` non-mated probes the threshold is the smallest ``τ`` with
``FPIR(τ) ≤ f``: just above the ``(⌊f·M⌋ + 1)``-th largest non-mated top score. Targets below
``1/M`` cannot be resolved and are reported as ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from facemetric.evaluation._arrays import (
    check_embeddings,
    normalize_rows,
    rows_per_block,
    to_numpy,
)

if TYPE_CHECKING:
    from facemetric.index.rerank import PostProcessing

DEFAULT_FPIR_TARGETS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
_DEFAULT_BLOCK_BYTES = 256 * 2**20
_RATE_RTOL = 1e-9


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class _Gallery:
    embeddings: Tensor  # (G, D), normalised if asked
    identity_of: Tensor  # (G,) int64 index into ``identities``
    identities: np.ndarray  # (I,) distinct gallery labels, sorted


def _prepare(
    gallery: Any, gallery_labels: Any, probes: Any, probe_labels: Any, normalize: bool
) -> tuple[_Gallery, Tensor, np.ndarray]:
    g = check_embeddings(gallery, "gallery")
    p = check_embeddings(probes, "probes")
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"gallery and probes differ in dimension: {g.shape[1]} vs {p.shape[1]}")
    dtype = torch.float64 if torch.float64 in (g.dtype, p.dtype) else torch.float32
    g, p = g.to(dtype), p.to(dtype)
    if normalize:
        g, p = normalize_rows(g), normalize_rows(p)
    gl = to_numpy(gallery_labels)
    pl = to_numpy(probe_labels)
    if gl.shape != (g.shape[0],):
        raise ValueError(f"gallery_labels must have shape ({g.shape[0]},), got {gl.shape}")
    if pl.shape != (p.shape[0],):
        raise ValueError(f"probe_labels must have shape ({p.shape[0]},), got {pl.shape}")
    identities, identity_of = np.unique(gl, return_inverse=True)
    # Probe label -> identity index, or -1 when the identity is not enrolled.
    pos = np.clip(np.searchsorted(identities, pl), 0, identities.shape[0] - 1)
    probe_identity = np.where(identities[pos] == pl, pos, -1).astype(np.int64)
    gallery_set = _Gallery(
        g, torch.from_numpy(identity_of.reshape(-1).astype(np.int64)), identities
    )
    return gallery_set, p, probe_identity


def _identity_scores(gal: _Gallery, probes: Tensor) -> Tensor:
    """``(c, I)`` best score of each probe against each identity's images."""
    sims = probes @ gal.embeddings.T
    num_ids = gal.identities.shape[0]
    out = torch.full((probes.shape[0], num_ids), -torch.inf, dtype=sims.dtype)
    index = gal.identity_of.unsqueeze(0).expand_as(sims)
    return out.scatter_reduce_(1, index, sims, reduce="amax")


def _check_postprocess(postprocess: PostProcessing | None, normalize: bool) -> None:
    if postprocess is not None and not postprocess.identity and not normalize:
        raise ValueError("post-processing works on cosines: use normalize=True")


def _reranked(gal: _Gallery, probes: Tensor, scores: Tensor, own: Tensor,
              postprocess: PostProcessing, database: Any) -> tuple[Tensor, Tensor]:
    """Rank (1-based) of each probe's identity ``own (c,)`` and the cosine of its first
    identity, identities ordered by their first image in the post-processed shortlist, the
    rest after them by ``scores (c, I)`` (pessimistic ties)."""
    from facemetric.index.rerank import Shortlist
    from facemetric.index.templates import first_distinct

    sims = (probes @ gal.embeddings.T).to(torch.float32)
    width = min(postprocess.shortlist_size, sims.shape[1])
    cos, rows = sims.topk(width, dim=1, sorted=True)
    refined = postprocess.apply(probes, Shortlist(rows, cos.clone(), cos), database)
    ident = gal.identity_of[refined.rows]
    _, order, found = first_distinct(torch.zeros(ident.shape), ident, width)
    at = (order == own.unsqueeze(1))
    listed = at.any(dim=1)
    position = at.to(torch.int64).argmax(dim=1) + 1
    in_list = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ident, True)
    own_score = scores.gather(1, own.unsqueeze(1))
    behind = ((scores >= own_score) & ~in_list).sum(dim=1)
    rank = torch.where(listed, position, found + behind)
    top = scores.gather(1, order[:, :1].clamp_min(0)).squeeze(1)
    return rank, top


def _rank_and_scores(
    gal: _Gallery, probes: Tensor, probe_identity: np.ndarray, max_block_bytes: int,
    postprocess: PostProcessing | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: pessimistic rank of its identity (0 if not enrolled), its identity's score
    (``-inf`` if not enrolled) and its top score over all identities."""
    n = probes.shape[0]
    width = max(gal.embeddings.shape[0], gal.identities.shape[0])
    step = rows_per_block(width, max_block_bytes, probes.element_size() * 2)
    ranks = np.zeros(n, dtype=np.int64)
    true_scores = np.full(n, -np.inf)
    top_scores = np.empty(n)
    pid = torch.from_numpy(probe_identity)
    database = None
    if postprocess is not None and not postprocess.identity:
        from facemetric.index.rerank import MatrixDatabase

        database = MatrixDatabase(gal.embeddings.to(torch.float32),
                                  max_block_bytes=postprocess.max_block_bytes)
    for start in range(0, n, step):
        scores = _identity_scores(gal, probes[start : start + step])
        ids = pid[start : start + step]
        mated = ids >= 0
        own = scores.gather(1, ids.clamp_min(0).unsqueeze(1))  # (c, 1)
        if database is None or postprocess is None:
            rank = (scores >= own).sum(dim=1)
            top = scores.max(dim=1).values
        else:
            rank, top = _reranked(gal, probes[start : start + step], scores,
                                  ids.clamp_min(0), postprocess, database)
        ranks[start : start + step] = torch.where(mated, rank, 0).numpy()
        true_scores[start : start + step] = (
            torch.where(mated, own.squeeze(1), -torch.inf).double().numpy()
        )
        top_scores[start : start + step] = top.double().numpy()
    return ranks, true_scores, top_scores


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class CMCCurve:
    """Closed-set cumulative match characteristic.

    ``curve[r − 1]`` is the identification rate at rank ``r`` (``r = 1..num_identities``);
    ``probe_ranks`` the 1-based (pessimistic) rank of each probe's true identity.
    """

    curve: np.ndarray
    probe_ranks: np.ndarray

    def at(self, rank: int) -> float:
        """Identification rate at ``rank`` (ranks beyond the gallery size give 1.0)."""
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        return float(self.curve[min(rank, self.curve.shape[0]) - 1])

    @property
    def rank1(self) -> float:
        return self.at(1)

    @property
    def rank5(self) -> float:
        return self.at(5)

    @property
    def rank10(self) -> float:
        return self.at(10)


def cmc_curve(
    gallery: Any,
    gallery_labels: Any,
    probes: Any,
    probe_labels: Any,
    *,
    normalize: bool = True,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
    postprocess: PostProcessing | None = None,
) -> CMCCurve:
    """Closed-set CMC of probes ``(P, D)`` against a gallery ``(G, D)``.

    Every probe label must occur in ``gallery_labels`` (filter probes first, or use
    ``open_set_identification`` when some identities are unknown). Identity score = max over
    that identity's gallery images; ties count against the probe (module docstring).
    ``postprocess`` reorders each probe's shortlist first (module docstring).
    """
    _check_postprocess(postprocess, normalize)
    gal, p, probe_identity = _prepare(gallery, gallery_labels, probes, probe_labels, normalize)
    if (probe_identity < 0).any():
        missing = int((probe_identity < 0).sum())
        raise ValueError(
            f"{missing} of {probe_identity.shape[0]} probes have no identity in the gallery; "
            "a closed-set CMC needs every probe enrolled (see open_set_identification)"
        )
    ranks, _, _ = _rank_and_scores(gal, p, probe_identity, max_block_bytes, postprocess)
    num_ids = gal.identities.shape[0]
    counts = np.bincount(ranks, minlength=num_ids + 1)[1:]
    return CMCCurve(curve=np.cumsum(counts) / ranks.shape[0], probe_ranks=ranks)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class OpenSetResult:
    """Open-set identification at target FPIRs, and the whole DIR/FPIR trade-off.

    ``dir_at_fpir``/``threshold_at_fpir`` map each target FPIR to a rate/threshold, or to
    ``None`` when it is below ``1 / num_nonmated`` (listed in ``unresolvable_fpirs``).
    ``curve_thresholds`` (decreasing) with ``curve_fpir``/``curve_dir`` trace the curve;
    ``rank1_rate`` is the closed-set rank-1 rate of the mated probes (``DIR`` at ``τ = −inf``).
    """

    dir_at_fpir: dict[float, float | None]
    threshold_at_fpir: dict[float, float | None]
    unresolvable_fpirs: tuple[float, ...]
    rank1_rate: float
    num_mated: int
    num_nonmated: int
    curve_thresholds: np.ndarray = field(repr=False)
    curve_fpir: np.ndarray = field(repr=False)
    curve_dir: np.ndarray = field(repr=False)


def open_set_identification(
    gallery: Any,
    gallery_labels: Any,
    probes: Any,
    probe_labels: Any,
    fpir_targets: Sequence[float] = DEFAULT_FPIR_TARGETS,
    *,
    normalize: bool = True,
    max_block_bytes: int = _DEFAULT_BLOCK_BYTES,
    postprocess: PostProcessing | None = None,
) -> OpenSetResult:
    """Open-set DIR (rank 1) at target FPIRs; probes whose label is not in the gallery are
    the non-mated ones. Needs at least one mated and one non-mated probe. ``postprocess``
    reorders each probe's shortlist; the scores stay cosines (module docstring)."""
    _check_postprocess(postprocess, normalize)
    gal, p, probe_identity = _prepare(gallery, gallery_labels, probes, probe_labels, normalize)
    mated = probe_identity >= 0
    num_mated, num_nonmated = int(mated.sum()), int((~mated).sum())
    if num_mated == 0 or num_nonmated == 0:
        raise ValueError(
            f"open-set identification needs mated and non-mated probes, got {num_mated} mated "
            f"and {num_nonmated} non-mated"
        )
    ranks, true_scores, top_scores = _rank_and_scores(gal, p, probe_identity, max_block_bytes,
                                                      postprocess)
    hit_scores = np.sort(true_scores[mated & (ranks == 1)])  # ascending
    nonmated_top = np.sort(top_scores[~mated])  # ascending

    def dir_at(tau: float) -> float:
        return float(hit_scores.shape[0] - np.searchsorted(hit_scores, tau, side="left")) / (
            num_mated
        )

    dirs: dict[float, float | None] = {}
    ths: dict[float, float | None] = {}
    unresolvable: list[float] = []
    for target in fpir_targets:
        f = float(target)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"FPIR targets must lie in (0, 1], got {f}")
        allowed = int(np.floor(f * num_nonmated * (1.0 + _RATE_RTOL)))
        if allowed == 0:
            dirs[f] = ths[f] = None
            unresolvable.append(f)
            continue
        if allowed >= num_nonmated:
            tau = -np.inf
        else:
            # Smallest τ with at most ``allowed`` non-mated top scores ≥ τ.
            tau = float(np.nextafter(nonmated_top[num_nonmated - allowed - 1], np.inf))
        dirs[f] = dir_at(tau)
        ths[f] = tau

    thresholds = np.unique(np.r_[top_scores[~mated], hit_scores])[::-1]
    curve_fpir = (num_nonmated - np.searchsorted(nonmated_top, thresholds, "left")) / num_nonmated
    curve_dir = (hit_scores.shape[0] - np.searchsorted(hit_scores, thresholds, "left")) / num_mated
    return OpenSetResult(
        dir_at_fpir=dirs,
        threshold_at_fpir=ths,
        unresolvable_fpirs=tuple(unresolvable),
        rank1_rate=hit_scores.shape[0] / num_mated,
        num_mated=num_mated,
        num_nonmated=num_nonmated,
        curve_thresholds=thresholds,
        curve_fpir=curve_fpir,
        curve_dir=curve_dir,
    )


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class GalleryProbeSplit:
    """Indices into the labelled set: ``gallery`` (enrolled) and ``probes`` (queries);
    ``unknown_identities`` are the labels held out of the gallery entirely (all their images
    are non-mated probes)."""

    gallery: np.ndarray
    probes: np.ndarray
    unknown_identities: np.ndarray


def split_gallery_probe(
    labels: Any,
    *,
    gallery_per_identity: int = 1,
    unknown_fraction: float = 0.0,
    seed: int = 0,
) -> GalleryProbeSplit:
    """Split a labelled set into gallery and probes, reproducibly from ``seed``.

    ``round(unknown_fraction × num_identities)`` identities, drawn at random, are held out:
    every image of theirs becomes a (non-mated) probe. Of each other identity,
    ``gallery_per_identity`` images drawn at random are enrolled and the rest become
    (mated) probes; an identity with no more images than that is enrolled whole (a
    distractor in the gallery, no probe). Index arrays are sorted ascending.
    """
    lab = to_numpy(labels)
    if lab.ndim != 1 or lab.shape[0] == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {lab.shape}")
    if gallery_per_identity < 1:
        raise ValueError(f"gallery_per_identity must be ≥ 1, got {gallery_per_identity}")
    if not 0.0 <= unknown_fraction < 1.0:
        raise ValueError(f"unknown_fraction must lie in [0, 1), got {unknown_fraction}")
    identities, ident = np.unique(lab, return_inverse=True)
    ident = ident.reshape(-1)
    rng = np.random.default_rng(seed)
    num_unknown = round(unknown_fraction * identities.shape[0])
    unknown = np.sort(rng.choice(identities.shape[0], size=num_unknown, replace=False))
    # Random order within each identity: sort by (identity, random key).
    order = np.lexsort((rng.random(lab.shape[0]), ident))
    sorted_ident = ident[order]
    first = np.r_[0, np.flatnonzero(sorted_ident[1:] != sorted_ident[:-1]) + 1]
    group_start = np.repeat(first, np.diff(np.r_[first, lab.shape[0]]))
    within = np.arange(lab.shape[0]) - group_start
    enrolled = np.zeros(lab.shape[0], dtype=bool)
    enrolled[order] = within < gallery_per_identity
    enrolled &= ~np.isin(ident, unknown)
    return GalleryProbeSplit(
        gallery=np.flatnonzero(enrolled),
        probes=np.flatnonzero(~enrolled),
        unknown_identities=identities[unknown],
    )
