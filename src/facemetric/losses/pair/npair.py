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
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, as_pairs, same_label_mask
from facemetric.validation import check_embeddings, check_references


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
        """The N-pair loss of the batch's anchors against ``references`` (``(M, D)``, no
        gradient — a cross-batch memory's rows)::

            ℓ_R = 1/|P_R| Σ_{(a,r)∈P_R} log(1 + Σ_{n∈N_R(a)} exp(s_an − s_ar))

        ``P_R``: every anchor ``a`` of the batch with every reference ``r`` of its identity;
        ``N_R(a)``: the references of other identities. No regulariser (the batch's own loss
        has it) and no miner. No positive pair gives a 0 that keeps the graph. With inner
        products and temperature 1 this is pytorch-metric-learning's NT-Xent against
        ``ref_emb``.
        """
        check_embeddings(embeddings, labels)
        check_references(embeddings, references, reference_labels)
        references = references.detach().to(embeddings.dtype)
        if self.inner_product:
            sim = embeddings @ references.T
        else:
            sim = -self.distance.matrix(embeddings, references)
        flush_subnormal_grad(sim)
        same = labels[:, None] == reference_labels.to(labels.device)[None, :]
        if not bool(same.any()):
            return zero_loss(embeddings)
        lse = masked_logsumexp(sim, ~same)
        terms = F.softplus(lse[:, None] - sim)
        return torch.where(same, terms, 0.0).sum() / same.sum()

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
