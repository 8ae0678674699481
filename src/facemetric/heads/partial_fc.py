"""Partial FC: a margin softmax over a sampled subset of (sharded) class centres.

An, Zhu, Xiao, Feng, Zhang, Wu, Qin, Zhang, Fu, "Partial FC: Training 10 Million
Identities on a Single Machine", ICCVW 2021.

Each process keeps a contiguous shard of the ``N`` class centres, ``.weight`` of shape
``(num_local, D)``: rank ``r`` of ``W`` owns ``class_start .. class_start + num_local``,
shard sizes differing by at most one. For every training step a process samples
``S = max(P, ⌈ρ·num_local⌉)`` of its centres — the ``P`` *positive* ones (labels of the
global batch that fall in the shard) plus negatives drawn uniformly without replacement —
and the loss is the margin softmax (any :class:`~facemetric.losses.margins.Margin`)

    ``ℓ_b = −log [e^{s·ψ(cos θ_by)} / (e^{s·ψ(cos θ_by)} + Σ_{c ∈ 𝒮, c ≠ y_b} e^{s·cos θ_bc})]``

over the union ``𝒮`` of every process's sampled centres, averaged over the global batch.
The logits, their gradients and the work scale with ``S``, not with ``N``.

**One process** (``world_size=1``): ``margin_cross_entropy`` (the chunked head of the
classifier losses) on the sampled rows with labels remapped into them; with
``sample_rate=1`` this is the full ArcFace/CosFace/... loss exactly.

**Several processes** (``world_size=W``, an initialised ``torch.distributed`` group):
embeddings and labels are all-gathered (the embeddings with gradient: the backward
all-reduces the incoming gradients and returns each process its own slice), each process
computes the ``B_global × S`` logits of its sampled centres, and the softmax is distributed
(:class:`_DistributedSoftmaxCE`: all-reduce of the row maxima, of the sums of exponentials
and of the target logit, which lives on exactly one process). The value is identical on every
process. Because DDP *averages* the backbone's gradients over processes while ``ℓ`` is
already a mean over the global batch, the gradient returned to each process's embeddings is
``W·∂ℓ/∂x`` by default (``ddp_averaging=True``), so the averaged backbone gradient is
exactly ``∂ℓ/∂θ`` — the same as one process on the whole batch.

**Gradients and the optimiser.** ``.weight`` is one parameter. By default
(``sparse_grad=False``) its gradient is dense: the sampled rows carry their gradient, the
others exact zeros, which any optimiser takes but costs an ``(N, D)`` tensor per step. With
``sparse_grad=True`` the sampled rows are read through ``F.embedding(..., sparse=True)`` and
the gradient is a sparse tensor of the ``S`` sampled rows: train it with
:class:`facemetric.training.RowSparseSGD`, which updates just those rows and their momentum
("lazy" momentum — the paper's first implementation froze the momentum of un-sampled rows
too), so the step costs ``O(S·D)``, not ``O(N·D)``. With dense gradients and plain SGD an
un-sampled row still moves by what its momentum holds (``μ^k`` of its last update, ``k``
steps on) and by weight decay, which only shrinks ``‖w_c‖`` — the loss uses ``w_c/‖w_c‖``.
Adaptive optimisers (Adam) are not recommended on ``.weight``: zero gradients still update
their second-moment estimates.

Sampling is reproducible: the generator of step ``t`` on rank ``r`` is seeded from
``(seed, t, r)`` (``t`` is the buffer ``.step``, counted by training-mode forwards and saved
in the ``state_dict``). :attr:`PartialFC.last_sampled` holds the global class ids that were
sampled by the last forward on this process. In evaluation mode nothing is sampled (all
local centres are used) and the step counter does not move.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from facemetric.losses.classifier.chunked import DEFAULT_CHUNK_SIZE
from facemetric.losses.classifier.head import NormalizedClassifierLoss, normalized_cross_entropy
from facemetric.losses.margins import Margin, no_autocast
from facemetric.validation import check_classifier_input

#: lower clamp of vector norms before dividing by them (as in the classifier head)
_NORM_EPS = 1e-12


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the classes rank ``rank`` owns: contiguous shards whose sizes
    differ by at most one (the first ``num_classes mod world_size`` shards are larger)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world_size {world_size}")
    if num_classes < world_size:
        raise ValueError(f"cannot shard {num_classes} classes over {world_size} processes")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sample_count(num_positive: int, num_local: int, sample_rate: float) -> int:
    """Centres one process samples: ``min(num_local, max(num_positive, ⌈ρ·num_local⌉))``
    (the product is rounded to 9 decimals first, so ``0.1·1000`` gives 100, not 101)."""
    return min(num_local, max(num_positive, math.ceil(round(sample_rate * num_local, 9))))


class PartialFC(nn.Module):
    """Sampled, sharded class centres with any margin (see the module docstring).

    Args:
        num_classes: ``N``, the number of identities over all processes (``>= 2``).
        embedding_size: ``D``.
        margin: the target rewrite ψ (``ArcMargin(0.5)``, ``CosMargin(0.35)`` ...).
        scale: ``s > 0``.
        sample_rate: ``ρ ∈ (0, 1]``, the fraction of each shard sampled per step.
        rank, world_size: this process and the number of processes sharing the centres.
        process_group: the ``torch.distributed`` group (default: the world) when
            ``world_size > 1``.
        seed: base seed of the sampling and of the initialisation of this shard (uniform in
            ``±1/√D``, as the classifier losses).
        ddp_averaging: scale the embedding gradient by ``world_size`` so that DDP's
            averaging of backbone gradients yields the gradient of the global-batch loss
            (set False if the backbone's gradients are summed over processes instead).
        chunk_size: weight rows per chunk of the one-process head (speed only).
        sparse_grad: give ``.weight`` a sparse gradient holding only the sampled rows (for
            :class:`~facemetric.training.RowSparseSGD`; see the module docstring).

    ``forward(embeddings (B, D), labels (B,) in [0, N)) -> loss`` (0-d, mean over the batch;
    over the global batch when ``world_size > 1``).
    """

    step: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        scale: float,
        sample_rate: float = 0.1,
        *,
        rank: int = 0,
        world_size: int = 1,
        process_group: Any = None,
        seed: int = 0,
        ddp_averaging: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"PartialFC: num_classes must be an integer >= 2, got {num_classes}")
        if int(embedding_size) != embedding_size or embedding_size < 1:
            raise ValueError(f"PartialFC: embedding_size must be >= 1, got {embedding_size}")
        if not isinstance(margin, Margin):
            raise ValueError(f"PartialFC: margin must be a Margin, got {type(margin).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"PartialFC: scale must be > 0, got {scale}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must be in (0, 1], got {sample_rate}")
        if seed < 0:
            raise ValueError(f"PartialFC: seed must be >= 0, got {seed}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.margin = margin
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        self.rank, self.world_size = int(rank), int(world_size)
        self.class_start, stop = shard_range(self.num_classes, self.rank, self.world_size)
        self.num_local = stop - self.class_start
        self.process_group = process_group
        self.seed = int(seed)
        self.ddp_averaging = bool(ddp_averaging)
        self.chunk_size = int(chunk_size)
        self.sparse_grad = bool(sparse_grad)
        init = torch.Generator().manual_seed(_mix_seed(self.seed, 0x1417, self.rank))
        bound = 1.0 / math.sqrt(self.embedding_size)
        weight = torch.rand(self.num_local, self.embedding_size, generator=init)
        self.weight = nn.Parameter(weight.mul_(2 * bound).sub_(bound))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        #: global class ids sampled by the last forward on this process (sorted), or None
        self.last_sampled: Tensor | None = None
        # (the step buffer, its version, its value) after the last training forward
        self._step_seen: tuple[Tensor, int, int] | None = None

    @classmethod
    def from_loss(
        cls,
        loss: NormalizedClassifierLoss,
        sample_rate: float = 0.1,
        *,
        rank: int = 0,
        world_size: int = 1,
        process_group: Any = None,
        seed: int = 0,
        ddp_averaging: bool = True,
        sparse_grad: bool = False,
    ) -> PartialFC:
        """Partial FC with the margin, scale and centres (this rank's rows) of a built
        classifier loss (``ArcFaceLoss``, ``CosFaceLoss``, ``CombinedMarginLoss`` ...).

        Raises:
            ValueError: the loss is not a normalised-centre loss with a constant scale and one
                row per class (sub-centres, SphereFace's feature-norm scale and AdaCos's
                adaptive scale are not supported).
        """
        if not isinstance(loss, NormalizedClassifierLoss):
            raise ValueError(
                f"PartialFC.from_loss needs a normalised classifier loss, got "
                f"{type(loss).__name__}"
            )
        name = type(loss).__name__
        if loss.subcenters != 1:
            raise ValueError(f"PartialFC does not support sub-centres ({name})")
        if (
            type(loss).batch_scale is not NormalizedClassifierLoss.batch_scale
            or loss.rescaler() is not None
        ):
            raise ValueError(f"PartialFC needs a constant scale; {name} computes its own")
        pfc = cls(
            loss.num_classes,
            loss.embedding_size,
            copy.deepcopy(loss.margin),
            loss.scale,
            sample_rate,
            rank=rank,
            world_size=world_size,
            process_group=process_group,
            seed=seed,
            ddp_averaging=ddp_averaging,
            chunk_size=loss.chunk_size,
            sparse_grad=sparse_grad,
        )
        stop = pfc.class_start + pfc.num_local
        with torch.no_grad():
            pfc.weight.copy_(loss.weight[pfc.class_start : stop])
        return pfc

    # ------------------------------------------------------------------ sampling

    def _host_step(self) -> int:
        """``int(self.step)`` without reading the device every step: the value is remembered
        after each training forward and read again only when the buffer was replaced or
        written since (``.to()``, ``load_state_dict``, ``step.zero_()`` ...: the tensor's
        version counter moves on every in-place write)."""
        seen = self._step_seen
        if seen is not None and seen[0] is self.step and seen[1] == self.step._version:
            return seen[2]
        return int(self.step)

    def generator(self, step: int, device: torch.device) -> torch.Generator:
        """The sampling generator of ``step`` on this rank, seeded from ``(seed, step, rank)``."""
        return torch.Generator(device=device).manual_seed(_mix_seed(self.seed, step, self.rank))

    def sample(self, labels: Tensor, step: int) -> tuple[Tensor | None, Tensor]:
        """The centres this process uses for a (global) batch with ``labels``.

        Returns:
            ``(index, targets)``: ``index`` the sorted local row indices sampled (None when
            every local row is used), ``targets (B,)`` each label's position among them, or
            ``-1`` where the label's centre lives on another process.

        Nothing here reads a value back from the device unless the batch could hold more
        positive classes than ``⌈ρ·num_local⌉`` (then their count sets the sample's size):
        on a GPU such a read stalls the queue of kernels.
        """
        device = self.weight.device
        labels = labels.to(device)
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        # labels of other shards point at a spare last slot, so no boolean indexing is needed
        slot = torch.where(mine, local, self.num_local)
        positive = torch.zeros(self.num_local + 1, dtype=torch.bool, device=device)
        positive = positive.index_fill_(0, slot, True)[: self.num_local]
        most = min(labels.numel(), self.num_local)  # positives there can be, at most
        count = sample_count(0, self.num_local, self.sample_rate)
        if most > count:
            count = sample_count(int(positive.sum()), self.num_local, self.sample_rate)
        if count >= self.num_local:
            return None, torch.where(mine, local, -1)
        score = torch.rand(self.num_local, generator=self.generator(step, device), device=device)
        score.masked_fill_(positive, 2.0)  # above every uniform draw: positives are always kept
        index = torch.topk(score, count, sorted=False).indices.sort().values
        at = torch.searchsorted(index, slot.clamp(max=self.num_local - 1))
        return index, torch.where(mine, at, -1)

    # ------------------------------------------------------------------ forward

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_classifier_input(
            embeddings, labels, self.embedding_size, self.num_classes, "PartialFC"
        )
        labels = labels.to(device=self.weight.device, dtype=torch.int64)
        grad_scale = float(self.world_size) if self.ddp_averaging else 1.0
        if self.world_size > 1:
            embeddings = _GatherWithGrad.apply(embeddings, self.process_group, grad_scale)
            labels = _gather(labels, self.process_group, check_sizes=False)  # as embeddings
        if self.training:
            step = self._host_step()
            index, targets = self.sample(labels, step)
            self.step += 1
            self._step_seen = (self.step, self.step._version, step + 1)
        else:  # every local centre; labels of other shards' centres get -1
            local = labels - self.class_start
            index, targets = None, torch.where((local >= 0) & (local < self.num_local), local, -1)
        rows = torch.arange(self.num_local, device=labels.device) if index is None else index
        self.last_sampled = rows + self.class_start
        if index is None:
            weight = self.weight
        elif self.sparse_grad:  # the gradient: a sparse tensor of the sampled rows
            weight = F.embedding(index, self.weight, sparse=True)
        else:
            weight = self.weight[index]
        if self.world_size == 1:
            # the input was checked above and the targets index ``weight`` by construction
            return normalized_cross_entropy(
                embeddings, weight, targets, self.margin, self.scale,
                margin_labels=labels, chunk_size=self.chunk_size,
            )  # fmt: skip
        return self._distributed_loss(embeddings, weight, labels, targets)

    def _distributed_loss(
        self, embeddings: Tensor, weight: Tensor, labels: Tensor, targets: Tensor
    ) -> Tensor:
        """Mean over the global batch of the distributed margin softmax."""
        work = torch.float64 if torch.float64 in (embeddings.dtype, weight.dtype) else (
            torch.float32
        )
        with no_autocast(embeddings.device.type):
            x = F.normalize(embeddings.to(work), dim=1, eps=_NORM_EPS)
            w = F.normalize(weight.to(work), dim=1, eps=_NORM_EPS)
            cos = x @ w.t()
            # without boolean indexing (a read of the device): the margin sees every row
            # (once per forward on every process, so stateful margins agree) and only the
            # rows whose centre lives here keep it
            hit = targets >= 0
            cols = targets.clamp(min=0).unsqueeze(1)
            at_col = cos.gather(1, cols).squeeze(1)
            psi = self.margin(at_col, labels).to(work)
            target = self.scale * torch.where(hit, psi, at_col)
            logits = (self.scale * cos).scatter(1, cols, target.unsqueeze(1))
            losses = _DistributedSoftmaxCE.apply(logits, targets, self.process_group)
        return losses.mean()

    # ------------------------------------------------------------------ state

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a full (num_classes, D) weight — as gathered for a checkpoint — loads as this shard
        key = prefix + "weight"
        full = state_dict.get(key)
        if (
            isinstance(full, Tensor)
            and self.num_local != self.num_classes
            and tuple(full.shape) == (self.num_classes, self.embedding_size)
        ):
            state_dict = dict(state_dict)
            state_dict[key] = full[self.class_start : self.class_start + self.num_local]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"scale={self.scale}, sample_rate={self.sample_rate}, rank={self.rank}, "
            f"world_size={self.world_size}, classes=[{self.class_start}, "
            f"{self.class_start + self.num_local}), sparse_grad={self.sparse_grad}"
        )


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence: nearby inputs do not collide)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def _gather(tensor: Tensor, group: Any, *, check_sizes: bool = True) -> Tensor:
    """All-gather equal-sized ``tensor``s along dim 0 (no gradient); ``check_sizes`` first
    gathers the sizes and raises if they differ (one read of the device)."""
    world = dist.get_world_size(group)
    if check_sizes:
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        seen = torch.cat(sizes).tolist()
        if any(s != tensor.shape[0] for s in seen):
            raise ValueError(f"PartialFC needs the same batch size on every process, got {seen}")
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: all-reduce (sum) of the incoming gradient, this
    process's slice, times ``grad_scale``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: Any, grad_scale: float) -> Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.rank, ctx.batch = dist.get_rank(group), x.shape[0]
        return _gather(x.detach(), group)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        mine = total[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]
        return mine * ctx.grad_scale, None, None


class _DistributedSoftmaxCE(torch.autograd.Function):
    """Per-sample ``ℓ_b = log Σ_r Σ_c e^{z^r_bc} − z_by`` with the columns ``z^r`` split over
    processes. ``targets[b]`` is the column of ``y_b`` on this process or ``-1``.

    Forward: all-reduce (max) of the row maxima ``m_b``, all-reduce (sum) of
    ``Σ_c e^{z_bc − m_b}`` and of the target logit (zero on the processes without it).
    Backward (local, no communication): ``∂ℓ/∂z_bc = g_b·(softmax_bc − [c = y_b])``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, targets: Tensor, group: Any) -> Tensor:
        with torch.no_grad():
            top = logits.amax(dim=1)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            exp = (logits - top.unsqueeze(1)).exp_()
            total = exp.sum(dim=1)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            hit = targets >= 0
            cols = targets.clamp(min=0).unsqueeze(1)
            target = torch.where(hit, logits.gather(1, cols).squeeze(1), 0.0)
            dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
            prob = exp.div_(total.unsqueeze(1))
        ctx.save_for_backward(prob, hit, cols)
        return total.log() + top - target

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        prob, hit, cols = ctx.saved_tensors
        out = prob * grad.unsqueeze(1)
        out.scatter_add_(1, cols, torch.where(hit, -grad, 0.0).unsqueeze(1))
        return out, None, None


__all__ = ["PartialFC", "sample_count", "shard_range"]
