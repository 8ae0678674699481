"""Contrastive loss (Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006)."""

from __future__ import annotations

import torch
from torch import Tensor

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, as_pairs, same_label_mask
from facemetric.validation import check_embeddings, check_references


class ContrastiveLoss(TupleLoss):
    """Pull positive pairs within ``pos_margin``, push negative pairs beyond ``neg_margin``.

    For a positive pair (same identity) at distance ``d`` the term is ``[d − pos_margin]₊``,
    for a negative pair ``[neg_margin − d]₊``; ``squared=True`` squares each hinge term
    (the paper's form, without its factor ½)::

        L = ( Σ_{(i,j)∈P} [D_ij − m_pos]₊^s + Σ_{(i,j)∈N} [m_neg − D_ij]₊^s ) / (|P| + |N|)

    with ``s = 2`` if ``squared`` else 1. **Reduction**: the mean over *all* pairs the loss
    forms, positives and negatives together (pairs that already satisfy their margin count in
    the denominator with a 0 term). Without tuples or a miner the pairs are every ordered
    pair ``(i, j), i ≠ j`` of the batch (each unordered pair twice, which leaves the mean
    unchanged). Explicit ``Pairs`` are used as given (duplicates count); ``Triplets`` give
    their distinct ``(a, p)`` and ``(a, n)`` pairs (``as_pairs``).

    Args:
        distance: the pair distance ``D`` (default Euclidean, or the miner's).
        miner: picks the pairs when none are passed to ``forward``.
        pos_margin: distance below which a positive pair costs nothing (≥ 0).
        neg_margin: distance beyond which a negative pair costs nothing (> pos_margin).
        squared: square the hinge terms.
    """

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        squared: bool = False,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        super().__init__(distance=distance, miner=miner)
        if pos_margin < 0 or neg_margin <= pos_margin:
            raise ValueError(
                "ContrastiveLoss needs 0 <= pos_margin < neg_margin, got "
                f"pos_margin={pos_margin}, neg_margin={neg_margin}"
            )
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.squared = bool(squared)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        assert dist is not None
        if tuples is None:
            pos, neg = same_label_mask(labels)
            # one dense pass over the B × B matrix; the diagonal is neither pos nor neg
            terms = torch.where(
                pos,
                dist - self.pos_margin,
                torch.where(neg, self.neg_margin - dist, 0.0),
            ).relu()
            count = pos.sum() + neg.sum()
            if int(count) == 0:
                return zero_loss(embeddings)
            if self.squared:
                terms = terms * terms
            return terms.sum() / count
        pairs = as_pairs(tuples)
        count = pairs.num_pos + pairs.num_neg
        if count == 0:
            return zero_loss(embeddings)
        pos_terms = (dist[pairs.pos_a, pairs.pos_b] - self.pos_margin).relu()
        neg_terms = (self.neg_margin - dist[pairs.neg_a, pairs.neg_b]).relu()
        if self.squared:
            pos_terms = pos_terms * pos_terms
            neg_terms = neg_terms * neg_terms
        return (pos_terms.sum() + neg_terms.sum()) / count

    def reference_loss(
        self, embeddings: Tensor, labels: Tensor, references: Tensor, reference_labels: Tensor
    ) -> Tensor:
        """The loss over the pairs ``(a, r)`` of a batch anchor and a row of ``references``
        (``(M, D)``, no gradient — a cross-batch memory's rows), positive or negative by
        label: the mean of their hinge terms. No miner. No reference gives a 0 that keeps the
        graph.
        """
        check_embeddings(embeddings, labels)
        check_references(embeddings, references, reference_labels)
        if references.shape[0] == 0:
            return zero_loss(embeddings)
        dist = self.distance.matrix(embeddings, references.detach().to(embeddings.dtype))
        same = labels[:, None] == reference_labels.to(labels.device)[None, :]
        terms = torch.where(same, dist - self.pos_margin, self.neg_margin - dist).relu()
        if self.squared:
            terms = terms * terms
        return terms.mean()


__all__ = ["ContrastiveLoss"]
