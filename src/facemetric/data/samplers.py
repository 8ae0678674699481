"""P×K batch sampling for metric learning: ``P`` identities × ``K`` images per batch.

A pair or triplet loss needs positives in every batch; a uniform sampler over a face dataset
with thousands of identities almost never draws two images of the same person. ``PKSampler``
is a *batch* sampler for ``DataLoader(dataset, batch_sampler=PKSampler(labels, p, k))``.

Rules:

- **Eligible identities** are those with at least ``min_images`` images (default 2). An
  identity with one image cannot form a positive pair, so it is skipped by default; with
  ``min_images=1`` it fills its ``K`` slots with ``K`` copies of its one index, which only
  make distinct positives if the dataset's transform is random (augmented views).
- **Images of an identity**: ``K`` drawn without replacement when it has at least ``K``;
  otherwise all of its images once plus ``K − count`` drawn again with replacement.
- **Epoch**: the eligible identities are shuffled and cut into groups of ``P``, so each is
  visited once per epoch (``K`` of its images). With ``drop_last=False`` (default) the last,
  short group is completed with identities drawn from the other groups (visited twice);
  with ``drop_last=True`` the ``num_identities mod P`` left-over identities skip this epoch
  (a different set every epoch). Either way every batch holds exactly ``P`` distinct
  identities × ``K`` indices, laid out identity by identity.
- **Determinism**: the order depends only on ``(seed, epoch, rank)``; call ``set_epoch``
  before each epoch to reshuffle, as with ``DistributedSampler``.
- **Several processes** (``num_replicas > 1``): every process builds the same list of groups
  and takes every ``num_replicas``-th one starting at ``rank``; all processes get the same
  number of batches (the list is cut short with ``drop_last=True``, wrapped round without).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    """Batches of ``p`` distinct identities × ``k`` dataset indices each.

    Args:
        labels: the identity label of every dataset item, ``labels[i]`` for index ``i``.
        p: identities per batch (``>= 2``, so every batch has negatives).
        k: images per identity (``>= 2``, so every batch has positives).
        min_images: identities with fewer images are never sampled (``>= 1``).
        drop_last: skip the epoch's left-over identities instead of completing a last batch.
        seed: base seed of the shuffles.
        num_replicas: number of processes sharing the epoch (distributed training).
        rank: this process's index in ``[0, num_replicas)``.

    Raises:
        ValueError: bad arguments, or fewer than ``p`` identities with ``min_images`` images.
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor | np.ndarray,
        p: int,
        k: int,
        *,
        min_images: int = 2,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        lab = torch.as_tensor(labels)
        if lab.dim() != 1 or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D sequence of integers, got dtype {lab.dtype} "
                f"and shape {tuple(lab.shape)}"
            )
        if p < 2 or k < 2:
            raise ValueError(
                f"PKSampler needs p >= 2 identities (for negatives) and k >= 2 images each "
                f"(for positives), got p={p}, k={k}"
            )
        if min_images < 1:
            raise ValueError(f"min_images must be >= 1, got {min_images}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, "
                f"got num_replicas={num_replicas}, rank={rank}"
            )
        _, self._identities, total = identity_images(lab, min_images)
        if len(self._identities) < p:
            raise ValueError(
                f"PKSampler needs at least p={p} identities with >= {min_images} images, "
                f"but the {lab.numel()} labels have {len(self._identities)} such identities "
                f"(of {total}); lower p or min_images, or use more data"
            )
        self.p, self.k = int(p), int(k)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._len = batches_per_replica(len(self._identities), self.p, self.num_replicas,
                                        drop_last)

    @property
    def num_identities(self) -> int:
        """How many identities are eligible (have at least ``min_images`` images)."""
        return len(self._identities)

    @property
    def batch_size(self) -> int:
        """``p * k``."""
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next ``iter()`` produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        groups = shuffled_groups(self.num_identities, self.p, self._len * self.num_replicas,
                                 epoch_generator(self.seed, self.epoch, 0), self.drop_last)
        gen = epoch_generator(self.seed, self.epoch, 1 + self.rank)
        for group in groups[self.rank :: self.num_replicas]:
            batch: list[int] = []
            for identity in group:
                batch.extend(self._draw(self._identities[identity], gen))
            yield batch

    def _draw(self, images: Tensor, gen: torch.Generator) -> list[int]:
        return draw_images(images, self.k, gen)


def epoch_generator(*entropy: int) -> torch.Generator:
    """A torch generator seeded from integers (e.g. ``seed, epoch, stream``) through NumPy's
    ``SeedSequence``, so nearby inputs give unrelated streams."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def identity_images(labels: Tensor, min_images: int) -> tuple[Tensor, list[Tensor], int]:
    """``(identity labels, image indices of each, identities in all)`` for the identities with
    at least ``min_images`` images; labels ascending, indices in dataset order."""
    values, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    by_identity = torch.split(torch.argsort(inverse, stable=True), counts.tolist())
    eligible = [i for i, idx in enumerate(by_identity) if idx.numel() >= min_images]
    return values[eligible], [by_identity[i] for i in eligible], int(counts.numel())


def batches_per_replica(items: int, per_batch: int, num_replicas: int, drop_last: bool) -> int:
    """Batches each of ``num_replicas`` processes gets from ``items`` groups of
    ``per_batch`` (rounded down with ``drop_last``, up otherwise); ``ValueError`` if none."""
    rounding = math.floor if drop_last else math.ceil
    n_groups = rounding(items / per_batch)
    length = rounding(n_groups / num_replicas)
    if length == 0:
        raise ValueError(
            f"{n_groups} batches of {per_batch} cannot be shared by {num_replicas} processes "
            "with drop_last=True"
        )
    return length


def shuffled_groups(
    items: int, size: int, total: int, gen: torch.Generator, drop_last: bool
) -> list[list[int]]:
    """``total`` groups of ``size`` distinct positions in ``range(items)``: a shuffle cut into
    groups; without ``drop_last`` a short last group is completed with other positions (none
    repeated within it); groups repeat cyclically to reach ``total``."""
    order = torch.randperm(items, generator=gen).tolist()
    n_full = len(order) // size
    groups = [order[i * size : (i + 1) * size] for i in range(n_full)]
    rest = order[n_full * size :]
    if rest and not drop_last:
        others = order[: n_full * size]
        extra = torch.randperm(len(others), generator=gen)[: size - len(rest)]
        groups.append(rest + [others[i] for i in extra.tolist()])
    return [groups[i % len(groups)] for i in range(total)]


def draw_images(images: Tensor, k: int, gen: torch.Generator) -> list[int]:
    """``k`` of an identity's indices ``images``: distinct when it has ``k`` or more, else
    all of them plus random repeats."""
    count = images.numel()
    picked = images[torch.randperm(count, generator=gen)[:k]]
    if count < k:
        again = images[torch.randint(count, (k - count,), generator=gen)]
        picked = torch.cat([picked, again])
    return picked.tolist()


__all__ = [
    "PKSampler",
    "batches_per_replica",
    "draw_images",
    "epoch_generator",
    "identity_images",
    "shuffled_groups",
]
