"""A weighted sum of losses over the same batch: a pair loss beside a classifier loss.

Joint supervision — a softmax-type identification loss and a metric loss on the same
embeddings — is how DeepID2 (Sun et al., *Deep Learning Face Representation by Joint
Identification-Verification*, NeurIPS 2014: softmax + contrastive) and center loss (Wen et
al. 2016: softmax + λ·center) train; the metric-learning competition recipes pair ArcFace
with a triplet or multi-similarity term the same way. ``[[aux_loss]]`` sections of a
training config build it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class WeightedLossSum(nn.Module):
    """``ℓ(x, y) = Σ_i w_i · ℓ_i(x, y)`` over one batch of embeddings ``x`` and labels ``y``.

    Every term is a loss called ``(embeddings, labels)`` — a classifier loss (its centres
    become this module's parameters, so the optimiser and checkpoints see them) or a pair
    loss with its miner. Weights are finite and ``> 0``; a term of weight 0 is a term to
    remove, and is refused.

    ``last`` holds each term's detached, unweighted value from the latest call as a 0-d
    tensor on the loss's device, keyed ``"<index>.<class name>"`` (``"0.NPairLoss"``,
    ``"1.ArcFaceLoss"``; the training loop logs them in ``log.csv``'s ``loss_terms``). They
    stay tensors so that reading them is the caller's choice: on a GPU each read waits for
    the queued kernels, and the loop reads them with the loss in one transfer.

    Raises:
        ValueError: no terms, a weight that is not finite and positive, or a term that is
            not a module.
    """

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedLossSum needs at least one (weight, loss) term")
        for i, (w, term) in enumerate(terms):
            if not isinstance(term, nn.Module):
                raise ValueError(f"WeightedLossSum term {i} is {type(term).__name__}, "
                                 "not a loss module")
            if not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
                raise ValueError(f"WeightedLossSum term {i} ({type(term).__name__}): weight "
                                 f"must be a finite number > 0, got {w!r}")
        self.terms = nn.ModuleList([term for _, term in terms])
        self.weights = [float(w) for w, _ in terms]
        self.last: dict[str, Tensor] = {}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        total: Tensor | None = None
        last: dict[str, Tensor] = {}
        for i, (w, term) in enumerate(zip(self.weights, self.terms, strict=True)):
            value = term(embeddings, labels)
            last[f"{i}.{type(term).__name__}"] = value.detach()
            total = w * value if total is None else total + w * value
        self.last = last
        assert total is not None
        return total

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}×{type(t).__name__}" for w, t in
                          zip(self.weights, self.terms, strict=True))


__all__ = ["WeightedLossSum"]
