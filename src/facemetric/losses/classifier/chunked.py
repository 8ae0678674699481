"""The engine of every classifier loss: softmax cross-entropy in one chunked pass over W.

Logits of sample ``b`` (features ``x̃_b`` = ``x_b`` or ``x_b/‖x_b‖``, label ``y_b``, row
scale ``s_b ≥ 0``)::

    z_bc = s_b·u_bc + β_c   (c ≠ y_b),      z_by = s_b·φ(u_by, ‖w_y‖) + β_y,
    u_bc = r_c·(x̃_b·w_c),   r_c = 1/‖w_c‖ (normalised centres) or 1,

``β`` an optional bias and ``φ`` the target rewrite, an elementwise differentiable function
(a margin ψ for the normalised heads). ``ℓ_b = logsumexp_c z_bc − z_by``.

:class:`_ChunkedSoftmaxCE` never builds the normalised weight matrix, a one-hot mask or a
``B × C`` logit tensor: it walks the classes in chunks of ``chunk_size`` rows; per chunk
one matmul gives ``s_b·(x̃_b·w_c)``, kept as ``Z`` ``(C, B)`` for the backward pass, and
the chunk is folded into an online log-sum-exp of the non-target logits (targets zeroed
after the exponential). φ and its two partial derivatives are evaluated once on the ``B``
target values with autograd. The backward pass walks the same chunks with ``M = dL/dz``
(at the target entry ``dL/dt_b·∂φ/∂u`` instead)::

    ∂L/∂(s_b x̃_b) = Σ_c M_bc r_c w_c,
    ∂L/∂w_c        = r_c Σ_b M_bc s_b x̃_b − r_c² w_c Σ_b M_bc s_b u_bc   (the second term
                     only with normalised centres: the derivative through w_c/‖w_c‖),

then ``∂L/∂x̃_b = s_b·∂L/∂(s_b x̃_b)`` (through ``x/‖x‖``: minus its radial part, over
``‖x‖``), ``∂L/∂s_b = x̃_b·∂L/∂(s_b x̃_b) + dL/dt_b·(φ − u_by·∂φ/∂u)``, and
``dL/dt_b·s_b·∂φ/∂‖w_y‖·w_y/‖w_y‖`` on the target rows when φ reads the centre's norm
(L-Softmax). With ``subcenters = k`` a class has ``k`` contiguous rows and ``u`` is the
maximum over them; the gradient goes to the row that won. Everything runs in the inputs'
dtype with autocast disabled (callers pass float32 or float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from facemetric.losses.margins import no_autocast

#: weight rows processed at once: few, large chunks (fewer passes and thread barriers) measured
#: faster than cache-sized ones on the 2-core reference machine
DEFAULT_CHUNK_SIZE = 16384
#: lower clamp of vector norms before dividing by them
NORM_EPS = 1e-12
#: largest exponent allowed when the log-sum-exp shift comes from a bound (e⁶⁰ ≈ 1e26)
_HEADROOM = 60.0
_REDUCTIONS = ("mean", "sum", "none")

#: ``φ(u_target (B,), weight_norm_target (B,)) -> (B,)``, elementwise
TargetFn = Callable[[Tensor, Tensor], Tensor]
#: ``rescale(nontarget_lse (B,), u_target (B,)) -> new scale (0-d)``, called without grad
RescaleFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class HeadSpec:
    """What varies between the classifier losses.

    Attributes:
        target: φ, the target logit before the row scale; must act elementwise.
        normalize_weight: ``r_c = 1/‖w_c‖`` if true, else ``r_c = 1``.
        normalize_features: use ``x_b/‖x_b‖`` for the features (then ``|z_bc| ≤ s_b`` with
            normalised centres and no bias, which spares a max pass).
        subcenters: weight rows per class (contiguous), pooled by max.
        chunk_size: weight rows per chunk (speed only).
        rescale: if given, the scale passed in is used for a first pass only; ``rescale``
            gets (without gradient) the per-sample non-target log-sum-exp at that scale and
            the target ``u``, and returns the scale used for the loss (AdaCos). No gradient
            flows into the scale then.
    """

    target: TargetFn
    normalize_weight: bool
    normalize_features: bool = False
    subcenters: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    rescale: RescaleFn | None = None


def chunked_cross_entropy(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    spec: HeadSpec,
    scale: Tensor,
    bias: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The loss above. ``x (B, D)``, ``weight (C·k, D)``, ``scale (B,)`` (≥ 0), ``bias (C,)``
    or None, all of one floating dtype; ``labels (B,)`` in ``[0, C)``; the values are not
    checked here (:func:`~facemetric.losses.classifier.head.row_scale` checks the scale,
    the callers the rest). ``reduction``: "mean" (over the batch), "sum" or "none".

    Nothing here waits on a GPU but one read of whether a chunk's log-sum-exp underflowed
    (then the non-target terms are summed again with exact shifts) and, in the backward pass
    on the CPU only, whether any incoming gradient is negative: values read back from a GPU
    stall the queue of kernels.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if spec.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {spec.chunk_size}")
    labels = labels.long()  # uint8 would index as a mask, int16 not at all
    with no_autocast(x.device.type):
        losses = _ChunkedSoftmaxCE.apply(x, weight, scale, bias, labels, spec)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Per-sample loss ``ℓ (B,)``; see the module docstring.

    Implementation notes: with ``k = 1``, ``Z = s_b·(x_b·w_c)`` is kept and ``r_c`` applied
    on the fly, fused with the exponential's shift (``addcmul``); with sub-centres the pooled
    ``s·u`` is kept. Each chunk's exponentials go into one reused scratch block (a fresh
    allocation per chunk costs page faults).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        spec: HeadSpec,
    ) -> Tensor:
        batch = x.shape[0]
        k = spec.subcenters
        num_classes = weight.shape[0] // k
        chunks = _chunks(num_classes, max(1, spec.chunk_size // k), labels)
        step = chunks[0][1]
        z = x.new_empty(num_classes, batch)
        scratch = x.new_empty(step * k + 1, batch)  # + a spare row for the targets' writes
        arg = None
        if k > 1:
            arg = x.new_empty(num_classes, batch, dtype=torch.uint8 if k <= 256 else torch.int64)
        inv_norm = x.new_empty(weight.shape[0]) if spec.normalize_weight else None
        bounded = spec.normalize_weight and spec.normalize_features and bias is None
        # x_s = s ⊙ x̂ in one pass: a_b = s_b/‖x_b‖ (or s_b)
        x_norm = None
        if spec.normalize_features:
            x_norm = torch.linalg.vector_norm(x, dim=1).clamp_(min=NORM_EPS)
            factor = scale / x_norm
        else:
            factor = scale
        xs = x * factor.unsqueeze(1)
        xs_t = xs.t()
        nontarget = x.new_full((batch,), -math.inf)
        underflow = None
        for c0, c1, dest in chunks:
            w = weight[c0 * k : c1 * k]
            zc = z[c0:c1]
            raw = torch.mm(w, xs_t, out=zc if k == 1 else scratch[: (c1 - c0) * k])
            r = None
            if inv_norm is not None:
                r = inv_norm[c0 * k : c1 * k]
                torch.linalg.vector_norm(w, dim=1, out=r)
                r = r.clamp_(min=NORM_EPS).reciprocal_().unsqueeze(1)
            if arg is not None:
                if r is not None:
                    raw.mul_(r)
                best, which = raw.view(c1 - c0, k, batch).max(dim=1)
                zc.copy_(best)
                arg[c0:c1] = which
                r = None
            bound = scale if bounded else None
            lse, flag = _chunk_lse(zc, r, bias, bound, nontarget, c0, dest, scratch)
            nontarget = torch.logaddexp(nontarget, lse)
            underflow = flag if underflow is None else underflow.logical_or_(flag)
        if underflow is not None and bool(underflow.any()):
            nontarget = _nontarget_lse(z, chunks, arg, inv_norm, bias, None, scratch)

        # the target: row index into weight, u, ‖w‖
        at = torch.arange(batch, device=x.device)
        target_row = labels * k + (arg[labels, at].long() if arg is not None else 0)
        z_target = z[labels, at]
        if arg is None and inv_norm is not None:
            z_target = z_target * inv_norm[labels]
        positive = scale > 0
        # u = z/s, or where s_b = 0 from the features themselves (chosen without a read)
        u_direct = (x * weight[target_row]).sum(1)
        if x_norm is not None:
            u_direct = u_direct / x_norm
        if inv_norm is not None:
            u_direct = u_direct * inv_norm[target_row]
        u_target = torch.where(positive, z_target / torch.where(positive, scale, 1.0), u_direct)
        if inv_norm is not None:
            w_norm = inv_norm[target_row].reciprocal()
        else:
            w_norm = torch.linalg.vector_norm(weight[target_row], dim=1)

        if spec.rescale is not None:  # z holds s_old·(…); rescale it in place
            if not bool(positive.all()):
                raise ValueError("a rescaled head needs a scale > 0 to start from")
            old = scale.clone()  # the callback may write the buffer ``scale`` views
            new_scale = spec.rescale(nontarget, u_target).to(x.dtype).expand(batch)
            ratio = new_scale / old
            z.mul_(ratio.unsqueeze(0))
            xs.mul_(ratio.unsqueeze(1))
            factor = factor * ratio
            scale = new_scale
            nontarget = _nontarget_lse(
                z, chunks, arg, inv_norm, bias, scale if bounded else None, scratch
            )

        needs_grad = any(ctx.needs_input_grad[:4])
        with torch.enable_grad():
            u_leaf = u_target.detach().requires_grad_(needs_grad)
            n_leaf = w_norm.detach().requires_grad_(needs_grad and ctx.needs_input_grad[1])
            phi = spec.target(u_leaf, n_leaf)
            if phi.shape != (batch,):
                raise ValueError(f"target must return shape ({batch},), got {tuple(phi.shape)}")
            d_phi_du = d_phi_dn = None
            if needs_grad and phi.requires_grad:
                leaves = [u_leaf] + ([n_leaf] if n_leaf.requires_grad else [])
                grads = torch.autograd.grad(phi, leaves, torch.ones_like(phi), allow_unused=True)
                d_phi_du = grads[0]
                d_phi_dn = grads[1] if len(grads) > 1 else None
        phi = phi.detach().to(x.dtype)
        if d_phi_du is None:
            d_phi_du = torch.zeros_like(phi)
        target = scale * phi
        if bias is not None:
            target = target + bias[labels]
        lse = torch.logaddexp(nontarget, target)

        # big buffers go through save_for_backward so autograd frees them after backward
        ctx.save_for_backward(
            x, weight, bias, scale, z, arg, inv_norm, labels, nontarget, lse,
            target_row, u_target, w_norm, phi, d_phi_du.to(x.dtype),
            None if d_phi_dn is None else d_phi_dn.to(x.dtype), xs, factor, x_norm,
        )  # fmt: skip
        ctx.spec, ctx.chunks = spec, chunks
        return lse - target

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, None, None]:
        saved = ctx.saved_tensors
        with no_autocast(saved[0].device.type):
            grads = _backward(ctx, *saved, grad_loss.to(saved[0].dtype).contiguous())
        return (*grads, None, None)


def _chunk_lse(
    zc: Tensor,
    r: Tensor | None,
    bias: Tensor | None,
    bound: Tensor | None,
    running: Tensor,
    c0: int,
    dest: Tensor,
    scratch: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """``log Σ_c exp(r_c·zc_bc + β_c)`` over the chunk's non-target classes, per sample,
    and where it may have underflowed (``(B,)`` bool, or None for an exact shift).

    With ``bound`` (an upper bound of the logits, ``(B,)``) the shift is ``max(running,
    bound − 60)``, ``running`` being the log-sum-exp so far: no term exceeds e⁶⁰, and a term
    that underflows is negligible next to ``e^running`` — unless the shift came from the
    bound and the whole chunk is tiny: those samples are flagged, and the caller sums again
    with exact shifts (:func:`_nontarget_lse` with no bound) if any is. ``dest`` ``(B,)``:
    each sample's target row in the chunk, or the spare row ``n`` (``scratch`` has
    ``n + 1`` rows or more) when its target lies elsewhere.
    """
    n = zc.shape[0]
    at = torch.arange(dest.shape[0], device=dest.device)
    e = scratch[:n]
    if bound is not None:
        shift = torch.maximum(running, bound - _HEADROOM)
        if r is not None:
            torch.addcmul(-shift, zc, r, out=e)
        else:
            torch.sub(zc, shift, out=e)
        e.exp_()
        scratch[dest, at] = 0.0
        total = e.sum(dim=0)
        info = torch.finfo(e.dtype)
        tiny = total < info.tiny * n / info.eps
        return total.log_().add_(shift), tiny.logical_and_(shift > running)
    # exact max shift (bias or unbounded logits)
    if r is not None:
        torch.mul(zc, r, out=e)
    else:
        e.copy_(zc)
    if bias is not None:
        e.add_(bias[c0 : c0 + n].unsqueeze(1))
    top = e.amax(dim=0)  # includes the target: a shift only, which is harmless
    e.sub_(top).exp_()
    scratch[dest, at] = 0.0
    return e.sum(dim=0).log_().add_(top), None


def _nontarget_lse(
    z: Tensor,
    chunks: list[tuple[int, int, Tensor]],
    arg: Tensor | None,
    inv_norm: Tensor | None,
    bias: Tensor | None,
    bound: Tensor | None,
    scratch: Tensor,
) -> Tensor:
    """The non-target log-sum-exp ``(B,)`` from the kept ``z``, summed again (exactly when
    ``bound`` is None or a chunk underflowed)."""
    nontarget = z.new_full((z.shape[1],), -math.inf)
    underflow = None
    for c0, c1, dest in chunks:
        r = None if arg is not None or inv_norm is None else inv_norm[c0:c1, None]
        lse, flag = _chunk_lse(z[c0:c1], r, bias, bound, nontarget, c0, dest, scratch)
        nontarget = torch.logaddexp(nontarget, lse)
        underflow = flag if underflow is None else underflow.logical_or_(flag)
    if underflow is not None and bool(underflow.any()):
        return _nontarget_lse(z, chunks, arg, inv_norm, bias, None, scratch)
    return nontarget


def _backward(
    ctx: FunctionCtx,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    z: Tensor,
    arg: Tensor | None,
    inv_norm: Tensor | None,
    labels: Tensor,
    nontarget: Tensor,
    lse: Tensor,
    target_row: Tensor,
    u_target: Tensor,
    w_norm: Tensor,
    phi: Tensor,
    d_phi_du: Tensor,
    d_phi_dn: Tensor | None,
    xs: Tensor,
    factor: Tensor,
    x_norm: Tensor | None,
    grad_loss: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
    spec: HeadSpec = ctx.spec
    k = spec.subcenters
    need_s = need_s and spec.rescale is None
    dxs = torch.zeros_like(x) if need_x or need_s else None  # ∂L/∂(s ⊙ x)
    dw = x.new_empty(weight.shape) if need_w else None
    db = x.new_empty(bias.shape) if need_b and bias is not None else None
    # dℓ_b/dt_b = p_target − 1 = −(non-target probability mass)
    step = ctx.chunks[0][1] - ctx.chunks[0][0]
    batch = x.shape[0]
    # blocks reused by every chunk (fresh per-chunk allocations cost page faults)
    scratch = x.new_empty(step + 1, batch)  # + a spare row for the targets' writes
    full_block = x.new_empty(step * k, batch) if k > 1 else None
    product = x.new_empty(step * k, batch) if need_w and inv_norm is not None else None
    d_target = -grad_loss * torch.exp(nontarget - lse)
    m_target = d_target * d_phi_du  # M at the target entries
    # softmax·ℓ̄ = exp(z − lse + log|ℓ̄|): the row factor rides in the exponent's shift
    neg_shift = grad_loss.abs().log() - lse
    # a negative incoming gradient (rare: e.g. a loss subtracted) needs its sign applied; a
    # GPU is not asked (a read would stall it), the CPU is (the multiply costs a pass)
    negative = not reads_are_free(grad_loss) or bool((grad_loss < 0).any())
    sign = grad_loss.sign().unsqueeze(0) if negative else None
    at = torch.arange(batch, device=x.device)

    for c0, c1, dest in ctx.chunks:
        n = c1 - c0
        zc = z[c0:c1]
        g = scratch[:n]
        r = inv_norm[c0 * k : c1 * k].unsqueeze(1) if inv_norm is not None else None
        if r is not None and k == 1:
            torch.addcmul(neg_shift, zc, r, out=g)
        else:
            torch.add(zc, neg_shift, out=g)
        if bias is not None:
            g.add_(bias[c0:c1].unsqueeze(1))
        g.exp_()
        if sign is not None:
            g.mul_(sign)
        if db is not None:
            scratch[dest, at] = 0.0
            torch.sum(g, dim=1, out=db[c0:c1])
        if dxs is None and dw is None:
            continue
        scratch[dest, at] = m_target  # outside the chunk: into the spare row
        w = weight[c0 * k : c1 * k]
        if full_block is not None:  # route each pooled gradient to the winning sub-centre
            full = full_block[: n * k].view(n, k, batch).zero_()
            full.scatter_(1, arg[c0:c1].long().unsqueeze(1), g.unsqueeze(1))
            g = full.view(n * k, batch)
        if r is not None:
            g.mul_(r)  # ∂L/∂(x_s·w_c) = M_bc·r_c
        if dxs is not None:
            dxs.addmm_(g.t(), w)
        if dw is not None:
            dwc = dw[c0 * k : c1 * k]
            if r is None:
                torch.mm(g, xs, out=dwc)
                continue
            # −r_c²·(Σ_b M_bc s_b u_bc)·w_c is written first and the matmul adds to it
            prod = product[: n * k]
            if arg is None:  # kept: s_b·(x_b·w_c), and g = M·r
                torch.mul(g, zc, out=prod)
                coef = prod.sum(dim=1, keepdim=True).mul_(r).mul_(r)
            else:  # kept: pooled s·u
                torch.mul(g.view(n, k, batch), zc.unsqueeze(1), out=prod.view(n, k, batch))
                coef = prod.sum(dim=1, keepdim=True).mul_(r)
            torch.mul(w, coef.neg_(), out=dwc)
            dwc.addmm_(g, xs)

    # x_s = a ⊙ x̂ with a = s (x̂ = x) or a = s/‖x‖ (x̂ = x/‖x‖)
    dx = ds = None
    if dxs is not None:
        along = torch.linalg.vecdot(x, dxs, dim=1)  # x·∂L/∂x_s
        if x_norm is not None:
            along = along / x_norm  # x̂·∂L/∂x_s
        if need_s:
            ds = along + d_target * phi - m_target * u_target
        if need_x:
            dx = dxs.mul_(factor.unsqueeze(1))
            if x_norm is not None:  # through x/‖x‖: remove the radial part
                dx.addcmul_(x, (-factor * along / x_norm).unsqueeze(1))
    if db is not None:
        db.index_add_(0, labels, d_target)
    if dw is not None and d_phi_dn is not None:  # φ read ‖w_y‖ (L-Softmax)
        coef = (d_target * scale * d_phi_dn / w_norm.clamp(min=NORM_EPS)).unsqueeze(1)
        dw.index_add_(0, target_row, coef * weight[target_row])
    return dx, dw, ds, db


def _chunks(num_classes: int, step: int, labels: Tensor) -> list[tuple[int, int, Tensor]]:
    """``(c0, c1, dest)`` for each class chunk: ``dest (B,)`` each sample's target row within
    the chunk, or ``c1 − c0`` (a spare row past the chunk) when its target lies elsewhere —
    computed on the device without reading it back."""
    out = []
    for c0 in range(0, num_classes, step):
        c1 = min(num_classes, c0 + step)
        inside = (labels >= c0) & (labels < c1)
        out.append((c0, c1, torch.where(inside, labels - c0, c1 - c0)))
    return out


def reads_are_free(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs nothing but the read: true on
    the CPU; on a GPU a read waits for every queued kernel."""
    return tensor.device.type == "cpu"
