"""Center loss (Wen et al. 2016): softmax plus a pull towards per-class feature centres."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import work_dtype
from facemetric.losses.classifier.softmax import SoftmaxLoss
from facemetric.losses.cross_rank import CrossRankStatistics, gather_rows


class CenterLoss(CrossRankStatistics, SoftmaxLoss):
    """Softmax cross-entropy plus ``λ/2·‖x_b − c_{y_b}‖²``, both averaged over the batch.

    ``ℓ = mean_b [−log softmax(x_b·Wᵀ + β)[y_b]] + λ/2 · mean_b ‖x_b − c_{y_b}‖²``.
    ``.weight``/``.bias`` are the softmax classifier's parameters (trained by the optimiser);
    the centres ``.centers`` ``(num_classes, embedding_size)`` are a buffer, updated in each
    training-mode forward after the loss is computed, as in the paper::

        c_j ← c_j − α·Δc_j,   Δc_j = Σ_b [y_b = j](c_j − x_b) / (1 + Σ_b [y_b = j])

    so the centre term's gradient flows to the features only. Centres start at zero.
    With :attr:`statistics_group` set (data-parallel training does it), the sums and counts
    run over the global batch — every process's features and labels, gathered — so the
    centres stay identical on every process and equal one process's update on the whole
    batch (:mod:`facemetric.losses.cross_rank`).
    Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016.
    """

    centers: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        lam: float = 0.003,
        alpha: float = 0.5,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(num_classes, embedding_size, chunk_size)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"CenterLoss: lam must be >= 0, got {lam}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"CenterLoss: alpha must lie in [0, 1], got {alpha}")
        self.lam = float(lam)
        self.alpha = float(alpha)
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        softmax = super().forward(embeddings, labels)  # checks the input
        labels = labels.long()
        x = embeddings.to(work_dtype(embeddings, self.centers))
        centers = self.centers.to(x.dtype)[labels]
        pull = 0.5 * self.lam * (x - centers).pow(2).sum(dim=1).mean()
        if self.training:
            self._update_centers(x.detach(), labels)
        return softmax + pull

    @torch.no_grad()
    def _update_centers(self, x: Tensor, labels: Tensor) -> None:
        x, labels = gather_rows([x, labels], self.statistics_group)
        classes, slot = torch.unique(labels, return_inverse=True)
        counts = torch.bincount(slot, minlength=classes.numel()).to(x.dtype).unsqueeze(1)
        sums = x.new_zeros(classes.numel(), x.shape[1]).index_add_(0, slot, x)
        current = self.centers[classes].to(x.dtype)
        delta = (counts * current - sums) / (1.0 + counts)
        self.centers[classes] = (current - self.alpha * delta).to(self.centers.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, alpha={self.alpha}"
