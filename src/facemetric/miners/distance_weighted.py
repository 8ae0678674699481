"""Distance-weighted negative sampling (Wu, Manmatha, Smola, Krähenbühl 2017, "Sampling
Matters in Deep Embedding Learning").

On the unit sphere in ``R^n`` the distance between two uniformly random points has density::

    q(d) ∝ d^{n−2} · (1 − d²/4)^{(n−3)/2},   0 < d < 2

so drawing negatives uniformly mostly returns pairs at ``d ≈ √2``. The paper samples each
anchor's negatives with probability ∝ ``1/q(d)`` instead, spreading them over all distances,
with two cut-offs:

- ``d`` is clamped below at ``cutoff`` (so near-duplicate negatives do not take all the mass
  and ``d → 0`` stays finite), and
- negatives with ``d >= nonzero_loss_cutoff`` get weight 0 (they would give zero loss with the
  margin loss ``β + α <= nonzero_loss_cutoff``).

The weights are computed as ``log(1/q)`` and normalised per anchor with a softmax, so the
``d^{−(n−2)}`` factor cannot overflow for ``n`` in the hundreds.

Output: ``Triplets``. For every anchor with at least one positive and one negative, each of
its positive pairs ``(a, p)`` is paired with one negative drawn independently (with
replacement) from that anchor's distribution, so an anchor gets as many negatives as it has
positives (the paper's balance). Pair losses (the paper's margin loss) take these through
``Triplets.to_pairs()``: every positive pair of the batch plus the distinct sampled negatives.
An anchor whose negatives all lie at ``d >= nonzero_loss_cutoff`` falls back to uniform
sampling among its negatives, so its positive pairs still reach the loss.

The distance must be the Euclidean distance on the unit sphere: ``EuclideanDistance
(normalize=True)`` (the default) or ``CosineDistance`` (converted with ``d = √(2·(1 − cos))``,
so embeddings need not be normalised). ``n`` is the embedding dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facemetric.distances import CosineDistance, Distance, EuclideanDistance
from facemetric.miners.base import Miner
from facemetric.tuples import Triplets

# largest distance used in the log-weights: (1 − d²/4) must stay > 0 at antipodal points
_D_MAX = 2.0 - 1e-4


class DistanceWeightedMiner(Miner):
    """Negatives drawn with probability ∝ ``1/q(d)`` (the inverse sphere distance density).

    Args:
        cutoff: lower clamp of ``d`` in the weights, ``> 0``.
        nonzero_loss_cutoff: negatives at ``d >=`` this are not sampled (``> cutoff``).
        distance: ``EuclideanDistance(normalize=True)`` (default) or ``CosineDistance()``.
        generator: a ``torch.Generator`` on the embeddings' device, for reproducible draws;
            ``None`` uses the global RNG.
    """

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        distance: Distance | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        distance = EuclideanDistance(normalize=True) if distance is None else distance
        on_sphere = isinstance(distance, CosineDistance) or (
            type(distance) is EuclideanDistance and distance.normalize
        )
        if not on_sphere:
            raise ValueError(
                "DistanceWeightedMiner needs distances on the unit sphere: use "
                "EuclideanDistance(normalize=True) or CosineDistance(), got "
                f"{type(distance).__name__}"
                + (" without normalize=True" if type(distance) is EuclideanDistance else "")
            )
        if not (0 < cutoff < nonzero_loss_cutoff) or not math.isfinite(nonzero_loss_cutoff):
            raise ValueError(
                "need 0 < cutoff < nonzero_loss_cutoff (finite), got "
                f"cutoff={cutoff}, nonzero_loss_cutoff={nonzero_loss_cutoff}"
            )
        super().__init__(distance)
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)
        self.generator = generator

    def _sphere_distance(self, dist: Tensor) -> Tensor:
        if isinstance(self.distance, CosineDistance):
            return (2.0 * dist).clamp_min(0.0).sqrt()
        return dist

    def _logits(self, dist: Tensor, neg: Tensor, dim: int) -> Tensor:
        """Unnormalised log-probabilities of each anchor's negatives; −inf elsewhere."""
        if dim < 2:
            raise ValueError(f"distance-weighted sampling needs embedding dim >= 2, got {dim}")
        # at least float32: in half precision _D_MAX rounds to 2 and the weights overflow
        d = self._sphere_distance(dist.to(torch.promote_types(dist.dtype, torch.float32)))
        dc = d.clamp(self.cutoff, _D_MAX)
        # log(1/q(d)) = −(n−2)·log d − (n−3)/2 · log(1 − d²/4)
        log_w = dc.log().mul_(-(dim - 2.0))
        log_w.sub_(torch.log1p(dc.square().mul_(-0.25)).mul_(0.5 * (dim - 3.0)))
        eligible = neg & (d < self.nonzero_loss_cutoff)
        logits = torch.where(eligible, log_w, float("-inf"))
        # anchors whose negatives all lie beyond the loss cut-off draw uniformly among them
        stuck = logits.amax(dim=1) == float("-inf")
        if bool(stuck.any()):
            logits[stuck] = torch.where(neg[stuck], 0.0, float("-inf")).to(logits.dtype)
        return logits

    def negative_probabilities(self, dist: Tensor, labels: Tensor, dim: int) -> Tensor:
        """The ``(B, B)`` sampling distribution of each anchor's negative (rows sum to 1).

        ``dist`` is ``self.distance.matrix`` of the batch, ``dim`` the embedding dimension.
        Rows of anchors without negatives are all zero.
        """
        neg = labels[:, None] != labels[None, :]
        probs = torch.softmax(self._logits(dist, neg, dim), dim=1)
        return probs.nan_to_num_(0.0)

    def mine(self, embeddings: Tensor, labels: Tensor, dist: Tensor) -> Triplets:
        same = labels[:, None] == labels[None, :]
        size = same.sum(dim=1)  # images of each sample's identity in the batch
        neg = ~same
        pa, pp = same.fill_diagonal_(False).nonzero(as_tuple=True)
        if pa.numel() == 0 or int(size[0]) == labels.numel():  # no positive, or no negative
            return Triplets(pa[:0], pp[:0], pp[:0])
        anchors = size > 1  # with a positive; every sample has a negative here
        rows = anchors.nonzero().squeeze(1)
        logits = self._logits(
            dist.index_select(0, rows), neg.index_select(0, rows), embeddings.shape[1]
        )
        # the j-th positive of an anchor is paired with the j-th of its i.i.d. draws
        per_anchor = size - 1  # positives of each sample (0 for a singleton)
        draws = torch.multinomial(
            torch.softmax(logits, dim=1),
            int(per_anchor.max()),
            replacement=True,
            generator=self.generator,
        )
        rank = torch.arange(pa.numel(), device=pa.device) - (per_anchor.cumsum(0) - per_anchor)[pa]
        row = (anchors.cumsum(dim=0) - 1)[pa]
        return Triplets(pa, pp, draws[row, rank])


__all__ = ["DistanceWeightedMiner"]
