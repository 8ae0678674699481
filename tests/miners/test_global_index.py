"""Global hard-negative mining: the index against brute force, the sampler's batches against
brute-force neighbour lists, determinism, sharding, and harder batches than P×K."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from facemetric.data.samplers import PKSampler
from facemetric.miners.global_index import EmbeddingIndex, HardIdentitySampler, IndexRefresher

# the index extra: only the tests of faiss-backed search skip without it
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss is not installed (pip install 'facemetric[index]')")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """Row ``i``: the ``k`` other rows of highest cosine, best first (float64, loops)."""
    unit = _unit(vectors.astype(np.float64))
    out = np.empty((len(unit), k), dtype=np.int64)
    for i in range(len(unit)):
        sims = unit @ unit[i]
        sims[i] = -np.inf
        out[i] = np.argsort(-sims, kind="stable")[:k]
    return out


def _clustered(n_clusters: int, per_cluster: int, dim: int, spread: float, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=gen)
    return centres.repeat_interleave(per_cluster, 0) + spread * torch.randn(
        n_clusters * per_cluster, dim, generator=gen)


# --------------------------------------------------------------------------- the index


@needs_faiss
def test_exact_faiss_and_torch_match_brute_force():
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(400) * 3 + 5  # arbitrary, sorted identity labels
    ref = _brute_neighbours(x.numpy(), 10)
    found = {}
    for backend in ("faiss", "torch"):
        index = EmbeddingIndex(backend=backend, chunk_size=128)  # several torch blocks
        index.refresh(x, labels)
        assert index.exact and index.backend == backend
        found[backend] = index.neighbours(labels, 10)
        assert torch.equal(found[backend], labels[torch.from_numpy(ref)]), backend
    assert torch.equal(found["faiss"], found["torch"])
    # raw search: same rows, same scores; k beyond the index size pads with -1
    q = F.normalize(x[:7], dim=1)
    a = EmbeddingIndex(backend="faiss")
    b = EmbeddingIndex(backend="torch", chunk_size=50)
    small = x[:60]
    a.refresh(small, torch.arange(60))
    b.refresh(small, torch.arange(60))
    sa, ra = a.search(q, 64)
    sb, rb = b.search(q, 64)
    assert torch.equal(ra, rb)
    assert (ra[:, 60:] == -1).all() and (ra[:, :60] >= 0).all()
    torch.testing.assert_close(sa[:, :60], sb[:, :60], atol=1e-5, rtol=0)
    assert torch.equal(ra[:, 0], torch.arange(7))  # itself first, cosine 1
    torch.testing.assert_close(sa[:, 0], torch.ones(7), atol=1e-5, rtol=0)


def test_neighbours_of_one_identity_and_padding():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    index = EmbeddingIndex(backend="torch")
    index.refresh(x, torch.arange(5))
    one = index.neighbours(2, 3)
    assert one.shape == (3,)
    assert torch.equal(one, torch.from_numpy(_brute_neighbours(x.numpy(), 3)[2]))
    padded = index.neighbours([0, 1], 6)  # only 4 others exist
    assert padded.shape == (2, 6)
    assert (padded[:, 4:] == -1).all() and (padded[:, :4] >= 0).all()
    with pytest.raises(ValueError, match="not in the index"):
        index.neighbours([1, 9], 2)


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(kind):
    # 2500 identities whose centroids come in families (a face set's structure)
    x = _clustered(250, 10, 32, 0.5, seed=2)
    ref = _brute_neighbours(x.numpy(), 10)
    index = EmbeddingIndex(approximate_above=1000, approximate=kind)
    index.refresh(x, torch.arange(2500))
    assert not index.exact and index.backend == "faiss"
    found = index.neighbours(torch.arange(2500), 10).numpy()
    recall = np.mean([len(set(f) & set(r)) / 10 for f, r in zip(found, ref, strict=True)])
    assert recall >= 0.9, recall
    # the neighbour table is an IVF join tuned on a measured sample
    assert not index.last_table["exact"] and index.last_table["sample_recall"] >= 0.9
    # search() goes through the faiss kind; each vector is its own best match
    _, rows = index.search(F.normalize(x, dim=1), 11)
    recall = np.mean([len(set(f[f != i]) & set(r)) / 10
                      for i, (f, r) in enumerate(zip(rows.numpy(), ref, strict=True))])
    assert recall >= 0.9, recall


def test_centroids_match_a_loop():
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 6, generator=gen) * torch.rand(50, 1, generator=gen) * 5
    labels = torch.randint(0, 9, (50,), generator=gen) * 10 - 20  # negative labels too
    index = EmbeddingIndex(backend="torch")
    index.refresh(emb, labels)
    expected_ids = sorted(set(labels.tolist()))
    assert index.identities.tolist() == expected_ids
    for row, identity in enumerate(expected_ids):
        total = np.zeros(6)
        for e, y in zip(emb.numpy().astype(np.float64), labels.tolist(), strict=True):
            if y == identity:
                total += e / np.linalg.norm(e)
        np.testing.assert_allclose(index.vectors[row].numpy(), total / np.linalg.norm(total),
                                   atol=1e-6)
    assert torch.equal(index.vector_labels, index.identities)


@needs_faiss
def test_per_image_neighbours_are_the_closest_image_pairs():
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(120, 16, generator=gen)
    labels = torch.randint(0, 30, (120,), generator=gen)
    index = EmbeddingIndex(per_image=True, backend="faiss", fetch_factor=1)  # forces re-fetch
    index.refresh(emb, labels)
    assert index.vectors.shape == (120, 16)
    unit = _unit(emb.numpy().astype(np.float64))
    ids = sorted(set(labels.tolist()))
    lab = labels.numpy()
    found = index.neighbours(ids, 5)
    for row, a in enumerate(ids):
        best = {b: max(float(unit[i] @ unit[j]) for i in np.flatnonzero(lab == a)
                       for j in np.flatnonzero(lab == b)) for b in ids if b != a}
        expected = sorted(best, key=lambda b: -best[b])[:5]
        assert found[row].tolist() == expected, a
    torch_index = EmbeddingIndex(per_image=True, backend="torch")
    torch_index.refresh(emb, labels)
    assert torch.equal(torch_index.neighbours(ids, 5), found)


def test_bad_inputs_are_refused():
    index = EmbeddingIndex()
    with pytest.raises(ValueError, match="empty"):
        index.neighbours(0, 1)
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        index.refresh(bad, torch.arange(4))
    with pytest.raises(ValueError, match="labels"):
        index.refresh(torch.randn(4, 3), torch.arange(3))
    with pytest.raises(ValueError, match="2 identities"):
        index.refresh(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        EmbeddingIndex(backend="annoy")


class _Faces(Dataset):
    """Items ``(image, label)``: arrays (uint8) or ready tensors."""

    def __init__(self, images: list, labels: list[int]) -> None:
        self.images, self.labels = images, labels
        self.targets = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        return self.images[i], self.labels[i]


def _to_tensor(image: np.ndarray, rng: np.random.Generator) -> Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


@pytest.mark.parametrize("per_image", [False, True])
def test_refresh_from_model_equals_refresh_of_the_embeddings(per_image):
    gen = torch.Generator().manual_seed(5)
    arrays = [torch.randint(0, 256, (6, 6, 3), generator=gen, dtype=torch.uint8).numpy()
              for _ in range(23)]
    labels = [i % 7 + 2 for i in range(23)]  # identities 2..8
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 12), nn.BatchNorm1d(12))
    model.train()
    data = _Faces(arrays, labels)
    index = EmbeddingIndex(per_image=per_image, backend="torch")
    rng_before = torch.get_rng_state()
    index.refresh_from_model(model, data, batch_size=5, transform=_to_tensor, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global draws
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        emb = model(torch.stack([_to_tensor(a, np.random.default_rng()) for a in arrays]))
    reference = EmbeddingIndex(per_image=per_image, backend="torch")
    reference.refresh(emb, torch.tensor(labels))
    assert torch.equal(index.identities, torch.arange(2, 9))
    torch.testing.assert_close(index.vectors, reference.vectors, atol=1e-5, rtol=0)
    assert set(index.last_refresh) == {"embed", "build"}
    with pytest.raises(ValueError, match="transform"):
        index.refresh_from_model(model, data, progress=False)


# --------------------------------------------------------------------------- the sampler

GROUPS, GROUP_SIZE, PER_ID = 8, 4, 5  # 32 identities in 8 families of 4


def _family_problem(seed: int = 6) -> tuple[Tensor, Tensor]:
    """Image embeddings and labels: identities in families (near-identical centroids)."""
    gen = torch.Generator().manual_seed(seed)
    n_id = GROUPS * GROUP_SIZE
    families = torch.randn(GROUPS, 16, generator=gen) * 3
    centres = families.repeat_interleave(GROUP_SIZE, 0) + torch.randn(n_id, 16, generator=gen)
    emb = centres.repeat_interleave(PER_ID, 0) + 0.3 * torch.randn(n_id * PER_ID, 16,
                                                                   generator=gen)
    labels = torch.arange(n_id).repeat_interleave(PER_ID) * 2 + 1  # labels 1, 3, 5 ...
    order = torch.randperm(labels.numel(), generator=gen)  # dataset not sorted by label
    return emb[order], labels[order]


def _indexed_sampler(**kwargs) -> tuple[HardIdentitySampler, EmbeddingIndex, Tensor]:
    emb, labels = _family_problem()
    index = EmbeddingIndex(backend="torch")  # identity tables are backend-independent
    index.refresh(emb, labels)
    options = {"neighbours": 3, "seed": 7, **kwargs}
    sampler = HardIdentitySampler(labels, 8, 3, **options)
    sampler.use_index(index)
    return sampler, index, labels


def _check_layout(batch: list[int], identities: list[int], labels: Tensor, k: int) -> None:
    assert len(batch) == len(identities) * k
    assert len(set(identities)) == len(identities)
    got = labels[torch.tensor(batch)].view(len(identities), k)
    assert got.tolist() == [[i] * k for i in identities]


def test_batches_hold_each_seeds_nearest_identities():
    sampler, index, labels = _indexed_sampler()
    assert sampler.seeds_per_batch == 2 and len(sampler) == 16  # 32 seeds, 2 per batch
    ids = index.identities
    brute = ids[torch.from_numpy(_brute_neighbours(index.vectors.numpy(), 3))]
    near = {int(i): set(brute[r].tolist()) for r, i in enumerate(ids)}
    plans = list(sampler.plan())
    batches = list(sampler)
    assert len(plans) == len(batches) == 16
    for (seeds, identities), batch in zip(plans, batches, strict=True):
        assert len(identities) == 8 and identities[0] == seeds[0]
        for s in seeds:
            assert s in identities and near[s] <= set(identities), (s, near[s], identities)
        _check_layout(batch, identities, labels, 3)
    # families are known: a seed's three neighbours are its own family
    family = {int(y): (int(y) - 1) // 2 // GROUP_SIZE for y in ids}
    for s, nbrs in near.items():
        assert {family[n] for n in nbrs} == {family[s]}
    # every identity is a seed exactly once per epoch
    seeds = [s for plan_seeds, _ in plans for s in plan_seeds]
    assert sorted(seeds) == ids.tolist()


def test_determinism_epochs_and_state_dict():
    a, _, _ = _indexed_sampler()
    b, _, _ = _indexed_sampler()
    assert list(a) == list(b)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != list(b)
    b.set_epoch(1)
    assert list(b) == epoch1
    # a fresh sampler given the saved table draws the same batches
    labels = _family_problem()[1]
    c = HardIdentitySampler(labels, 8, 3, neighbours=3, seed=7)
    assert not c.has_index
    c.load_state_dict(a.state_dict())
    c.set_epoch(1)
    assert c.has_index and list(c) == epoch1
    with pytest.raises(ValueError, match="other identities"):
        HardIdentitySampler(labels[labels != 1], 8, 3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="epoch"):
        a.set_epoch(-1)


@pytest.mark.parametrize("indexed", [False, True])
def test_sharding_splits_the_single_process_epoch(indexed):
    emb, labels = _family_problem()
    index = EmbeddingIndex(backend="torch")
    index.refresh(emb, labels)

    def make(rank: int, replicas: int) -> HardIdentitySampler:
        s = HardIdentitySampler(labels, 8, 3, neighbours=3, seed=2, num_replicas=replicas,
                                rank=rank)
        if indexed:
            s.use_index(index)
        s.set_epoch(3)
        return s

    whole = list(make(0, 1))
    shards = [list(make(r, 4)) for r in range(4)]
    assert all(len(s) == 4 for s in shards)
    interleaved = [shards[b % 4][b // 4] for b in range(16)]
    assert interleaved == whole
    with pytest.raises(ValueError, match="rank"):
        HardIdentitySampler(labels, 8, 3, num_replicas=2, rank=2)


def test_before_any_index_batches_are_pk_style():
    _, labels = _family_problem()
    sampler = HardIdentitySampler(labels, 8, 3, neighbours=3, seed=4)
    assert not sampler.has_index
    seen: set[int] = set()
    for (seeds, identities), batch in zip(sampler.plan(), sampler, strict=True):
        assert identities[:1] == seeds[:1] and set(seeds) <= set(identities)
        _check_layout(batch, identities, labels, 3)
        seen.update(identities)
    assert seen == set(labels.tolist())
    # with no neighbours the identity groups are exactly PKSampler's
    plain = HardIdentitySampler(labels, 8, 3, neighbours=0, seed=4)
    pk = PKSampler(labels, 8, 3, seed=4)
    for epoch in (0, 5):
        plain.set_epoch(epoch)
        pk.set_epoch(epoch)
        assert len(plain) == len(pk)
        pk_groups = [labels[torch.tensor(b[::3])].tolist() for b in pk]
        assert [ids for _, ids in plain.plan()] == pk_groups
    with pytest.raises(ValueError, match="neighbours"):
        HardIdentitySampler(labels, 8, 3, neighbours=8)


def test_identities_missing_from_the_index_get_random_company():
    emb, labels = _family_problem()
    keep = labels < 33  # only the first 16 identities are indexed
    index = EmbeddingIndex(backend="torch")
    index.refresh(emb[keep], labels[keep])
    sampler = HardIdentitySampler(labels, 8, 3, neighbours=3, seed=1)
    sampler.use_index(index)
    for (seeds, identities), batch in zip(sampler.plan(), sampler, strict=True):
        _check_layout(batch, identities, labels, 3)
        for s in seeds:
            if s < 33:
                assert set(index.neighbours(s, 3).tolist()) <= set(identities)


def _mean_negative_cosine(batches: list[list[int]], emb: Tensor, labels: Tensor) -> float:
    values = []
    for batch in batches:
        e = F.normalize(emb[batch], dim=1)
        y = labels[batch]
        sims = e @ e.T
        values.append(sims[y[:, None] != y[None, :]].mean().item())
    return float(np.mean(values))


def test_hard_batches_hold_harder_negatives_than_pk_batches():
    # 300 identities in 30 families; the "model" is a fixed embedding per image
    emb = _clustered(30, 10, 24, 0.6, seed=9).repeat_interleave(4, 0)
    emb = emb + 0.2 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(300).repeat_interleave(4)
    hard = HardIdentitySampler(labels, 12, 4, neighbours=3, seed=0)
    pk = PKSampler(labels, 12, 4, seed=0)
    before = _mean_negative_cosine(list(hard), emb, labels)
    index = EmbeddingIndex(approximate_above=100, approximate="ivf")
    index.refresh(emb, labels)
    hard.use_index(index)
    after = _mean_negative_cosine(list(hard), emb, labels)
    baseline = _mean_negative_cosine(list(pk), emb, labels)
    assert abs(before - baseline) < 0.05  # no index: as random as P×K
    assert after > baseline + 0.2, (after, baseline)


class _Lookup(nn.Module):
    """A "backbone" that returns a fixed embedding per image id (the image is its id)."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids.long().flatten()]


def test_refresher_updates_the_sampler_every_n_steps(caplog):
    emb, labels = _family_problem()
    data = _Faces([torch.tensor([i]) for i in range(len(labels))], labels.tolist())
    sampler = HardIdentitySampler(labels, 8, 3, neighbours=3, seed=7)
    refresher = IndexRefresher(EmbeddingIndex(backend="torch"), sampler, data, every=3,
                               batch_size=16)
    model = _Lookup(emb)
    with caplog.at_level(logging.INFO, logger="facemetric.miners.global_index"):
        assert [refresher(model, step) for step in (1, 2)] == [None, None]
        assert not sampler.has_index
        seconds = refresher(model, 3)
    assert seconds is not None and seconds > 0 and refresher.history == [(3, seconds)]
    assert sampler.has_index and "refreshed" in caplog.text
    expected, _, _ = _indexed_sampler()
    assert list(sampler) == list(expected)  # same table as indexing the embeddings directly
    with pytest.raises(ValueError, match="every"):
        IndexRefresher(refresher.index, sampler, data, every=0)


# --------------------------------------------------------------------------- in training


def _train_config(out, **mining):
    from facemetric.training import config_from_dict

    return config_from_dict({
        "seed": 1, "output_dir": str(out),
        "data": {"image_size": 16},
        "model": {"name": "small_cnn", "embedding_size": 8, "options": {"width": 4}},
        "loss": {"name": "triplet", "miner": "batch_hard", "margin": 0.2},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "batch": {"p": 4, "k": 2},
        "train": {"max_steps": 7, "checkpoint_every": 4, "log_every": 3, "device": "cpu"},
        "mining": {"global_index": True, "refresh_every": 3, "neighbours": 1,
                   "backend": "torch", **mining},
    })


class _KilledError(Exception):
    pass


def test_training_refreshes_the_index_and_resumes_exactly(tmp_path, caplog):
    from facemetric.training import load_checkpoint, train

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(12).repeat_interleave(3).tolist()
    images = [torch.randn(3, 16, 16, generator=gen) + y % 4 for y in labels]
    data = _Faces(images, labels)
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="facemetric.miners.global_index"):
        straight = train(_train_config(tmp_path / "a"), dataset=data, progress=False)
    assert [r.message.split(":")[0] for r in caplog.records if "refreshed" in r.message] == [
        "step 3", "step 6"]
    state = load_checkpoint(straight.checkpoint)
    assert state["steps_per_epoch"] == 6  # 12 seeds, 2 per batch
    table = state["hard_sampler"]["table"]
    assert table is not None and table.shape == (12, 4)

    def kill(info) -> None:
        if info.step == 6:
            raise _KilledError

    with pytest.raises(_KilledError):  # checkpoint at 4 holds the table of the step-3 refresh
        train(_train_config(tmp_path / "b"), dataset=data, progress=False, on_step=kill)
    resumed = train(_train_config(tmp_path / "b"), dataset=data, progress=False, resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses
    with pytest.raises(ValueError, match="neighbours"):
        _train_config(tmp_path / "c", neighbours=4)
