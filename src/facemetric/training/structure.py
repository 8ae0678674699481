"""Dataset-level state of the structured pair losses, refreshed from the model while training.

Two losses are mostly a structure over the whole training set rather than a batch formula:

- **hierarchical triplet** (Ge et al., ECCV 2018): a class tree built from the embeddings of
  every training image, which gives the loss its violate margins and the batch sampler its
  anchor-neighbour batches (an anchor class and its nearest classes in the tree);
- **magnet** (Rippel et al., ICLR 2016): ``K`` k-means clusters per class, which give the
  sampler its neighbourhood batches (a seed cluster and its nearest impostor clusters) and the
  loss its cluster assignments.

:func:`build_structure` turns ``[class_tree]`` / ``[magnet]`` of a training config into a
:class:`DatasetStructure` (on by default when ``[loss]`` names one of those losses). The loop
uses it the way it uses global hard mining's sampler and ``IndexRefresher``:

- it **is the batch sampler**: batch ``b`` of epoch ``e`` depends only on ``(seed, e, b)``
  and the current state, so the DataLoader restarted after a refresh, or a resumed run,
  draws exactly the batches an uninterrupted run draws;
- it **is the refresher**: before the first step (unless a checkpoint restores the state)
  and after every ``refresh_every`` steps, :meth:`DatasetStructure.refresh` embeds the whole
  dataset with the model (eval mode, no gradient, dataset order, eval transform; the global
  RNGs are not touched) and rebuilds the state; it returns the seconds taken, which the loop
  keeps out of its images/s, logs them split into embedding and building, and keeps
  ``(step, seconds)`` in :attr:`DatasetStructure.history`;
- :meth:`DatasetStructure.attach` links the loss (the tree becomes the loss's ``tree``; the
  magnet loss is wrapped to look up each image's class and cluster from its dataset index,
  which the loop then passes as the target);
- :meth:`DatasetStructure.state_dict` is saved in every checkpoint (under the loop's
  ``hard_sampler`` key) and restored into sampler and loss on resume.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from facemetric.data.samplers import epoch_generator
from facemetric.inference.dataset import Transform, embed_dataset
from facemetric.losses.pair.hierarchical_triplet import (
    AnchorNeighborSampler,
    ClassTree,
    HierarchicalTripletLoss,
)
from facemetric.losses.pair.magnet import MagnetBatchSampler, MagnetClusterIndex, MagnetLoss
from facemetric.training.config import TrainConfig, structured_loss

logger = logging.getLogger(__name__)

class IndexTargets(Dataset):
    """``base[i]`` with the dataset index ``i`` in place of the label: ``(image, i)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[index][0], int(index)


class IndexedMagnetLoss(nn.Module):
    """A :class:`~facemetric.losses.MagnetLoss` called with *dataset indices* as targets.

    ``forward(embeddings, indices)`` looks up each image's class (``labels[i]``) and cluster
    (``index.cluster_ids(i)``, from the last refresh) and returns
    ``loss(embeddings, classes, cluster_ids=clusters)``. The wrapped loss is ``.loss``.
    """

    def __init__(self, loss: MagnetLoss, index: MagnetClusterIndex, labels: Tensor) -> None:
        super().__init__()
        self.loss = loss
        self.index = index
        self.labels = labels

    def forward(self, embeddings: Tensor, indices: Tensor) -> Tensor:
        idx = indices.detach().to("cpu", torch.int64)
        if idx.dim() != 1 or idx.numel() != embeddings.shape[0]:
            raise ValueError(
                f"IndexedMagnetLoss takes one dataset index per embedding, got "
                f"{tuple(idx.shape)} for {embeddings.shape[0]} embeddings"
            )
        assignments = self.index.assignments
        if assignments is None:
            raise ValueError("the magnet cluster index is empty: refresh it before training")
        classes = self.labels[idx].to(embeddings.device)
        clusters = self.index.cluster_ids(idx.to(assignments.device)).to(embeddings.device)
        return self.loss(embeddings, classes, cluster_ids=clusters)


class DatasetStructure(Sampler[list[int]]):
    """Dataset-level state of a loss, refreshed every ``every`` steps, and the batch sampler
    that draws from it (see the module docstring for the protocol the loop relies on).

    Subclasses define the state (:meth:`_rebuild`, :attr:`ready`, :meth:`_state`,
    :meth:`_load`) and the loss link (:meth:`attach`); ``self.batches`` is the sampler.
    """

    kind = ""
    #: whether the attached loss takes dataset indices as targets (see ``training_dataset``)
    index_targets = False
    batches: Any

    def __init__(
        self,
        dataset: Dataset,
        labels: np.ndarray | Tensor,
        *,
        every: int,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        transform: Transform | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if every < 1 or batch_size < 1:
            raise ValueError(f"every and batch_size must be >= 1, got {every}, {batch_size}")
        self.dataset = dataset
        self.labels = torch.as_tensor(np.asarray(labels)).to(torch.int64)
        self.every, self.batch_size, self.device = int(every), int(batch_size), device
        self.transform, self.num_workers = transform, int(num_workers)
        self.history: list[tuple[int, float]] = []
        self.last_timing: dict[str, float] = {}

    # ---- the sampler

    @property
    def num_replicas(self) -> int:
        return int(self.batches.num_replicas)

    @property
    def rank(self) -> int:
        return int(self.batches.rank)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        if not self.ready:
            raise ValueError(
                f"the {self.kind} has not been built yet: call refresh(model, step) first"
            )
        return iter(self.batches)

    def training_dataset(self, dataset: Dataset) -> Dataset:
        """What the training DataLoader reads: ``dataset``, or its items with their index as
        the target when the loss looks its targets up (:attr:`index_targets`)."""
        return IndexTargets(dataset) if self.index_targets else dataset

    # ---- the refresher

    @property
    def ready(self) -> bool:
        """Whether a state exists (built by a refresh or loaded from a checkpoint)."""
        raise NotImplementedError

    def due(self, step: int) -> bool:
        """Whether the state is rebuilt after optimiser step ``step``."""
        return step > 0 and step % self.every == 0

    def refresh(self, model: nn.Module, step: int) -> float:
        """Embed the dataset with ``model`` and rebuild now; returns the seconds it took."""
        started = time.perf_counter()
        summary = self._rebuild(model, step)
        seconds = time.perf_counter() - started
        self.history.append((step, seconds))
        logger.info(
            "step %d: %s refreshed in %.2f s (embed %.2f s, build %.2f s; %s)", step, self.kind,
            seconds, self.last_timing.get("embed", 0.0), self.last_timing.get("build", 0.0),
            summary,
        )
        return seconds

    def __call__(self, model: nn.Module, step: int) -> float | None:
        """Refresh if ``due(step)``; the seconds taken, or ``None``."""
        return self.refresh(model, step) if self.due(step) else None

    def _embed(self, model: nn.Module, consume: Callable[[Tensor, Tensor], None]) -> float:
        """Feed ``consume(embeddings, labels)`` every batch of the dataset in order (float32,
        the model in eval mode under ``no_grad``, its mode restored); the seconds taken."""
        started = time.perf_counter()
        embed_dataset(model, self.dataset, lambda out, labels: consume(out, labels.to(torch.int64)),
                      batch_size=self.batch_size, device=self.device, transform=self.transform,
                      num_workers=self.num_workers)
        return time.perf_counter() - started

    # ---- subclass hooks

    def attach(self, loss: nn.Module) -> nn.Module:
        """Link ``loss`` to the state; returns the module the loop should call."""
        raise NotImplementedError

    def _rebuild(self, model: nn.Module, step: int) -> str:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The state in use (tensors and plain values: what a checkpoint stores)."""
        return {"kind": self.kind, "num_samples": int(self.labels.numel()), **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the sampler and the attached loss."""
        if state.get("kind") != self.kind:
            raise ValueError(
                f"the checkpoint's batch-sampler state is {state.get('kind')!r}, this run "
                f"builds a {self.kind}: the config's [loss] or sampling sections changed"
            )
        if state["num_samples"] != self.labels.numel():
            raise ValueError(
                f"the saved {self.kind} is for {state['num_samples']} images, the dataset "
                f"has {self.labels.numel()}: cannot resume"
            )
        self._load(state)


class ClassTreeStructure(DatasetStructure):
    """The hierarchical triplet loss's global :class:`ClassTree` + anchor-neighbour batches.

    A refresh accumulates, in float64 over the dataset, each class's count, sum of
    embeddings and sum of squared norms (after L2 normalisation when the loss's distance
    normalises) — ``O(C·D)`` memory whatever the number of images — and builds
    ``ClassTree.from_statistics`` (mean ``μ_c``, spread ``v_c = mean ‖r‖² − ‖μ_c‖²``) with the
    loss's ``num_levels``, ``d_L = 4`` on the unit sphere (else the largest class distance).
    The tree goes to the loss (its margins) and to :class:`AnchorNeighborSampler` (the
    neighbour lists are precomputed here, so they count as build time).
    """

    kind = "class tree"

    def __init__(
        self,
        dataset: Dataset,
        labels: np.ndarray | Tensor,
        *,
        anchors_per_batch: int,
        classes_per_anchor: int,
        images_per_class: int,
        every: int,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        transform: Transform | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, labels, every=every, batch_size=batch_size, device=device,
                         transform=transform, num_workers=num_workers)
        self.batches = AnchorNeighborSampler(
            self.labels, None, anchors_per_batch, classes_per_anchor, images_per_class,
            num_batches=num_batches, seed=seed, num_replicas=num_replicas, rank=rank,
        )
        self.classes = torch.unique(self.labels)
        self.loss: HierarchicalTripletLoss | None = None

    @property
    def tree(self) -> ClassTree | None:
        """The tree in use (``None`` before the first refresh)."""
        return self.batches.tree

    @property
    def ready(self) -> bool:
        return self.batches.tree is not None

    def attach(self, loss: nn.Module) -> nn.Module:
        if not isinstance(loss, HierarchicalTripletLoss):
            raise ValueError(
                f"[class_tree] builds the hierarchical triplet loss's tree, but the loss is "
                f"{type(loss).__name__}; set [class_tree] enabled = false for other losses"
            )
        self.loss = loss
        if self.tree is not None:
            loss.tree = self.tree
        return loss

    def _use(self, tree: ClassTree) -> None:
        self.batches.tree = tree
        if self.loss is not None:
            self.loss.tree = tree

    def _rebuild(self, model: nn.Module, step: int) -> str:
        if self.loss is None:
            raise ValueError("attach(loss) the hierarchical triplet loss before refreshing")
        normalize, levels = self.loss.normalize, self.loss.num_levels
        C = int(self.classes.numel())
        sums = torch.zeros(0, dtype=torch.float64)
        norms = torch.zeros(C, dtype=torch.float64)
        counts = torch.zeros(C, dtype=torch.int64)

        def consume(emb: Tensor, lab: Tensor) -> None:
            nonlocal sums
            x = emb.cpu().to(torch.float64)
            if normalize:
                x = F.normalize(x, dim=1)
            if sums.numel() == 0:
                sums = torch.zeros(C, x.shape[1], dtype=torch.float64)
            rows = torch.searchsorted(self.classes, lab)
            sums.index_add_(0, rows, x)
            norms.index_add_(0, rows, (x * x).sum(1))
            counts.index_add_(0, rows, torch.ones_like(rows))

        embed_s = self._embed(model, consume)
        started = time.perf_counter()
        n = counts.to(torch.float64)
        centres = sums / n[:, None]
        spreads = (norms / n - (centres * centres).sum(1)).clamp_min(0.0)
        tree = ClassTree.from_statistics(
            self.classes, counts, centres, spreads, num_levels=levels,
            max_distance=4.0 if normalize else None,
        )
        self._use(tree)
        self.last_timing = {"embed": embed_s, "build": time.perf_counter() - started}
        return f"{C} classes, {levels} levels"

    def _state(self) -> dict[str, Any]:
        return {"tree": None if self.tree is None else self.tree.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        if state["tree"] is None:
            return
        tree = ClassTree.from_state_dict(state["tree"])
        if not torch.equal(tree.classes, self.classes):
            raise ValueError("the saved class tree is for other classes than the dataset's")
        self._use(tree)


class MagnetStructure(DatasetStructure):
    """The magnet loss's :class:`MagnetClusterIndex` + neighbourhood batches.

    A refresh embeds the dataset (kept as float32 on the CPU: ``N × D``) and reclusters it,
    the k-means++ seeding drawn from a generator seeded by ``(seed, step)`` so that a resumed
    run reclusters exactly as the uninterrupted one. :class:`MagnetBatchSampler` reads the
    index at every batch; the loss, wrapped in :class:`IndexedMagnetLoss`, gets every image's
    cluster from it (the loop passes dataset indices as targets, :meth:`training_dataset`).
    """

    kind = "magnet cluster index"
    index_targets = True

    def __init__(
        self,
        dataset: Dataset,
        labels: np.ndarray | Tensor,
        *,
        clusters_per_batch: int,
        samples_per_cluster: int,
        every: int,
        clusters_per_class: int = 8,
        iterations: int = 20,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        transform: Transform | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, labels, every=every, batch_size=batch_size, device=device,
                         transform=transform, num_workers=num_workers)
        self.seed = int(seed)
        self.index = MagnetClusterIndex(clusters_per_class, iterations, seed=seed)
        if num_batches is None:
            per_batch = clusters_per_batch * samples_per_cluster * num_replicas
            num_batches = max(int(self.labels.numel()) // per_batch, 1)
        self.batches = MagnetBatchSampler(
            self.index, clusters_per_batch, samples_per_cluster, num_batches, seed=seed,
            num_replicas=num_replicas, rank=rank,
        )

    @property
    def ready(self) -> bool:
        return self.index.assignments is not None

    def attach(self, loss: nn.Module) -> nn.Module:
        if isinstance(loss, IndexedMagnetLoss):
            loss = loss.loss
        if not isinstance(loss, MagnetLoss):
            raise ValueError(
                f"[magnet] builds the magnet loss's clusters, but the loss is "
                f"{type(loss).__name__}; set [magnet] enabled = false for other losses"
            )
        return IndexedMagnetLoss(loss, self.index, self.labels)

    def _rebuild(self, model: nn.Module, step: int) -> str:
        chunks: list[Tensor] = []
        labels: list[Tensor] = []

        def consume(emb: Tensor, lab: Tensor) -> None:
            chunks.append(emb.cpu())
            labels.append(lab)

        embed_s = self._embed(model, consume)
        started = time.perf_counter()
        self.index.refresh(torch.cat(chunks), torch.cat(labels),
                           generator=epoch_generator(self.seed, 0x4D47, step))
        self.last_timing = {"embed": embed_s, "build": time.perf_counter() - started}
        return f"{self.index.num_clusters} clusters"

    def _state(self) -> dict[str, Any]:
        return {"index": self.index.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        saved = state["index"]
        if saved["assignments"] is not None and saved["assignments"].numel() != self.labels.numel():
            raise ValueError("the saved magnet clusters are for another dataset")
        self.index.load_state_dict(saved)


def build_structure(
    config: TrainConfig,
    labels: np.ndarray,
    dataset: Dataset,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    device: torch.device | str | None = None,
) -> DatasetStructure | None:
    """The :class:`DatasetStructure` that ``config`` asks for: ``[class_tree]`` when
    ``[loss]`` names the hierarchical triplet loss, ``[magnet]`` for the magnet loss, each
    unless its ``enabled`` is false; ``None`` otherwise. ``[batch] p``/``k`` give the batch
    layout (checked by the config)."""
    from facemetric.data.transforms import eval_transform

    kind = structured_loss(config.loss.name)
    if kind is None or not getattr(config, kind).enabled:
        return None
    b = config.batch
    if b.p is None or b.k is None:
        raise ValueError(f"[{kind}] builds the batches: set [batch] p and k")
    common: dict[str, Any] = {
        "seed": config.seed, "num_replicas": num_replicas, "rank": rank, "device": device,
        "transform": eval_transform(config.data.image_size),
        "num_workers": config.data.num_workers,
    }
    if kind == "class_tree":
        ct = config.class_tree
        if b.p % ct.classes_per_anchor:
            raise ValueError(
                f"[class_tree] classes_per_anchor ({ct.classes_per_anchor}) must divide "
                f"[batch] p ({b.p})"
            )
        return ClassTreeStructure(
            dataset, labels, anchors_per_batch=b.p // ct.classes_per_anchor,
            classes_per_anchor=ct.classes_per_anchor, images_per_class=b.k,
            every=ct.refresh_every, batch_size=ct.batch_size, **common,
        )
    mg = config.magnet
    return MagnetStructure(
        dataset, labels, clusters_per_batch=b.p, samples_per_cluster=b.k,
        every=mg.refresh_every, clusters_per_class=mg.clusters_per_class,
        iterations=mg.iterations, batch_size=mg.batch_size, **common,
    )


__all__ = [
    "ClassTreeStructure",
    "DatasetStructure",
    "IndexTargets",
    "IndexedMagnetLoss",
    "MagnetStructure",
    "build_structure",
]
