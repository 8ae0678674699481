"""The normalised-centre classifier head shared by the margin losses (and Partial FC).

:func:`margin_cross_entropy` is the seam: normalised features, any centre rows, any margin,
any scale — a softmax cross-entropy over ``s·cos θ`` logits whose target entry is rewritten
to ``s·ψ(cos θ_y)``. It runs on :func:`~facemetric.losses.classifier.chunked.
chunked_cross_entropy` (one chunked pass over the centres, exact gradients, float32 under
autocast). :class:`ClassifierLoss` and :class:`NormalizedClassifierLoss` are the module
bases of the named losses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from facemetric.losses.classifier.chunked import (
    DEFAULT_CHUNK_SIZE,
    HeadSpec,
    RescaleFn,
    chunked_cross_entropy,
)
from facemetric.losses.margins import Margin
from facemetric.validation import check_classifier_input, check_embeddings, check_labels


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    scale: float | Tensor,
    *,
    margin_labels: Tensor | None = None,
    subcenters: int = 1,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Cross-entropy of a normalised-centre classifier with a margin on the target logit.

    ``ℓ_b = −log softmax(z_b)[y_b]`` with ``z_bc = s_b·cos θ_bc`` for ``c ≠ y_b`` and
    ``z_by = s_b·ψ(cos θ_by)``, ``cos θ_bc = x_b·w_c / (‖x_b‖‖w_c‖)``, ψ = ``margin``.
    Works on any ``weight`` rows — the full centre matrix or a sampled subset (Partial FC):
    ``labels`` index rows (classes) of ``weight``, ``margin_labels`` (default ``labels``)
    are the class ids the margin sees, e.g. the original ids when ``labels`` were remapped
    into a sampled subset (only class-dependent margins read them).

    Args:
        embeddings: ``(B, D)`` features, any scale (normalised here).
        weight: ``(N·subcenters, D)`` centre rows, ``subcenters`` contiguous rows per class.
        labels: ``(B,)`` int64 in ``[0, N)``.
        margin: the target rewrite ψ: any :class:`~facemetric.losses.margins.Margin` (or
            callable ``(cos (B,), margin_labels (B,)) -> (B,)``) acting elementwise; it is
            called once per forward (annealed margins count their steps).
        scale: ``s``: a number, a 0-d tensor or a ``(B,)`` tensor (gradients flow into a
            tensor that requires them, e.g. SphereFace's ``‖x_b‖``).
        margin_labels: ``(B,)`` class ids passed to ``margin``.
        subcenters: rows per class; a class's cosine is the maximum over its rows.
        reduction: ``"mean"`` over the batch (default), ``"sum"`` or ``"none"`` (``(B,)``).
        chunk_size: weight rows per chunk (speed only).

    Returns:
        The loss, float32 (float64 for float64 input), also under autocast.

    Raises:
        ValueError: bad shapes, NaN/Inf embeddings or scale, labels out of range.
    """
    check_embeddings(embeddings, labels)
    if subcenters < 1:
        raise ValueError(f"subcenters must be >= 1, got {subcenters}")
    num_classes = _check_weight(weight, embeddings.shape[1], subcenters)
    check_labels(labels, embeddings.shape[0], num_classes)
    if margin_labels is None:
        margin_labels = labels
    else:
        check_labels(margin_labels, embeddings.shape[0])
    return normalized_cross_entropy(
        embeddings,
        weight,
        labels,
        margin,
        scale,
        margin_labels=margin_labels,
        subcenters=subcenters,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def normalized_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    scale: float | Tensor,
    *,
    margin_labels: Tensor,
    subcenters: int = 1,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rescale: RescaleFn | None = None,
) -> Tensor:
    """:func:`margin_cross_entropy` on input already checked, plus AdaCos's ``rescale``."""
    work = work_dtype(embeddings, weight)
    x = embeddings.to(work)
    margin_labels = margin_labels.long()

    def target(cos: Tensor, weight_norm: Tensor) -> Tensor:
        return margin(cos, margin_labels)

    spec = HeadSpec(target, True, True, subcenters, chunk_size, rescale)
    s = row_scale(scale, x.shape[0], work, x.device)
    return chunked_cross_entropy(x, weight.to(work), labels, spec, s, None, reduction)


def linear_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    scale: float = 1.0,
    normalize_features: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Mean softmax cross-entropy of the plain linear classifier ``s·x̃·Wᵀ + β`` with
    ``x̃ = x`` or ``x/‖x‖`` (input already checked)."""
    work = work_dtype(embeddings, weight)
    spec = HeadSpec(_plain_target, False, normalize_features, 1, chunk_size)
    s = row_scale(scale, embeddings.shape[0], work, embeddings.device)
    b = None if bias is None else bias.to(work)
    return chunked_cross_entropy(embeddings.to(work), weight.to(work), labels, spec, s, b)


def _plain_target(u: Tensor, weight_norm: Tensor) -> Tensor:
    return u


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_scale(
    scale: float | Tensor, batch: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The scale as a ``(batch,)`` tensor of ``dtype`` (keeps the autograd graph).

    Raises:
        ValueError: a scale that is NaN, infinite or negative, or of the wrong shape.
    """
    if not isinstance(scale, Tensor):
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale}")
        if float(scale) < 0:
            raise ValueError(f"the logit scale must be >= 0, got {scale}")
        return torch.full((batch,), float(scale), dtype=dtype, device=device)
    if scale.dim() == 0:
        scale = scale.expand(batch)
    if scale.shape != (batch,):
        raise ValueError(
            f"scale must be a number, a 0-d tensor or have shape ({batch},), got "
            f"{tuple(scale.shape)}"
        )
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):  # one read of the values
        if not bool(torch.isfinite(scale).all()):
            raise ValueError("scale contains NaN or Inf")
        raise ValueError("the logit scale must be >= 0")
    return scale.to(dtype)


def _check_weight(weight: Tensor, embedding_size: int, subcenters: int) -> int:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a floating (rows, embedding_size) tensor")
    if weight.shape[1] != embedding_size:
        raise ValueError(
            f"embeddings have size {embedding_size} but the weight rows have size {weight.shape[1]}"
        )
    if weight.shape[0] == 0 or weight.shape[0] % subcenters:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, not a positive multiple of subcenters={subcenters}"
        )
    return weight.shape[0] // subcenters


class ClassifierLoss(nn.Module):
    """Base of the classifier losses: owns ``.weight`` ``(num_classes·rows_per_class,
    embedding_size)`` (the layout of ``nn.Linear``) and checks each batch."""

    def __init__(self, num_classes: int, embedding_size: int, rows_per_class: int = 1) -> None:
        super().__init__()
        name = type(self).__name__
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"{name}: num_classes must be an integer >= 2, got {num_classes}")
        if int(embedding_size) != embedding_size or embedding_size < 1:
            raise ValueError(f"{name}: embedding_size must be >= 1, got {embedding_size}")
        if int(rows_per_class) != rows_per_class or rows_per_class < 1:
            raise ValueError(f"{name}: need >= 1 centre rows per class, got {rows_per_class}")
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.weight = nn.Parameter(torch.empty(num_classes * rows_per_class, embedding_size))
        bound = 1.0 / math.sqrt(embedding_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def check_input(self, embeddings: Tensor, labels: Tensor) -> None:
        """``ValueError`` unless ``embeddings (B, embedding_size)`` are finite floats and
        ``labels (B,)`` are integers in ``[0, num_classes)``."""
        check_classifier_input(
            embeddings, labels, self.embedding_size, self.num_classes, type(self).__name__
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


class NormalizedClassifierLoss(ClassifierLoss):
    """Normalised-centre softmax with a margin: ``margin_cross_entropy`` on ``.weight``.

    ``ℓ = mean_b −log softmax(z_b)[y_b]`` (mean over the batch), ``z_bc = s·cos θ_bc``,
    target ``s·ψ(cos θ_by)``. ArcFace, CosFace, NormFace ... are this class with a named
    margin and scale. ``subcenters = k`` gives each class ``k`` contiguous weight rows.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        scale: float,
        subcenters: int = 1,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(num_classes, embedding_size, subcenters)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"{type(self).__name__}: scale must be > 0, got {scale}")
        self.margin = margin
        self.scale = float(scale)
        self.subcenters = int(subcenters)
        self.chunk_size = int(chunk_size)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        self.check_input(embeddings, labels)
        return normalized_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.margin,
            self.batch_scale(embeddings),
            margin_labels=labels,
            subcenters=self.subcenters,
            chunk_size=self.chunk_size,
            rescale=self.rescaler(),
        )

    def batch_scale(self, embeddings: Tensor) -> float | Tensor:
        """The scale ``s`` for this batch (a constant here; SphereFace uses ``‖x_b‖``)."""
        return self.scale

    def rescaler(self) -> RescaleFn | None:
        """A batch-dependent scale update (AdaCos), or None."""
        return None

    def extra_repr(self) -> str:
        sub = f", subcenters={self.subcenters}" if self.subcenters > 1 else ""
        return f"{super().extra_repr()}, scale={self.scale}{sub}"
