"""Global hard-negative mining: an index of the dataset's embeddings, refreshed every ``N``
steps, that builds P×K batches from identities the model confuses with each other.

A batch miner only sees the negatives its batch happens to hold; with thousands of
identities, a random P×K batch rarely holds two people the model mixes up. Here the whole
dataset is embedded every ``N`` steps, each identity is summarised by its *centroid*

    c_y = normalise( Σ_{i: y_i = y} e_i / ‖e_i‖ )

and each batch is built around a few *seed* identities plus the identities whose centroids
are nearest to theirs (highest cosine ``c_a · c_b``), ``K`` images each. The batch miner and
pair loss then find hard negatives inside the batch (the idea of "smart mining"/doppelganger
batches, e.g. Smirnov et al., *Doppelganger Mining for Face Representation Learning*, 2017).

The index itself, :class:`~facemetric.index.EmbeddingIndex`, lives in :mod:`facemetric.index`
(shared with the gallery) and is re-exported here; its identity-mode neighbour table is a
:func:`~facemetric.index.knn_table` (exact, or an IVF join tuned to a measured recall).

:class:`HardIdentitySampler` is the batch sampler (same contract as ``PKSampler``) and
:class:`IndexRefresher` the hook the training loop calls after each step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from facemetric.data.samplers import (
    batches_per_replica,
    draw_images,
    epoch_generator,
    identity_images,
    shuffled_groups,
)
from facemetric.index import EmbeddingIndex
from facemetric.index._search import as_labels

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the sampler


class HardIdentitySampler(Sampler[list[int]]):
    """P×K batches built around seed identities and the identities they are confused with.

    Every batch starts from ``s = ⌈p / (neighbours + 1)⌉`` *seed* identities; each seed is
    followed by its ``neighbours`` nearest identities (per the last :meth:`use_index`) that
    are not in the batch yet, until the batch has ``p`` identities; any slot left (an
    identity unknown to the index, or none given yet) is filled with identities drawn at
    random. Each identity contributes ``k`` images (as ``PKSampler``: distinct when it has
    ``k``, otherwise all plus repeats); the batch is laid out identity by identity.

    - **Epoch**: the eligible identities (``>= min_images`` images) are shuffled and cut
      into groups of ``s`` seeds, so every identity is a seed once per epoch, and an epoch
      has ``⌈C / s⌉`` batches (``⌊C / s⌋`` with ``drop_last``) whatever the index — about
      ``neighbours + 1`` times as many as ``PKSampler``'s. The seed order is
      ``PKSampler``'s, so with ``neighbours=0`` the identity groups are ``PKSampler``'s.
    - **Before any index**, fills are uniform random: P distinct identities × K images.
    - **Determinism**: batch ``b`` of an epoch depends only on ``(seed, epoch, b)`` and the
      neighbour table in use when it is drawn (saved by :meth:`state_dict`), so a resumed
      run reproduces the batches of an uninterrupted one.
    - **Several processes**: each takes every ``num_replicas``-th batch starting at ``rank``.

    Args:
        labels: identity label of every dataset item.
        p: identities per batch (``>= 2``); k: images per identity (``>= 2``).
        neighbours: identities added per seed (``0 <= neighbours < p``).
        min_images, drop_last, seed, num_replicas, rank: as for ``PKSampler``.
        table_width: neighbours kept per identity by :meth:`use_index` (default
            ``2·neighbours + 2``, the spares replace neighbours already in the batch).
    """

    def __init__(
        self,
        labels: Sequence[int] | Tensor | np.ndarray,
        p: int,
        k: int,
        *,
        neighbours: int = 3,
        min_images: int = 2,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        table_width: int | None = None,
    ) -> None:
        super().__init__()
        lab = as_labels(labels)
        if p < 2 or k < 2:
            raise ValueError(f"need p >= 2 identities and k >= 2 images each, got p={p}, k={k}")
        if not 0 <= neighbours < p:
            raise ValueError(f"neighbours must be in [0, p) = [0, {p}), got {neighbours}")
        if min_images < 1 or seed < 0:
            raise ValueError(f"need min_images >= 1 and seed >= 0, got {min_images}, {seed}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad rank {rank} for num_replicas {num_replicas}")
        # label of identity position i (ascending) and its image indices
        self.identity_labels, self._images, _ = identity_images(lab, min_images)
        if len(self._images) < p:
            raise ValueError(
                f"need at least p={p} identities with >= {min_images} images, got "
                f"{len(self._images)}; lower p or min_images"
            )
        self.p, self.k, self.neighbours = int(p), int(k), int(neighbours)
        self.seeds_per_batch = math.ceil(self.p / (self.neighbours + 1))
        self.table_width = table_width or 2 * self.neighbours + 2
        self.drop_last, self.seed, self.epoch = drop_last, int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self._len = batches_per_replica(len(self._images), self.seeds_per_batch,
                                        self.num_replicas, drop_last)
        self._table: Tensor | None = None  # (C, table_width) identity positions, -1 = none

    @property
    def num_identities(self) -> int:
        """How many identities are eligible."""
        return len(self._images)

    @property
    def batch_size(self) -> int:
        """``p * k``."""
        return self.p * self.k

    @property
    def has_index(self) -> bool:
        """Whether a neighbour table is in use (``use_index`` was called)."""
        return self._table is not None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle the next ``iter()`` produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return self._len

    def use_index(self, index: EmbeddingIndex) -> None:
        """Take each identity's nearest identities from ``index`` for the batches drawn from
        now on. Identities the index lacks get random company; neighbours that are not
        eligible here are skipped."""
        known = torch.isin(self.identity_labels, index.identities)
        table = torch.full((self.num_identities, self.table_width), -1, dtype=torch.int64)
        if bool(known.any()):
            found = index.neighbours(self.identity_labels[known], self.table_width)
            pos = torch.searchsorted(self.identity_labels, found.clamp_min(0))
            pos = pos.clamp_max(self.num_identities - 1)
            ok = (found >= 0) & (self.identity_labels[pos] == found)
            table[known] = torch.where(ok, pos, -1)
        self._table = table

    def state_dict(self) -> dict[str, Any]:
        """The neighbour table in use (what a checkpoint needs to resume exactly)."""
        return {"identity_labels": self.identity_labels.clone(),
                "table": None if self._table is None else self._table.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same labels and ``min_images`` required)."""
        if not torch.equal(state["identity_labels"], self.identity_labels):
            raise ValueError("the saved sampler state is for other identities")
        table = state["table"]
        self._table = None if table is None else table.clone()

    def _seed_groups(self) -> list[list[int]]:
        """All processes' seed groups of this epoch (the ``PKSampler`` shuffle, ``s`` each)."""
        return shuffled_groups(self.num_identities, self.seeds_per_batch,
                               self._len * self.num_replicas,
                               epoch_generator(self.seed, self.epoch, 0), self.drop_last)

    def plan(self) -> Iterator[tuple[list[int], list[int]]]:
        """This process's batches of the epoch as ``(seed labels, identity labels)``,
        without drawing images (``__iter__`` draws ``k`` images for each identity)."""
        labels = self.identity_labels.tolist()
        for seeds, identities, _ in self._batches():
            yield [labels[i] for i in seeds], [labels[i] for i in identities]

    def _batches(self) -> Iterator[tuple[list[int], list[int], int]]:
        groups = self._seed_groups()
        for b in range(self.rank, len(groups), self.num_replicas):
            yield groups[b], self._fill(groups[b], b), b

    def _fill(self, seeds: list[int], batch: int) -> list[int]:
        """``p`` distinct identity positions: each seed, then its nearest not yet taken."""
        chosen: list[int] = []
        taken: set[int] = set()
        table = self._table
        for s in seeds:
            if len(chosen) == self.p:
                break
            added = 0
            if s not in taken:
                chosen.append(s)
                taken.add(s)
                added = 1
            if table is None:
                continue
            for nb in table[s].tolist():
                if added == self.neighbours + 1 or len(chosen) == self.p:
                    break
                if nb >= 0 and nb not in taken:
                    chosen.append(nb)
                    taken.add(nb)
                    added += 1
        if len(chosen) < self.p:
            gen = epoch_generator(self.seed, self.epoch, 0xF111, batch)
            for cand in torch.randperm(self.num_identities, generator=gen).tolist():
                if cand not in taken:
                    chosen.append(cand)
                    taken.add(cand)
                    if len(chosen) == self.p:
                        break
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        for _, identities, b in self._batches():
            gen = epoch_generator(self.seed, self.epoch, 0x1A6E, b)
            batch: list[int] = []
            for identity in identities:
                batch.extend(self._draw(self._images[identity], gen))
            yield batch

    def _draw(self, images: Tensor, gen: torch.Generator) -> list[int]:
        return draw_images(images, self.k, gen)


# --------------------------------------------------------------------------- the hook


class IndexRefresher:
    """Re-embeds the dataset every ``every`` steps and hands the index to the sampler.

    The training loop calls ``refresher(model, step)`` after each optimiser step; the
    seconds each refresh took are returned (so the loop can keep them out of its
    throughput) and kept in :attr:`history` as ``(step, seconds)``.
    """

    def __init__(
        self,
        index: EmbeddingIndex,
        sampler: HardIdentitySampler,
        dataset: Dataset,
        *,
        every: int,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        transform: Callable[[np.ndarray, np.random.Generator], Tensor] | None = None,
        num_workers: int = 0,
        progress: bool = False,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.index, self.sampler, self.dataset = index, sampler, dataset
        self.every, self.batch_size, self.device = int(every), int(batch_size), device
        self.transform, self.num_workers, self.progress = transform, num_workers, progress
        self.history: list[tuple[int, float]] = []

    def due(self, step: int) -> bool:
        """Whether the index is refreshed after optimiser step ``step``."""
        return step > 0 and step % self.every == 0

    def refresh(self, model: nn.Module, step: int) -> float:
        """Embed, index and update the sampler now; returns the seconds it took."""
        started = time.perf_counter()
        self.index.refresh_from_model(
            model, self.dataset, batch_size=self.batch_size, device=self.device,
            transform=self.transform, num_workers=self.num_workers, progress=self.progress,
        )
        search_started = time.perf_counter()
        self.sampler.use_index(self.index)
        seconds = time.perf_counter() - started
        self.history.append((step, seconds))
        timing, table = self.index.last_refresh, self.index.last_table
        if self.index.per_image or not table:
            how = self.index.backend + ("" if self.index.exact else f" {self.index.approximate}")
        elif table["exact"]:
            how = "exact table"
        else:
            how = f"ivf table, nprobe {table['nprobe']}, sample recall {table['sample_recall']:.3f}"
        logger.info(
            "step %d: hard-identity index refreshed in %.2f s (embed %.2f s, build %.2f s, "
            "neighbours %.2f s; %d vectors, %s)", step, seconds, timing.get("embed", 0.0),
            timing.get("build", 0.0), time.perf_counter() - search_started,
            self.index.vectors.shape[0], how,
        )
        return seconds

    def __call__(self, model: nn.Module, step: int) -> float | None:
        """Refresh if ``due(step)``; the seconds taken, or ``None``."""
        return self.refresh(model, step) if self.due(step) else None


__all__ = ["EmbeddingIndex", "HardIdentitySampler", "IndexRefresher"]
