"""Generalised-mean (GeM) pooling (Radenović, Tolias, Chum: "Fine-tuning CNN Image Retrieval
with No Human Annotation", TPAMI 2018, eq. 3).

For a feature map ``x`` of shape ``(B, C, H, W)`` and one exponent ``p`` shared by the
channels:

    GeM(x)_{b,c} = ( 1/(H·W) · Σ_{h,w} max(x_{b,c,h,w}, ε)^p )^{1/p}

``p = 1`` is average pooling and ``p → ∞`` tends to max pooling; the paper learns ``p``
with the network, starting at 3. The clamp at ``ε`` keeps the fractional power defined
where a PReLU (or anything else) lets negative values through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GeM(nn.Module):
    """Generalised-mean pooling: ``(B, C, H, W)`` → ``(B, C, 1, 1)``.

    Args:
        p: the starting exponent (> 0; the paper's 3).
        learn_p: train ``p`` with the network (the paper's choice); otherwise it is fixed.
        eps: lower clamp of the inputs (> 0).
    """

    def __init__(self, p: float = 3.0, learn_p: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if not p > 0.0:
            raise ValueError(f"GeM's exponent p must be positive, got {p}")
        if not eps > 0.0:
            raise ValueError(f"GeM's clamp eps must be positive, got {eps}")
        self.eps = eps
        value = torch.tensor([float(p)])
        if learn_p:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → ``(B, C, 1, 1)``; ``ValueError`` unless ``x`` is 4-D."""
        if x.dim() != 4:
            raise ValueError(f"GeM pools (B, C, H, W) maps, got shape {tuple(x.shape)}")
        p = self.p.clamp(min=1e-3)  # a step that drives p to 0 would divide by zero
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3), keepdim=True).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()):.4g}, eps={self.eps}"
