"""Index tuples: what a miner hands to a pair/tuple loss.

A miner turns ``(embeddings, labels)`` into one of these; every pair/tuple loss accepts the
kinds it understands. All fields are 1-D ``int64`` tensors of batch indices, aligned
element-wise. ``all_pairs``/``all_triplets`` form every valid tuple of a batch, which is what
a loss uses when it is given neither tuples nor a miner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Pairs:
    """Positive pairs ``(pos_a[i], pos_b[i])`` and negative pairs ``(neg_a[j], neg_b[j])``."""

    pos_a: Tensor
    pos_b: Tensor
    neg_a: Tensor
    neg_b: Tensor

    def __post_init__(self) -> None:
        if self.pos_a.shape != self.pos_b.shape or self.neg_a.shape != self.neg_b.shape:
            raise ValueError(
                "Pairs needs pos_a/pos_b and neg_a/neg_b of equal lengths, got "
                f"{tuple(self.pos_a.shape)}/{tuple(self.pos_b.shape)} and "
                f"{tuple(self.neg_a.shape)}/{tuple(self.neg_b.shape)}"
            )

    @property
    def num_pos(self) -> int:
        return int(self.pos_a.numel())

    @property
    def num_neg(self) -> int:
        return int(self.neg_a.numel())


@dataclass(frozen=True)
class Triplets:
    """Triplets ``(anchor[i], positive[i], negative[i])``: same label a–p, different a–n."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor

    def __post_init__(self) -> None:
        if not (self.anchor.shape == self.positive.shape == self.negative.shape):
            raise ValueError(
                "Triplets needs anchor/positive/negative of equal lengths, got "
                f"{tuple(self.anchor.shape)}, {tuple(self.positive.shape)}, "
                f"{tuple(self.negative.shape)}"
            )

    def __len__(self) -> int:
        return int(self.anchor.numel())

    def to_pairs(self) -> Pairs:
        """The distinct positive (a, p) and negative (a, n) pairs the triplets contain."""
        pos_a, pos_b = _unique_pairs(self.anchor, self.positive)
        neg_a, neg_b = _unique_pairs(self.anchor, self.negative)
        return Pairs(pos_a, pos_b, neg_a, neg_b)


def _unique_pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct ``(a[i], b[i])`` in lexicographic order, like ``torch.unique(dim=0)``.

    Each pair is encoded as one integer ``(a − lo)·n + (b − lo)``, which sorts the same way;
    a 1-D ``unique`` on those is far faster than ``unique(dim=0)`` on the stacked rows.
    """
    if a.numel() == 0:
        return a.clone(), b.clone()
    lo = torch.minimum(a.min(), b.min())
    n = torch.maximum(a.max(), b.max()) - lo + 1
    key = torch.unique((a - lo) * n + (b - lo))
    return key // n + lo, key % n + lo


def same_label_mask(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean ``(B, B)`` masks of positive pairs (same label, i≠j) and negative pairs."""
    same = labels[:, None] == labels[None, :]
    pos = same.clone()
    pos.fill_diagonal_(False)
    return pos, ~same


def all_pairs(labels: Tensor) -> Pairs:
    """Every ordered positive pair (i≠j, same label) and every ordered negative pair."""
    pos, neg = same_label_mask(labels)
    pa, pb = pos.nonzero(as_tuple=True)
    na, nb = neg.nonzero(as_tuple=True)
    return Pairs(pa, pb, na, nb)


def all_triplets(labels: Tensor) -> Triplets:
    """Every triplet (a, p, n) with label[a]==label[p], a≠p, label[a]≠label[n].

    Ordered by (a, p, n). Built from the ``|P| × B`` mask of positive pairs against
    candidate negatives, not a ``B³`` one.
    """
    pos, neg = same_label_mask(labels)
    a, p = pos.nonzero(as_tuple=True)
    pair_index, n = neg[a].nonzero(as_tuple=True)
    return Triplets(a[pair_index], p[pair_index], n)


def as_pairs(tuples: Pairs | Triplets) -> Pairs:
    """Pairs from either kind of tuple (triplets give their distinct a–p and a–n pairs)."""
    if isinstance(tuples, Pairs):
        return tuples
    if isinstance(tuples, Triplets):
        return tuples.to_pairs()
    raise ValueError(f"expected Pairs or Triplets, got {type(tuples).__name__}")


def pair_masks(pairs: Pairs, batch_size: int) -> tuple[Tensor, Tensor]:
    """Boolean ``(B, B)`` masks with ``True`` at the given positive / negative pairs."""
    device = pairs.pos_a.device
    pos = torch.zeros(batch_size, batch_size, dtype=torch.bool, device=device)
    neg = torch.zeros(batch_size, batch_size, dtype=torch.bool, device=device)
    pos[pairs.pos_a, pairs.pos_b] = True
    neg[pairs.neg_a, pairs.neg_b] = True
    return pos, neg


def check_tuples(tuples: Pairs | Triplets, batch_size: int) -> None:
    """Raise ``ValueError`` if any index lies outside ``[0, batch_size)``."""
    fields = (
        (tuples.pos_a, tuples.pos_b, tuples.neg_a, tuples.neg_b)
        if isinstance(tuples, Pairs)
        else (tuples.anchor, tuples.positive, tuples.negative)
    )
    for f in fields:
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= batch_size):
            raise ValueError(
                f"tuple indices must lie in [0, {batch_size}) for a batch of {batch_size}, "
                f"got [{int(f.min())}, {int(f.max())}]; were the tuples mined on another batch?"
            )


__all__ = [
    "Pairs",
    "Triplets",
    "all_pairs",
    "all_triplets",
    "as_pairs",
    "check_tuples",
    "pair_masks",
    "same_label_mask",
]
