"""AdaCos (Zhang et al. 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE, RescaleFn
from facemetric.losses.classifier.head import NormalizedClassifierLoss
from facemetric.losses.cross_rank import CrossRankStatistics, gather_rows
from facemetric.losses.margins import NoMargin


class AdaCosLoss(CrossRankStatistics, NormalizedClassifierLoss):
    """Normalised softmax with an adaptive scale and no margin.

    ``ℓ = mean_b −log softmax(s̃·cos θ_b)[y_b]`` (mean over the batch). Fixed AdaCos
    (``dynamic=False``): ``s̃ = √2·ln(C − 1)``. Dynamic AdaCos: each training-mode forward
    first recomputes, without gradient, from the batch and the previous scale ``s̃_old``::

        B_avg = mean_b Σ_{k≠y_b} exp(s̃_old·cos θ_bk),   θ_med = median_b θ_{b,y_b},
        s̃ = ln(B_avg) / cos(min(π/4, θ_med))

    and uses the new ``s̃`` for that batch's loss (buffer ``current_scale``; ``θ_med`` the
    mean of the two middle angles for an even batch). ``s̃`` is kept ≥ ``MIN_SCALE``:
    ``ln B_avg`` turns ≤ 0 only if every non-target cosine is very negative, and from a tiny
    ``s̃`` the next step's ``B_avg ≈ C − 1`` restores it. Evaluation mode uses the current
    scale unchanged. With :attr:`statistics_group` set (data-parallel training does it),
    ``B_avg`` and ``θ_med`` are taken over the global batch (every process's per-sample
    values, gathered), so every process uses the same ``s̃`` — the one a single process
    computes on the whole batch (:mod:`facemetric.losses.cross_rank`). Zhang et al.,
    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face
    Representations", CVPR 2019.
    """

    current_scale: Tensor
    #: floor of the dynamic scale
    MIN_SCALE = 1e-3

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        dynamic: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if num_classes < 3:
            raise ValueError(f"AdaCosLoss: need num_classes >= 3, got {num_classes}")
        fixed = math.sqrt(2.0) * math.log(num_classes - 1)
        super().__init__(num_classes, embedding_size, NoMargin(), fixed, chunk_size=chunk_size)
        self.dynamic = dynamic
        self.register_buffer("current_scale", torch.tensor(fixed, dtype=torch.float64))

    def batch_scale(self, embeddings: Tensor) -> Tensor:
        return self.current_scale.clone()  # the buffer may change before the backward

    def rescaler(self) -> RescaleFn | None:
        if not (self.dynamic and self.training):
            return None
        return self._rescale

    @torch.no_grad()
    def _rescale(self, nontarget_lse: Tensor, cos_target: Tensor) -> Tensor:
        nontarget_lse, cos_target = gather_rows([nontarget_lse, cos_target],
                                                self.statistics_group)
        log_b_avg = torch.logsumexp(nontarget_lse, dim=0) - math.log(nontarget_lse.numel())
        theta_med = torch.quantile(torch.acos(cos_target.clamp(-1.0, 1.0)), 0.5)
        new = log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4))
        new = new.clamp(min=self.MIN_SCALE)
        self.current_scale.copy_(new)
        return new

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"dynamic={self.dynamic}, scale={float(self.current_scale):.4g}"
        )
