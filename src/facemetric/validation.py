"""Input checks shared by every loss, miner and head.

Each check raises ``ValueError`` saying what was wrong and what to do, so a bad batch never
turns silently into a NaN loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_embeddings(embeddings: Tensor, labels: Tensor | None = None) -> None:
    """Check a batch of embeddings ``(B, D)`` and, if given, its labels ``(B,)``.

    Raises:
        ValueError: wrong rank, empty batch, non-floating dtype, NaN/Inf values, labels of
            the wrong rank/dtype or of a different length than the embeddings.
    """
    _check_embedding_layout(embeddings)
    # A finite sum implies finite entries (one reduction instead of four elementwise passes);
    # only a non-finite sum (NaN/Inf inside, or overflow of the sum) needs the exact check.
    if not bool(torch.isfinite(embeddings.detach().sum())):
        _check_finite(embeddings)
    if labels is not None:
        check_labels(labels, embeddings.shape[0])


def check_references(embeddings: Tensor, references: Tensor, reference_labels: Tensor) -> None:
    """Check reference rows ``(M, D)`` (a cross-batch memory's) and their labels ``(M,)``
    against a batch of embeddings ``(B, D)``: rank, width, dtype and length (no value is read;
    ``M = 0`` is allowed — an empty memory).
    """
    if not isinstance(references, Tensor) or references.dim() != 2:
        shape = tuple(references.shape) if isinstance(references, Tensor) else type(references)
        raise ValueError(f"references must be a (rows, dim) tensor, got {shape}")
    if not references.is_floating_point():
        raise ValueError(f"references must be floating point, got {references.dtype}")
    if references.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"references have {references.shape[1]} dimensions, the embeddings "
            f"{embeddings.shape[1]}; pair the batch with rows of the same embedding model"
        )
    if not isinstance(reference_labels, Tensor) or reference_labels.dim() != 1:
        raise ValueError(
            "reference_labels must be a 1-D integer tensor, one label per reference row"
        )
    if reference_labels.is_floating_point() or reference_labels.dtype == torch.bool:
        raise ValueError(
            f"reference_labels must be an integer tensor (int64), got {reference_labels.dtype}"
        )
    if reference_labels.shape[0] != references.shape[0]:
        raise ValueError(
            f"references and reference_labels differ in length: {references.shape[0]} rows but "
            f"{reference_labels.shape[0]} labels"
        )


def check_classifier_input(
    embeddings: Tensor, labels: Tensor, embedding_size: int, num_classes: int, owner: str
) -> None:
    """:func:`check_embeddings` plus the classifier's embedding size and label range.

    The values are read from the device once (the sum of the embeddings and the labels'
    minimum and maximum in one transfer): on a GPU each read waits for the queued work, so a
    head called every step should not read three times.
    """
    _check_embedding_layout(embeddings)
    if embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{owner} was built for embedding_size={embedding_size}, got embeddings of size "
            f"{embeddings.shape[1]}"
        )
    _check_label_layout(labels, embeddings.shape[0])
    finite = torch.isfinite(embeddings.detach().sum()).to(labels.device, torch.int64)
    sum_finite, lo, hi = torch.stack([finite, labels.min().long(), labels.max().long()]).tolist()
    if not sum_finite:
        _check_finite(embeddings)
    _check_label_range(lo, hi, num_classes)


def _check_embedding_layout(embeddings: Tensor) -> None:
    """Type, rank, emptiness and dtype of ``(B, D)`` embeddings (no value is read)."""
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must have shape (batch, dim), got {tuple(embeddings.shape)}; "
            "flatten or stack them first"
        )
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings are empty (shape {tuple(embeddings.shape)})")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")


def _check_finite(embeddings: Tensor) -> None:
    """Raise if an entry is NaN or Inf (a merely overflowing sum passes)."""
    if not bool(torch.isfinite(embeddings).all()):
        bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        raise ValueError(
            f"embeddings contain NaN or Inf in {bad} of {embeddings.shape[0]} rows; "
            "check the model's output (a diverged run, a bad input image, fp16 overflow)"
        )


def check_labels(labels: Tensor, batch_size: int, num_classes: int | None = None) -> None:
    """Check integer class labels ``(B,)``, optionally that they lie in ``[0, num_classes)``."""
    _check_label_layout(labels, batch_size)
    if num_classes is not None and labels.numel() > 0:
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()
        _check_label_range(lo, hi, num_classes)


def _check_label_layout(labels: Tensor, batch_size: int) -> None:
    """Type, rank, dtype and length of labels ``(B,)`` (no value is read)."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (batch,), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"embeddings and labels differ in length: {batch_size} embeddings but "
            f"{labels.shape[0]} labels"
        )


def _check_label_range(lo: int, hi: int, num_classes: int) -> None:
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a head with {num_classes} classes, "
            f"got values in [{lo}, {hi}]; remap labels to contiguous ids or enlarge "
            "num_classes"
        )
