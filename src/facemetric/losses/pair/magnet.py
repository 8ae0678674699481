"""Magnet loss (Rippel, Paluri, Dollár, Bourdev, ICLR 2016).

"Metric Learning with Adaptive Density Discrimination". Three parts, separable in time:

- ``MagnetClusterIndex``: ``K`` clusters per class by k-means over the whole training set's
  embeddings (``refresh(embeddings, labels)``, e.g. once an epoch), all classes at once.
- ``MagnetBatchSampler``: neighbourhood batches — a seed cluster, its ``M − 1`` nearest impostor
  clusters (clusters of other classes), ``D`` examples of each.
- ``MagnetLoss``: on a batch with cluster ids, every sample is pulled to its own batch cluster
  mean and pushed from the means of other classes' clusters, in units of the batch variance.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler

from facemetric.data.samplers import epoch_generator
from facemetric.distances import SquaredEuclideanDistance
from facemetric.losses.pair.base import TupleLoss, has_positive_pair
from facemetric.tuples import Pairs, Triplets
from facemetric.validation import check_embeddings


class MagnetClusterIndex:
    """Per-class k-means clusters of a dataset's embeddings.

    After ``refresh(embeddings, labels)`` (embeddings ``(N, D)`` in dataset order):

    - ``centres`` ``(Q, D)``: the cluster centres, ``Q ≤ K × classes`` (a class with fewer than
      ``K`` distinct samples gets fewer clusters; empty clusters are dropped);
    - ``cluster_labels`` ``(Q,)``: the class of each cluster;
    - ``assignments`` ``(N,)``: each sample's cluster id, ``cluster_ids(indices)`` for a batch.

    k-means runs in torch for all classes together: k-means++ seeding (per class, ``K`` rounds
    over the whole set), then Lloyd iterations until no assignment changes or ``iterations``
    is reached; an emptied cluster keeps its previous centre. Each sample is compared with its
    own class's ``K`` centres only, in chunks of ``chunk_size`` samples.
    """

    def __init__(
        self,
        clusters_per_class: int = 8,
        iterations: int = 20,
        seed: int = 0,
        chunk_size: int = 4096,
    ) -> None:
        if clusters_per_class < 1 or iterations < 1 or chunk_size < 1:
            raise ValueError("clusters_per_class, iterations and chunk_size must be >= 1")
        self.clusters_per_class = clusters_per_class
        self.iterations = iterations
        self.chunk_size = chunk_size
        self._gen = torch.Generator().manual_seed(seed)
        self.centres: Tensor | None = None
        self.cluster_labels: Tensor | None = None
        self.assignments: Tensor | None = None
        self.member_order = self.member_counts = self.member_starts = torch.empty(0)
        self._centre_sq = torch.empty(0)

    @property
    def num_clusters(self) -> int:
        return 0 if self.centres is None else int(self.centres.shape[0])

    def _require(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.centres is None or self.cluster_labels is None or self.assignments is None:
            raise ValueError("the cluster index is empty; call refresh(embeddings, labels) first")
        return self.centres, self.cluster_labels, self.assignments

    def cluster_ids(self, indices: Tensor) -> Tensor:
        """Cluster id of each dataset index (for ``MagnetLoss(..., cluster_ids=...)``)."""
        return self._require()[2][indices]

    def refresh(
        self, embeddings: Tensor, labels: Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """Recluster: ``K`` k-means clusters per class of ``embeddings`` ``(N, D)``.

        The k-means++ seeding draws from ``generator`` when given (a training run seeds one
        per refresh, so a resumed run reclusters identically), else from the index's own
        generator (seeded at construction, advanced by every refresh).
        """
        check_embeddings(embeddings, labels)
        x = embeddings.detach()
        _, cls = torch.unique(labels.detach(), return_inverse=True)
        C = int(cls.max()) + 1
        K = self.clusters_per_class
        centres, valid = self._seed(x, cls, C, K, self._gen if generator is None else generator)
        assign = torch.full_like(cls, -1)
        for _ in range(self.iterations):
            new = self._assign(x, cls, centres, valid, K)
            if torch.equal(new, assign):
                break
            assign = new
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=C * K)
            filled = counts > 0
            centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        counts = torch.bincount(assign, minlength=C * K)
        keep = counts > 0
        new_id = torch.cumsum(keep.long(), 0) - 1
        self._set(centres[keep], labels.detach()[_first_of(cls, C)][keep.nonzero()[:, 0] // K],
                  new_id[assign])

    def _set(self, centres: Tensor, cluster_labels: Tensor, assignments: Tensor) -> None:
        self.centres, self.cluster_labels, self.assignments = centres, cluster_labels, assignments
        self._centre_sq = (centres * centres).sum(1)
        # members of each cluster, contiguous (for the batch sampler)
        self.member_order = torch.argsort(assignments.cpu(), stable=True)
        self.member_counts = torch.bincount(assignments.cpu(), minlength=centres.shape[0])
        self.member_starts = torch.cumsum(self.member_counts, 0) - self.member_counts

    def state_dict(self) -> dict[str, Tensor | None]:
        """Centres, cluster labels and assignments (``None`` before the first refresh)."""
        def saved(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"centres": saved(self.centres), "cluster_labels": saved(self.cluster_labels),
                "assignments": saved(self.assignments)}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Restore :meth:`state_dict` (the member lists are recomputed)."""
        centres, cl_labels, assign = state["centres"], state["cluster_labels"], state["assignments"]
        if centres is None or cl_labels is None or assign is None:
            self.centres = self.cluster_labels = self.assignments = None
            return
        if int(assign.max()) >= centres.shape[0] or cl_labels.shape[0] != centres.shape[0]:
            raise ValueError("inconsistent MagnetClusterIndex state: ids past the centres")
        self._set(centres.clone(), cl_labels.clone(), assign.clone())

    def _seed(
        self, x: Tensor, cls: Tensor, C: int, K: int, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """k-means++ seeding per class: slot ``c·K + r`` gets class ``c``'s ``r``-th seed."""
        N = x.shape[0]
        centres = torch.zeros(C * K, x.shape[1], dtype=x.dtype, device=x.device)
        valid = torch.zeros(C * K, dtype=torch.bool, device=x.device)
        n_c = torch.bincount(cls, minlength=C)
        nearest = torch.full((N,), float("inf"), dtype=x.dtype, device=x.device)
        taken = torch.zeros(N, dtype=torch.bool, device=x.device)
        idx = torch.arange(N, device=x.device)
        for r in range(K):
            # draw one sample per class with probability ∝ D² (uniform in the first round):
            # the smallest Exp(1)/w per class, w = D² (never a sample already taken)
            w = torch.ones_like(nearest) if r == 0 else nearest.clone()
            w[taken] = 0.0
            expo = -torch.log(torch.rand(N, generator=gen, dtype=x.dtype).clamp_min(1e-300))
            key = (expo.to(x.device) / w).masked_fill(taken, float("inf"))
            best = torch.full((C,), float("inf"), dtype=x.dtype, device=x.device)
            best = best.scatter_reduce(0, cls, key, "amin")
            hit = (key == best[cls]) & torch.isfinite(key)
            pick = torch.full((C,), N, dtype=torch.long, device=x.device)
            pick = pick.scatter_reduce(0, cls[hit], idx[hit], "amin")
            ok = (pick < N) & (n_c > r)
            slots = torch.arange(C, device=x.device)[ok] * K + r
            chosen = pick[ok]
            centres[slots] = x[chosen]
            valid[slots] = True
            taken[chosen] = True
            own = centres.view(C, K, -1)[cls, r]
            d = (x - own).pow(2).sum(1)
            has = valid.view(C, K)[cls, r]
            nearest = torch.where(has, torch.minimum(nearest, d), nearest)
        return centres, valid

    def _assign(self, x: Tensor, cls: Tensor, centres: Tensor, valid: Tensor, K: int) -> Tensor:
        """Nearest valid centre of the sample's own class, as a global slot ``c·K + k``."""
        C = centres.shape[0] // K
        cen = centres.view(C, K, -1)
        ok = valid.view(C, K)
        sq_c = (cen * cen).sum(-1)
        out = torch.empty_like(cls)
        for s in range(0, x.shape[0], self.chunk_size):
            xc, cc = x[s : s + self.chunk_size], cls[s : s + self.chunk_size]
            dot = torch.bmm(cen[cc], xc[:, :, None])[:, :, 0]
            d = (sq_c[cc] - 2.0 * dot).masked_fill(~ok[cc], float("inf"))
            out[s : s + self.chunk_size] = cc * K + torch.argmin(d, dim=1)
        return out

    def nearest_impostors(self, cluster: int, count: int) -> Tensor:
        """The ``count`` clusters of other classes nearest to ``cluster``'s centre."""
        centres, cl_labels, _ = self._require()
        d = self._centre_sq - 2.0 * (centres @ centres[cluster])  # ‖μ − c‖² minus ‖c‖²
        d = d.masked_fill(cl_labels == cl_labels[cluster], float("inf"))
        count = min(count, int(torch.isfinite(d).sum()))
        return torch.topk(d, count, largest=False).indices


def _first_of(cls: Tensor, C: int) -> Tensor:
    """Index of the first sample of each class id ``0..C−1``."""
    idx = torch.arange(cls.numel(), device=cls.device)
    first = torch.full((C,), cls.numel(), dtype=torch.long, device=cls.device)
    return first.scatter_reduce(0, cls, idx, "amin")


class MagnetBatchSampler(Sampler[list[int]]):
    """Neighbourhood batches over a ``MagnetClusterIndex`` (yields lists of dataset indices).

    Each batch: a seed cluster drawn uniformly, its ``clusters_per_batch − 1`` nearest impostor
    clusters, ``samples_per_cluster`` members of each (without replacement when the cluster is
    big enough, with replacement otherwise), laid out cluster by cluster, the seed first. The
    index is read at every batch, so a ``refresh`` takes effect at once. The loss's cluster
    ids: ``index.cluster_ids(batch)``. (The paper also draws seeds in proportion to their
    recent loss; here they are uniform.)

    **Determinism**: batch ``b`` of epoch ``e`` (:meth:`set_epoch`) is drawn from its own
    generator seeded by ``(seed, e, b·num_replicas + rank)``: it depends only on those and the
    index, so a resumed run redraws the same batches and processes draw different ones.
    ``num_batches`` is the number of batches per epoch and process.
    """

    def __init__(
        self,
        index: MagnetClusterIndex,
        clusters_per_batch: int,
        samples_per_cluster: int,
        num_batches: int,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if min(clusters_per_batch, samples_per_cluster, num_batches) < 1:
            raise ValueError("clusters_per_batch, samples_per_cluster, num_batches must be >= 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad rank {rank} for num_replicas {num_replicas}")
        self.index = index
        self.clusters_per_batch = clusters_per_batch
        self.samples_per_cluster = samples_per_cluster
        self.num_batches = num_batches
        self.seed, self.epoch = int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)

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
            yield self._batch(epoch_generator(self.seed, self.epoch, 0x3A6E, number))

    def _batch(self, gen: torch.Generator) -> list[int]:
        self.index._require()
        Q = self.index.num_clusters
        seed = int(torch.randint(Q, (1,), generator=gen))
        chosen = torch.cat(
            [
                torch.tensor([seed]),
                self.index.nearest_impostors(seed, self.clusters_per_batch - 1).cpu(),
            ]
        )
        order, starts = self.index.member_order, self.index.member_starts
        n, t = self.index.member_counts[chosen], self.samples_per_cluster
        keys = torch.rand(chosen.numel(), int(n.max()), generator=gen)
        keys[torch.arange(keys.shape[1])[None, :] >= n[:, None]] = 2.0  # padding last
        perm = F.pad(torch.argsort(keys, dim=1), (0, max(t - keys.shape[1], 0)))[:, :t]
        repl = (torch.rand(chosen.numel(), t, generator=gen) * n[:, None]).long()
        offsets = torch.where((n >= t)[:, None], perm, repl)
        return order[starts[chosen][:, None] + offsets].reshape(-1).tolist()


class MagnetLoss(TupleLoss):
    """Magnet loss, mean over the ``N`` samples of the batch:

    ``ℓ = 1/N Σ_n [ −log( exp(−‖r_n − μ̂_{C(n)}‖²/(2σ̂²) − α)
                      / Σ_{c: class(c) ≠ y_n} exp(−‖r_n − μ̂_c‖²/(2σ̂²)) ) ]₊``

    where ``μ̂_c`` is the mean of the batch samples in cluster ``c`` (sample ``n`` included),
    ``σ̂² = 1/(N−1) Σ_n ‖r_n − μ̂_{C(n)}‖²`` (clamped at ``eps``; gradients flow through both),
    and the denominator runs over the batch's clusters of other classes (Rippel et al.,
    ICLR 2016, eq. 4). Squared Euclidean distances, no normalisation.

    Call ``loss(embeddings, labels, cluster_ids=ids)`` with the batch's cluster ids (any
    integers; one id must not span two labels), e.g. ``index.cluster_ids(batch_indices)`` from
    a ``MagnetClusterIndex``. Without ``cluster_ids`` every class of the batch is one cluster.
    Input checks are the base ``TupleLoss`` checks, plus: at least two classes in the batch.
    """

    uses_distance_matrix = False

    def __init__(self, alpha: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__(distance=SquaredEuclideanDistance())
        self.alpha = float(alpha)
        self.eps = float(eps)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None = None,
        cluster_ids: Tensor | None = None,
    ) -> Tensor:
        if cluster_ids is None:
            return super().forward(embeddings, labels, tuples)
        if tuples is not None:
            raise ValueError("MagnetLoss works on clusters, not tuples; pass tuples=None")
        check_embeddings(embeddings, labels)
        if not has_positive_pair(labels):
            raise ValueError(
                f"MagnetLoss: the batch of {labels.numel()} labels has no two samples of the "
                "same identity; sample several images per cluster (MagnetBatchSampler)"
            )
        _check_cluster_ids(cluster_ids, labels)
        return self._magnet(embeddings, labels, cluster_ids)

    def compute(
        self,
        embeddings: Tensor,
        labels: Tensor,
        tuples: Pairs | Triplets | None,
        dist: Tensor | None,
    ) -> Tensor:
        if tuples is not None:
            raise ValueError("MagnetLoss works on clusters, not tuples; pass tuples=None")
        return self._magnet(embeddings, labels, labels)

    def _magnet(self, embeddings: Tensor, labels: Tensor, cluster_ids: Tensor) -> Tensor:
        uniq_labels = torch.unique(labels)
        if uniq_labels.numel() < 2:
            raise ValueError(
                "MagnetLoss needs at least two classes in the batch (the impostor clusters)"
            )
        N = embeddings.shape[0]
        _, cinv = torch.unique(cluster_ids, return_inverse=True)
        Q = int(cinv.max()) + 1
        counts = torch.bincount(cinv, minlength=Q).to(embeddings.dtype)
        means = embeddings.new_zeros(Q, embeddings.shape[1]).index_add(0, cinv, embeddings)
        means = means / counts[:, None]
        cl_label = labels.new_empty(Q).scatter_(0, cinv, labels)
        sq_x = (embeddings * embeddings).sum(1)
        sq_m = (means * means).sum(1)
        d = (sq_x[:, None] + sq_m[None, :] - 2.0 * embeddings @ means.T).clamp_min(0.0)
        own = d.gather(1, cinv[:, None])[:, 0]
        var = (own.sum() / (N - 1)).clamp_min(self.eps)
        logits = (-d / (2.0 * var)).masked_fill(cl_label[None, :] == labels[:, None], float("-inf"))
        per_sample = own / (2.0 * var) + self.alpha + torch.logsumexp(logits, dim=1)
        return F.relu(per_sample).mean()


def _check_cluster_ids(cluster_ids: Tensor, labels: Tensor) -> None:
    if not isinstance(cluster_ids, Tensor) or cluster_ids.dim() != 1:
        raise ValueError("cluster_ids must be a 1-D integer tensor")
    if cluster_ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"cluster_ids must be integers, got {cluster_ids.dtype}")
    if cluster_ids.shape != labels.shape:
        raise ValueError(
            f"cluster_ids and labels differ in length: {cluster_ids.numel()} vs {labels.numel()}"
        )
    pairs = torch.unique(torch.stack([cluster_ids.to(labels.device), labels], 1), dim=0)
    if pairs.shape[0] != torch.unique(cluster_ids).numel():
        raise ValueError("a cluster id spans two labels; clusters must lie within one class")


__all__ = ["MagnetBatchSampler", "MagnetClusterIndex", "MagnetLoss"]
