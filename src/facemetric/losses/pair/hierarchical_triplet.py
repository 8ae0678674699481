"""Hierarchical triplet loss (Ge, Huang, Dong, Scott, ECCV 2018).

"Deep Metric Learning with Hierarchical Triplet Loss". Three parts, separable in time:

- ``ClassTree``: a class-level hierarchy rebuilt from the embeddings of the whole training set
  (once an epoch, say). Distance between two nodes = mean squared Euclidean distance between
  their samples, ``d(p, q) = 1/(n_p n_q) Σ_{i∈p, j∈q} ‖r_i − r_j‖²``. Leaves are the classes;
  level ``l = 0..L`` merges nodes closer than ``d_l = d_0 + l (d_max − d_0) / L`` where
  ``d_0`` is the average inner-class distance and ``d_max = 4`` (the largest squared distance on
  the unit sphere).
- ``AnchorNeighborSampler``: batches of ``l'`` anchor classes, each with its ``m − 1``
  nearest classes in the tree, ``t`` images per class.
- ``HierarchicalTripletLoss``: ``mean_z [d(a,p) − d(a,n) + α_z]₊`` with the dynamic violate
  margin ``α_z = β + d_{H(y_a, y_n)} − s_{y_a}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler

from facemetric.data.samplers import epoch_generator
from facemetric.distances import Distance, SquaredEuclideanDistance
from facemetric.losses.pair.base import TupleLoss, zero_loss
from facemetric.miners.base import Miner
from facemetric.tuples import Pairs, Triplets, same_label_mask
from facemetric.validation import check_embeddings


@dataclass(frozen=True, eq=False)
class ClassTree:
    """A class hierarchy over a labelled embedding set (squared Euclidean units).

    Attributes (``C`` classes, ``L`` = ``num_levels``):
        classes: ``(C,)`` sorted class ids (the labels the tree knows).
        counts: ``(C,)`` samples per class.
        centres: ``(C, D)`` float64 class means.
        spreads: ``(C,)`` float64 mean squared deviation of a class's samples from its mean,
            ``v_c = 1/n_c Σ_i ‖r_i − μ_c‖²``.
        inner: ``(C,)`` float64 ``s_c = 1/(n_c(n_c−1)) Σ_{i≠j∈c} ‖r_i − r_j‖² = 2 n_c v_c /
            (n_c − 1)``, the average distance within a class (0 for one-sample classes).
        thresholds: ``(L+1,)`` float64 ``d_0 … d_L``.
        node_of: ``(L+1, C)`` int64: the node each class belongs to after the merges of level
            ``l``. At level ``L`` every class is in the root.

    Merging (average linkage cut at the thresholds): at level ``l`` the closest pair of current
    nodes is merged, repeatedly, while its distance is below ``d_l``; a node's distance to
    another is the mean squared distance between their samples, computed exactly from counts,
    means and spreads (``d(A, B) = ‖μ_A − μ_B‖² + v_A + v_B``). Memory is ``O(C²)``.
    """

    classes: Tensor
    counts: Tensor
    centres: Tensor
    spreads: Tensor
    inner: Tensor
    thresholds: Tensor
    node_of: Tensor

    @property
    def num_levels(self) -> int:
        """``L``: the index of the root level."""
        return int(self.thresholds.numel()) - 1

    @property
    def num_classes(self) -> int:
        return int(self.classes.numel())

    @classmethod
    def build(
        cls,
        embeddings: Tensor,
        labels: Tensor,
        num_levels: int = 16,
        normalize: bool = True,
        max_distance: float | None = None,
    ) -> ClassTree:
        """Build the tree from the embeddings ``(N, D)`` and labels ``(N,)`` of a dataset.

        ``normalize`` L2-normalises the embeddings first (the paper's setting, where squared
        distances lie in ``[0, 4]``). ``max_distance`` is ``d_L``: 4 when normalising,
        otherwise (``None``) the largest distance between two classes.
        """
        check_embeddings(embeddings, labels)
        x = embeddings.detach().to(torch.float64)
        if normalize:
            x = F.normalize(x, dim=1)
        classes, inv = torch.unique(labels.detach(), return_inverse=True)
        C = int(classes.numel())
        counts = torch.bincount(inv, minlength=C)
        centres = torch.zeros(C, x.shape[1], dtype=x.dtype, device=x.device)
        centres.index_add_(0, inv, x)
        centres /= counts[:, None].to(x.dtype)
        dev = (x - centres[inv]).pow(2).sum(1)
        spreads = torch.zeros(C, dtype=x.dtype, device=x.device).index_add_(0, inv, dev)
        spreads /= counts.to(x.dtype)
        if max_distance is None and normalize:
            max_distance = 4.0
        return cls.from_statistics(
            classes, counts, centres, spreads, num_levels=num_levels, max_distance=max_distance
        )

    @classmethod
    def from_statistics(
        cls,
        classes: Tensor,
        counts: Tensor,
        centres: Tensor,
        spreads: Tensor,
        num_levels: int = 16,
        max_distance: float | None = None,
        base_threshold: float | None = None,
    ) -> ClassTree:
        """Build the tree from per-class statistics (see the class docstring for their meaning).

        ``base_threshold`` overrides ``d_0`` (by default the mean of ``inner`` over the classes
        with at least two samples); ``max_distance=None`` takes the largest class distance.
        """
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        C = int(classes.numel())
        if C == 0 or centres.dim() != 2 or centres.shape[0] != C:
            raise ValueError(
                f"need centres of shape (C, D) for C={C} classes, got {tuple(centres.shape)}"
            )
        if counts.shape != (C,) or spreads.shape != (C,) or bool((counts < 1).any()):
            raise ValueError("counts and spreads must have shape (C,), counts >= 1")
        if classes.unique().numel() != C:
            raise ValueError("class ids must be distinct")
        order = torch.argsort(classes)
        classes = classes[order].to(torch.int64)
        counts = counts[order].to(torch.int64)
        mu = centres[order].detach().to(torch.float64).clone()
        v = spreads[order].detach().to(torch.float64).clone()
        if not bool(torch.isfinite(mu).all() & torch.isfinite(v).all()):
            raise ValueError("class statistics contain NaN or Inf")
        n = counts.to(torch.float64)
        multi = counts >= 2
        inner = torch.where(multi, 2.0 * n * v / (n - 1.0).clamp_min(1.0), torch.zeros_like(v))
        if base_threshold is None:
            if not bool(multi.any()):
                raise ValueError(
                    "no class has two samples, so the average inner-class distance d_0 is "
                    "undefined; pass base_threshold or use more samples per class"
                )
            base_threshold = float(inner[multi].mean())

        sq = (mu * mu).sum(1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * mu @ mu.T).clamp_min(0.0)
        dist += v[:, None] + v[None, :]
        if max_distance is None:
            max_distance = float(dist.max()) if C > 1 else base_threshold
        step = max(max_distance - base_threshold, 0.0) / num_levels
        levels = torch.arange(num_levels + 1, dtype=torch.float64, device=mu.device)
        thresholds = base_threshold + levels * step

        node_of = _merge_levels(mu, v, n, dist, thresholds)
        return cls(classes, counts, mu, v, inner, thresholds, node_of)

    def state_dict(self) -> dict[str, Tensor]:
        """The tree's tensors by field name (what a training checkpoint stores)."""
        return {f.name: getattr(self, f.name).detach().cpu().clone() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ClassTree:
        """The tree saved by :meth:`state_dict`."""
        names = [f.name for f in fields(cls)]
        missing = sorted(set(names) - set(state))
        if missing:
            raise ValueError(f"not a saved ClassTree: the state lacks {missing}")
        return cls(**{name: state[name].clone() for name in names})

    def index_of(self, labels: Tensor) -> Tensor:
        """Row of each label in the tree's arrays; ``ValueError`` for a class it does not know."""
        classes = self.classes.to(labels.device)
        pos = torch.searchsorted(classes, labels).clamp_max(classes.numel() - 1)
        known = classes[pos] == labels
        if not bool(known.all()):
            missing = torch.unique(labels[~known])[:5].tolist()
            raise ValueError(
                f"labels {missing} are not in the class tree; rebuild it "
                "(ClassTree.build) on a dataset that contains every training class"
            )
        return pos

    def merge_level(self, a: Tensor, b: Tensor) -> Tensor:
        """Level ``H(a, b)`` where class rows ``a`` and ``b`` first share a node (same shape)."""
        node_of = self.node_of.to(a.device)
        apart = node_of[:, a.reshape(-1)] != node_of[:, b.reshape(-1)]
        return apart.sum(0).reshape(a.shape)

    def merge_threshold(self, a: Tensor, b: Tensor) -> Tensor:
        """``d_{H(a, b)}``, the threshold of the level where class rows ``a`` and ``b`` merge."""
        return self.thresholds.to(a.device)[self.merge_level(a, b)]

    def class_distance(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        """Mean squared distance between the samples of class rows ``a`` and ``b`` (all rows
        when ``b`` is ``None``): ``(len(a), len(b))``."""
        mu_a, v_a = self.centres[a], self.spreads[a]
        mu_b, v_b = self.centres, self.spreads
        if b is not None:
            mu_b, v_b = mu_b[b], v_b[b]
        sq_a, sq_b = (mu_a * mu_a).sum(1), (mu_b * mu_b).sum(1)
        d = (sq_a[:, None] + sq_b[None, :] - 2.0 * mu_a @ mu_b.T).clamp_min(0.0)
        return d + v_a[:, None] + v_b[None, :]

    def neighbour_order(self, a: Tensor) -> Tensor:
        """For each class row in ``a``, every other class row, nearest first: ``(len(a), C−1)``.

        "Nearest in the tree" = lowest merge level, ties broken by the class distance.
        """
        C = self.num_classes
        rows = torch.arange(C, device=a.device)
        level = self.merge_level(a[:, None].expand(-1, C), rows[None, :].expand(a.numel(), -1))
        d = self.class_distance(a)
        order = torch.argsort(d, dim=1, stable=True)
        order = order.gather(1, torch.argsort(level.gather(1, order), dim=1, stable=True))
        not_self = order != a[:, None]
        return order[not_self].reshape(a.numel(), C - 1)


def _merge_levels(mu: Tensor, v: Tensor, n: Tensor, dist: Tensor, thresholds: Tensor) -> Tensor:
    """Average-linkage merging cut at ``thresholds``; returns ``node_of`` ``(L+1, C)``.

    Keeps each row's minimum so a merge costs ``O(C·D)`` (the merged node's new row) instead
    of a scan of the whole ``C × C`` matrix. The pair merged is the first minimum in row-major
    order, merged into the lower slot.
    """
    C = mu.shape[0]
    L = thresholds.numel() - 1
    mu, v, n = mu.clone(), v.clone(), n.clone()
    inf = float("inf")
    d = dist.clone()
    d.fill_diagonal_(inf)
    row_min, row_arg = d.min(dim=1)
    sq = (mu * mu).sum(1)
    node = torch.arange(C, device=mu.device)
    node_of = torch.empty(L + 1, C, dtype=torch.int64, device=mu.device)
    active = torch.ones(C, dtype=torch.bool, device=mu.device)
    for level in range(L):
        thr = float(thresholds[level])
        while True:
            i = int(torch.argmin(row_min))
            j = int(row_arg[i])
            if not float(row_min[i]) < thr:
                break
            i, j = min(i, j), max(i, j)
            # merge node j into node i (slot i keeps the merged statistics)
            n_new = n[i] + n[j]
            mu_new = (n[i] * mu[i] + n[j] * mu[j]) / n_new
            v[i] = (
                n[i] * (v[i] + (mu[i] - mu_new).pow(2).sum())
                + n[j] * (v[j] + (mu[j] - mu_new).pow(2).sum())
            ) / n_new
            mu[i], n[i] = mu_new, n_new
            sq[i] = mu_new @ mu_new
            active[j] = False
            node[node == j] = i
            row = (sq + sq[i] - 2.0 * (mu @ mu_new)).clamp_min(0.0) + v + v[i]
            row[~active] = inf
            row[i] = inf
            d[j, :] = inf
            d[:, j] = inf
            d[i, :] = row
            d[:, i] = row
            row_min[j] = inf
            row_min[i], row_arg[i] = row.min(dim=0)
            # rows whose minimum sat at i or j: rescan; others may now be closest to i
            stale = (row_arg == i) | (row_arg == j)
            stale[i] = False
            stale &= active
            if bool(stale.any()):
                row_min[stale], row_arg[stale] = d[stale].min(dim=1)
            better = (row < row_min) | ((row == row_min) & (row_arg > i))
            better &= active & ~stale
            better[i] = False
            row_min[better] = row[better]
            row_arg[better] = i
        node_of[level] = node
    node_of[L] = 0  # the root holds every class
    return node_of


class AnchorNeighborSampler(Sampler[list[int]]):
    """Anchor-neighbour batch sampler over a labels array (yields lists of dataset indices).

    Each batch: ``anchors_per_batch`` (``l'``) anchor classes drawn at random, and for each its
    ``classes_per_anchor − 1`` (``m − 1``) nearest classes in the tree not yet in the batch,
    ``images_per_class`` (``t``) images of each class (without replacement when the class has
    enough, with replacement otherwise) — ``l'·m·t`` indices, laid out class by class, each
    anchor followed by its neighbours. Use as ``DataLoader(batch_sampler=...)``.

    Assign ``sampler.tree = ClassTree.build(...)`` after each rebuild: the setter precomputes
    every class's nearest neighbours (part of the rebuild's cost, not the per-batch cost) and
    the next batch uses them. The tree must contain every class of ``labels``; it may be
    ``None`` at construction (iterating then raises until one is assigned).

    **Determinism**: batch ``b`` of epoch ``e`` (:meth:`set_epoch`) is drawn from its own
    generator seeded by ``(seed, e, b·num_replicas + rank)``, so it depends only on those and
    the tree in use — a resumed run redraws the same batches, and ``num_replicas`` processes
    draw different ones. An epoch has ``num_batches`` batches per process (default: the
    number of images over the batch size and the processes, at least 1).
    """

    def __init__(
        self,
        labels: Tensor | np.ndarray,
        tree: ClassTree | None,
        anchors_per_batch: int,
        classes_per_anchor: int,
        images_per_class: int,
        num_batches: int | None = None,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        lab = torch.as_tensor(np.asarray(labels))
        if lab.dim() != 1 or lab.numel() == 0 or lab.is_floating_point() or lab.dtype == torch.bool:
            raise ValueError("labels must be a non-empty 1-D array of integers")
        lab = lab.to(torch.int64)
        if min(anchors_per_batch, classes_per_anchor, images_per_class) < 1:
            raise ValueError("anchors_per_batch, classes_per_anchor, images_per_class must be >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad rank {rank} for num_replicas {num_replicas}")
        self.labels = lab
        self.anchors_per_batch = anchors_per_batch
        self.classes_per_anchor = classes_per_anchor
        self.images_per_class = images_per_class
        self.batch_size = anchors_per_batch * classes_per_anchor * images_per_class
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_batches = (
            max(lab.numel() // (self.batch_size * self.num_replicas), 1)
            if num_batches is None
            else int(num_batches)
        )
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.seed, self.epoch = int(seed), 0
        self._order = torch.argsort(lab, stable=True)
        self._classes, self._counts = torch.unique(lab, return_counts=True)
        self._starts = torch.cumsum(self._counts, 0) - self._counts
        if self._classes.numel() < anchors_per_batch * classes_per_anchor:
            raise ValueError(
                f"a batch needs {anchors_per_batch * classes_per_anchor} classes, the labels "
                f"have {self._classes.numel()}"
            )
        self._tree: ClassTree | None = None
        if tree is not None:
            self.tree = tree

    @property
    def tree(self) -> ClassTree | None:
        return self._tree

    @tree.setter
    def tree(self, tree: ClassTree) -> None:
        rows = tree.index_of(self._classes.to(tree.classes.device)).cpu()  # class k -> tree row
        C = tree.num_classes
        self._row_to_k = torch.full((C,), -1, dtype=torch.int64)
        self._row_to_k[rows] = torch.arange(rows.numel())
        self._rows = rows
        # the nearest W classes of every class; W covers every class a batch can use up
        width = min(C - 1, (self.anchors_per_batch + 1) * self.classes_per_anchor)
        chunks = [
            tree.neighbour_order(r.to(tree.classes.device))[:, :width].cpu()
            for r in torch.arange(C).split(256)
        ]
        self._neighbours = torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.long)
        self._tree = tree

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``iter()`` produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.num_batches):
            number = b * self.num_replicas + self.rank
            yield self._batch(epoch_generator(self.seed, self.epoch, 0xA7C4, number))

    def _batch(self, gen: torch.Generator) -> list[int]:
        tree = self._tree
        if tree is None:
            raise ValueError(
                "AnchorNeighborSampler has no class tree yet; assign sampler.tree = "
                "ClassTree.build(embeddings, labels) before drawing batches"
            )
        rows, row_to_k = self._rows, self._row_to_k
        used = row_to_k < 0  # tree classes absent from these labels are never picked
        chosen: list[Tensor] = []
        for k in torch.randperm(rows.numel(), generator=gen).tolist():
            if len(chosen) == self.anchors_per_batch:
                break
            anchor = rows[k]
            if used[anchor]:
                continue
            order = self._neighbours[anchor]
            neigh = order[~used[order]][: self.classes_per_anchor - 1]
            if neigh.numel() < self.classes_per_anchor - 1:  # rare: look past the cached ones
                order = tree.neighbour_order(anchor.reshape(1).to(tree.classes.device))[0].cpu()
                neigh = order[~used[order]][: self.classes_per_anchor - 1]
            group = torch.cat([anchor.reshape(1), neigh])
            used[group] = True
            chosen.append(group)
        ks = row_to_k[torch.cat(chosen)]
        t = self.images_per_class
        counts, starts = self._counts[ks], self._starts[ks]
        keys = torch.rand(ks.numel(), int(counts.max()), generator=gen)
        keys[torch.arange(keys.shape[1])[None, :] >= counts[:, None]] = 2.0  # padding last
        perm = F.pad(torch.argsort(keys, dim=1), (0, max(t - keys.shape[1], 0)))[:, :t]
        # classes with fewer than t images: draw with replacement
        repl = (torch.rand(ks.numel(), t, generator=gen) * counts[:, None]).long()
        offsets = torch.where((counts >= t)[:, None], perm, repl)
        return self._order[starts[:, None] + offsets].reshape(-1).tolist()


class HierarchicalTripletLoss(TupleLoss):
    """``mean over triplets z of [d(a,p) − d(a,n) + α_z]₊``, ``α_z = β + d_{H(y_a,y_n)} − s_{y_a}``.

    Ge et al., ECCV 2018. ``d_H`` is the threshold of the tree level where the anchor's and the
    negative's classes merge, ``s_y`` the average distance within class ``y`` (both from
    ``tree``). The mean runs over all triplets given (or all valid triplets of the batch),
    zeros included. ``tuples`` must be ``Triplets`` (or come from a triplet miner).

    **Units.** ``α_z`` is a squared Euclidean distance (between L2-normalised embeddings
    in the paper's setting), so the loss measures in the same units: its ``distance`` is a
    ``SquaredEuclideanDistance`` — ``normalize=True`` by default (the paper writes plain
    norms in the loss; with them ``α_z`` would be in other units). A miner must measure in
    those units too (a ``SquaredEuclideanDistance`` with the same ``normalize``), since it
    ranks and thresholds the triplets the margin is then added to; anything else raises
    ``ValueError``. Give the miner the loss's distance (``default_distance()``), as a
    training config does when ``[loss] distance`` is unset.

    Without a tree (``tree=None``) each batch builds one from its own class statistics
    (``ClassTree.build(embeddings.detach(), labels, num_levels)``, a detached, batch-local
    hierarchy in the same units); set ``loss.tree = ClassTree.build(...)`` on the whole
    dataset each epoch to get the paper's global margin — what a training config does by
    default (``[class_tree]``, :mod:`facemetric.training.structure`).
    """

    def __init__(
        self,
        tree: ClassTree | None = None,
        beta: float = 0.1,
        num_levels: int = 16,
        *,
        distance: Distance | None = None,
        miner: Miner | None = None,
    ) -> None:
        if distance is None:
            distance = self.default_distance()
        _check_units(distance, miner)
        super().__init__(distance=distance, miner=miner)
        self.tree = tree
        self.beta = float(beta)
        self.num_levels = int(num_levels)

    @staticmethod
    def default_distance() -> SquaredEuclideanDistance:
        """The loss's units when none are given: squared distances of L2-normalised embeddings
        (the paper's). A training config lends it to the miner it names."""
        return SquaredEuclideanDistance(normalize=True)

    @property
    def normalize(self) -> bool:
        """Whether distances (and trees built for this loss) use L2-normalised embeddings."""
        return bool(self.distance.normalize)  # type: ignore[attr-defined]

    def margins(self, labels: Tensor, tree: ClassTree) -> tuple[Tensor, Tensor]:
        """``(M, inv)``: ``M[i, j] = β + d_H(c_i, c_j) − s_{c_i}`` over the batch's classes
        ``c = unique(labels)``, and each sample's index into ``c``."""
        uniq, inv = torch.unique(labels, return_inverse=True)
        rows = tree.index_of(uniq.to(tree.classes.device))
        C = rows.numel()
        d_h = tree.merge_threshold(rows[:, None].expand(C, C), rows[None, :].expand(C, C))
        margin = self.beta + d_h - tree.inner[rows][:, None]
        return margin, inv

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        assert dist is not None
        if tuples is not None and not isinstance(tuples, Triplets):
            raise ValueError(
                "HierarchicalTripletLoss needs Triplets (anchor, positive, negative), got "
                f"{type(tuples).__name__}; use a triplet miner"
            )
        pos, neg = same_label_mask(labels)
        if (len(tuples) if tuples is not None else int(pos.sum()) * int(neg.any())) == 0:
            return zero_loss(embeddings)
        tree = self.tree
        if tree is None:
            tree = ClassTree.build(
                embeddings.detach(), labels, num_levels=self.num_levels, normalize=self.normalize
            )
        margin, inv = self.margins(labels, tree)
        margin = margin.to(device=dist.device, dtype=dist.dtype)
        if tuples is not None:
            a, p, n = tuples.anchor, tuples.positive, tuples.negative
            return F.relu(dist[a, p] - dist[a, n] + margin[inv[a], inv[n]]).mean()
        # every valid triplet: one row per positive pair (a, p), one column per sample n,
        # masked to the negatives of a — O(P·B), no B³ index tensor
        a, p = pos.nonzero(as_tuple=True)
        hinge = dist[a, p][:, None] - dist[a] + margin[inv[a]][:, inv]
        valid = neg[a]
        return F.relu(hinge).masked_fill(~valid, 0.0).sum() / valid.sum()


def _units(distance: Distance) -> str:
    name = type(distance).__name__
    return f"{name}(normalize={getattr(distance, 'normalize', '?')})"


def _check_units(distance: Distance, miner: Miner | None) -> None:
    """``ValueError`` unless ``distance`` (and the miner's) are squared Euclidean alike."""
    if type(distance) is not SquaredEuclideanDistance:
        raise ValueError(
            f"HierarchicalTripletLoss: the tree's margins are squared Euclidean distances, so "
            f"the loss must measure in them; got distance={_units(distance)}. Pass "
            "SquaredEuclideanDistance(normalize=True) (the paper's units, the default) or "
            "SquaredEuclideanDistance() for unnormalised embeddings"
        )
    if miner is None:
        return
    mined = miner.distance
    if type(mined) is not SquaredEuclideanDistance or mined.normalize != distance.normalize:
        raise ValueError(
            f"HierarchicalTripletLoss: the miner {type(miner).__name__} measures with "
            f"{_units(mined)} but the loss's margins are in {_units(distance)} units, so it "
            "would rank and threshold triplets on another scale than the loss. Build the miner "
            "with the loss's distance, e.g. "
            f"{type(miner).__name__}(distance=HierarchicalTripletLoss.default_distance()); in a "
            "training config leave [loss] distance unset (the miner then gets the loss's) or "
            'set it to "squared_euclidean" (unnormalised embeddings, for both)'
        )


__all__ = ["AnchorNeighborSampler", "ClassTree", "HierarchicalTripletLoss"]
