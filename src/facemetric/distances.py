"""Distances between embeddings, passed into pair losses and miners as objects.

Every distance here returns a *distance* (smaller = closer), so a loss or miner written once
works in cosine or Euclidean space without a flag of its own:

- ``CosineDistance``:        d(x, y) = 1 − x·y / (‖x‖‖y‖)            ∈ [0, 2]
- ``EuclideanDistance``:     d(x, y) = ‖x − y‖₂
- ``SquaredEuclideanDistance``: d(x, y) = ‖x − y‖₂²
- ``MahalanobisDistance``:   d(x, y) = ‖W(x − y)‖₂ with a learnable ``W`` (r × D), i.e. the
  Euclidean distance after a learned linear map (the Mahalanobis metric M = WᵀW).

``normalize=True`` on the Euclidean kinds first projects the embeddings on the unit sphere
(the FaceNet setting), where ‖x̂ − ŷ‖² = 2 − 2 cos.

``matrix(x, y)`` gives the ``(N, M)`` matrix over all pairs with one matmul;
``pairs(x, y)`` gives the ``(N,)`` distances of aligned rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Squared distances below this are clamped before the square root: the gradient of sqrt at 0
# is infinite, and zero-distance pairs (an embedding with itself) must give 0, not NaN.
_SQRT_EPS = 1e-12


class _Gram(torch.autograd.Function):
    """``x xᵀ`` whose backward is one matmul, ``(G + Gᵀ) x``, instead of autograd's two."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return (grad + grad.T) @ x


def gram(x: Tensor) -> Tensor:
    """The Gram matrix ``x xᵀ`` of the rows of ``x`` (a third cheaper to differentiate)."""
    return _Gram.apply(x)


class Distance(nn.Module):
    """Base class: a pairwise distance (smaller = closer)."""

    #: distances are bounded above (cosine) or not; losses use it to choose sane margins
    bounded: bool = False

    def matrix(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """All pairwise distances, ``(N, D), (M, D) -> (N, M)``; ``y=None`` means ``y = x``."""
        raise NotImplementedError

    def pairs(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances of aligned rows, ``(N, D), (N, D) -> (N,)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.matrix(x, y)


class CosineDistance(Distance):
    """``1 − cos(x, y)``. Zero-norm rows are treated as having cosine 0 to everything."""

    bounded = True

    def matrix(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        xn = F.normalize(x, dim=1)
        if y is None:
            return 1.0 - gram(xn)
        return 1.0 - xn @ F.normalize(y, dim=1).T

    def pairs(self, x: Tensor, y: Tensor) -> Tensor:
        return 1.0 - (F.normalize(x, dim=1) * F.normalize(y, dim=1)).sum(1)


def _squared_euclidean_matrix(x: Tensor, y: Tensor | None) -> Tensor:
    # ‖x‖² + ‖y‖² − 2x·y with one matmul; clamped at 0 against rounding.
    x2 = (x * x).sum(1)
    if y is None:
        sq = x2[:, None] + x2[None, :] - 2.0 * gram(x)
        # d(x, x) = 0 exactly: the cancellation above leaves rounding noise of order eps·‖x‖²
        sq.fill_diagonal_(0.0)
    else:
        sq = x2[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return sq.clamp_min(0.0)


class SquaredEuclideanDistance(Distance):
    """``‖x − y‖²`` (optionally of L2-normalised embeddings)."""

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize

    def _prep(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) if self.normalize else x

    def matrix(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return _squared_euclidean_matrix(self._prep(x), None if y is None else self._prep(y))

    def pairs(self, x: Tensor, y: Tensor) -> Tensor:
        return (self._prep(x) - self._prep(y)).pow(2).sum(1)


class EuclideanDistance(SquaredEuclideanDistance):
    """``‖x − y‖`` (optionally of L2-normalised embeddings). Gradient 0 at distance 0."""

    def matrix(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return super().matrix(x, y).clamp_min(_SQRT_EPS).sqrt()

    def pairs(self, x: Tensor, y: Tensor) -> Tensor:
        return super().pairs(x, y).clamp_min(_SQRT_EPS).sqrt()


class MahalanobisDistance(EuclideanDistance):
    """``‖W(x − y)‖`` with a learnable projection ``W`` of shape ``(rank, dim)``.

    Initialised to the identity (``rank == dim``) so it starts as the Euclidean distance;
    train ``W`` jointly with the model (its parameters are this module's parameters).
    """

    def __init__(self, dim: int, rank: int | None = None, normalize: bool = False) -> None:
        super().__init__(normalize=normalize)
        rank = dim if rank is None else rank
        if dim <= 0 or rank <= 0:
            raise ValueError(f"dim and rank must be positive, got dim={dim}, rank={rank}")
        self.weight = nn.Parameter(torch.eye(rank, dim))

    def _prep(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"MahalanobisDistance was built for dim={self.weight.shape[1]}, "
                f"got embeddings of dim {x.shape[-1]}"
            )
        return super()._prep(x) @ self.weight.T


__all__ = [
    "CosineDistance",
    "Distance",
    "EuclideanDistance",
    "MahalanobisDistance",
    "SquaredEuclideanDistance",
]
