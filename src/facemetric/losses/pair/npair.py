"""Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
Objective", NeurIPS 2016), with its L2 regulariser on the embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from facemetric.distances import Distance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.losses.pair.lifted_structure import flush_subnormal_grad, masked_logsumexp
from facemetric.losses.pair.memory import reference_masks
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, as_pairs, same_label_mask
from facemetric.validation import check_embeddings


class NPairLoss(TupleLoss):
    """Each anchor must prefer its positive to the positives of every other identity::

        ℓ(a, p) = log(1 + Σ_{n∈N(a)} exp(s_an − s_ap))
        L = 1/|P| Σ_{(a,p)∈P} ℓ(a, p) + λ · 1/|U| Σ_{i∈U} ‖f_i‖²

    **How it is formed**: ``P`` is the positive pairs — every ordered pair ``(a, p)``,
    ``a ≠ p``, of the same identity by default, else the explicit ``Pairs`` / the miner's (of
    ``Triplets``, their distinct ``(a, p)`` pairs). The negatives ``N(a)`` are the distinct
    samples that are the positive of some pair in ``P`` and whose identity differs from
    ``a``'s (given negative pairs are not used): with one pair per identity this is exactly
    Sohn's N-pair batch; on a P×K batch with the default it is every sample of the other
    identities. ``U`` is the set of samples in ``P`` (anchors and positives).
    **Reduction**: the mean of ``ℓ`` over ``P`` plus ``λ`` times the mean squared norm
    over ``U``.

    **Similarity** ``s``: the inner product ``f_a · f_b`` (the paper) when ``distance`` is
    not given — also when a miner is given, whose distance then serves the mining only. An
    explicit ``distance`` gives ``s = −D`` (e.g. ``CosineDistance()`` gives the cosine up
    to a constant, which ``ℓ`` ignores); then set ``l2_reg=0`` if the distance normalises.

    Args:
        distance: if given, use ``−distance`` as the similarity instead of inner products.
        miner: picks the positive pairs when none are passed to ``forward``.
        l2_reg: ``λ``, the weight of the squared-norm regulariser (≥ 0).
    """

    def __init__(
        self,
        l2_reg: float = 0.02,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        super().__init__(distance=distance, miner=miner)
        if l2_reg < 0:
            raise ValueError(f"NPairLoss l2_reg must be >= 0, got {l2_reg}")
        self.l2_reg = float(l2_reg)
        #: inner products (no distance given) or −distance (the base then builds ``dist``)
        self.inner_product = distance is None
        self.uses_distance_matrix = not self.inner_product

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        if dist is None:
            sim = _Gram.apply(embeddings)
        else:
            sim = -dist
            flush_subnormal_grad(sim)
        if tuples is None:
            pos, _ = same_label_mask(labels)
            in_pair = pos.any(1)
            # every sample with a partner is some pair's positive
            lse = _negative_lse(sim, labels, in_pair)
            terms = F.softplus(lse[:, None] - sim)
            data = torch.where(pos, terms, 0.0).sum() / pos.sum()
        else:
            pairs = as_pairs(tuples)
            if pairs.num_pos == 0:
                return zero_loss(embeddings)
            a, p = pairs.pos_a, pairs.pos_b
            targets = torch.zeros_like(labels, dtype=torch.bool)
            targets[p] = True
            in_pair = targets.clone()
            in_pair[a] = True
            lse = _negative_lse(sim, labels, targets)
            data = F.softplus(lse[a] - sim[a, p]).mean()
        if self.l2_reg == 0.0:
            return data
        return data + self._norm_penalty(embeddings, in_pair)

    def reference_loss(
        self, embeddings: Tensor, labels: Tensor, references: Tensor, reference_labels: Tensor
    ) -> Tensor:
        """The loss with ``references`` (``(M, D)``, no gradient — a cross-batch memory's
        rows) as further candidates: for anchor ``a``, ``P`` holds ``(a, p)`` for ``p`` of
        ``a``'s identity in the batch (``p ≠ a``) or among the references, and ``N(a)`` the
        batch samples of another identity that have a partner in the batch and every
        reference of another identity. The regulariser covers the batch samples in some pair
        of ``P``. With no references this is the default (``tuples=None``) loss; a miner is
        not used here. No positive pair at all gives a 0 that keeps the graph.
        """
        check_embeddings(embeddings, labels)
        references = references.detach().to(embeddings.dtype)
        columns = torch.cat([embeddings, references])
        if self.inner_product:
            sim = embeddings @ columns.T
        else:
            sim = -self.distance.matrix(embeddings, columns)
        flush_subnormal_grad(sim)
        pos, neg = reference_masks(labels, reference_labels)
        if not bool(pos.any()):
            return zero_loss(embeddings)
        batch_pos, _ = same_label_mask(labels)
        neg[:, : labels.numel()] &= batch_pos.any(1)[None, :]
        lse = masked_logsumexp(sim, neg)
        terms = F.softplus(lse[:, None] - sim)
        data = torch.where(pos, terms, 0.0).sum() / pos.sum()
        if self.l2_reg == 0.0:
            return data
        return data + self._norm_penalty(embeddings, pos.any(1))

    def _norm_penalty(self, embeddings: Tensor, in_pair: Tensor) -> Tensor:
        """``λ`` times the mean squared norm over the samples in ``in_pair``."""
        sq_norms = (embeddings * embeddings).sum(1)
        reg = torch.where(in_pair, sq_norms, 0.0).sum() / in_pair.sum()
        return self.l2_reg * reg


def _negative_lse(sim: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per anchor row ``a``: ``log Σ_n exp(sim[a, n])`` over targets ``n`` of another label.

    An anchor with no negatives gets a huge negative value, so ``ℓ = softplus(−huge) = 0``.
    """
    neg = (labels[:, None] != labels[None, :]) & targets[None, :]
    return masked_logsumexp(sim, neg)


class _Gram(torch.autograd.Function):
    """``x xᵀ`` whose backward is one matmul, ``(G + Gᵀ) x``, instead of autograd's two.

    The incoming gradient is flushed of subnormal entries first (see
    ``flush_subnormal_grad``).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0)
        return (grad + grad.T) @ x


__all__ = ["NPairLoss"]
