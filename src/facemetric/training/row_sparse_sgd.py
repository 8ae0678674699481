"""SGD that updates only the rows a sparse gradient touches (lazy momentum).

Partial FC with ``sparse_grad=True`` reads its sampled centres through
``F.embedding(index, weight, sparse=True)``, so ``weight.grad`` is a sparse COO tensor
holding the ``S`` sampled rows instead of an ``(N, D)`` dense tensor of which ``N − S`` rows
are zeros. :class:`RowSparseSGD` is ``torch.optim.SGD`` (same hyper-parameters, same
``state_dict`` layout: a ``momentum_buffer`` per parameter) with one addition: a parameter
whose gradient is sparse is updated on its gradient's rows ``R`` only,

    ``g_R = ∇_R + λ·w_R``,  ``v_R ← μ·v_R + g_R``,  ``w_R ← w_R − η·u_R``

with ``u_R = v_R`` (``u_R = g_R + μ·v_R`` with Nesterov),

and every other row — its weight, its momentum — is left untouched ("lazy" momentum, as
the first Partial FC implementation did by copying the sampled rows' momentum in and out).
The step's cost is ``O(S·D)`` instead of ``O(N·D)``: at a million identities and a 10%
sample that is a tenth of the memory traffic, and no ``(N, D)`` gradient is allocated.

Compared with dense SGD on the same centres, an un-sampled row neither keeps moving with its
old momentum nor decays: the two differ only in how stale updates act, and both train (An et
al. 2021 use the lazy form). Dense gradients take ``torch.optim.SGD``'s own path, bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class RowSparseSGD(torch.optim.SGD):
    """``torch.optim.SGD`` plus lazy row updates for sparse gradients (module docstring).

    Args: as ``torch.optim.SGD``; ``dampening`` must be 0 and ``maximize`` false when a
    parameter receives a sparse gradient (``ValueError`` at that step otherwise).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._sparse_step(p, p.grad, group)
                    hidden.append((p, p.grad))
                    p.grad = None  # the dense step below skips parameters without a gradient
        try:
            super().step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        return loss

    def _sparse_step(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        if group["dampening"] != 0 or group["maximize"]:
            raise ValueError(
                "RowSparseSGD: sparse gradients need dampening=0 and maximize=False "
                f"(got dampening={group['dampening']}, maximize={group['maximize']})"
            )
        grad = grad.coalesce()
        rows = grad.indices()[0]
        if rows.numel() == 0:
            return
        g = grad.values().to(p.dtype)
        w = p.index_select(0, rows)
        if group["weight_decay"] != 0:
            g = g.add(w, alpha=group["weight_decay"])
        momentum = group["momentum"]
        step = g
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p)
            v = buf.index_select(0, rows).mul_(momentum).add_(g)
            buf.index_copy_(0, rows, v)
            step = g.add(v, alpha=momentum) if group["nesterov"] else v
        p.index_copy_(0, rows, w.add_(step, alpha=-group["lr"]))



def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients.

    The global L2 norm of all gradients (a sparse gradient counts its stored rows, once
    coalesced); if it exceeds ``max_norm`` every gradient is scaled by
    ``max_norm / (norm + 1e-6)``, as torch does. Without sparse gradients this *is* torch's
    function. Returns the norm before clipping.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not any(p.grad.is_sparse for p in with_grad):  # type: ignore[union-attr]
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    norms = []
    for p in with_grad:
        if p.grad.is_sparse:  # type: ignore[union-attr]
            p.grad = p.grad.coalesce()  # type: ignore[union-attr]
            norms.append(torch.linalg.vector_norm(p.grad.values()))
        else:
            norms.append(torch.linalg.vector_norm(p.grad))  # type: ignore[arg-type]
    dtype = functools.reduce(torch.promote_types, [n.dtype for n in norms])
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, dtype) for n in norms]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in with_grad:
        g = p.grad
        (g.values() if g.is_sparse else g).mul_(coef.to(g.device, g.dtype))  # type: ignore[union-attr]
    return total


__all__ = ["RowSparseSGD", "clip_grad_norm"]
