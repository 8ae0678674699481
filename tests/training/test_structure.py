"""Dataset-level state in training: the hierarchical triplet's global class tree and the magnet
loss's k-means clusters, refreshed from the model by the real loop, sampled from, seen by the
loss, checkpointed and resumed exactly (``facemetric.training.structure``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from facemetric.losses.pair.hierarchical_triplet import ClassTree, HierarchicalTripletLoss
from facemetric.losses.pair.magnet import MagnetLoss
from facemetric.training import config_from_dict, load_checkpoint, train
from facemetric.training.structure import IndexedMagnetLoss


class _Faces(Dataset):
    """Item ``i`` is ``(tensor([i]), label)``: the "image" is its own index."""

    def __init__(self, labels: list[int]) -> None:
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor([i]), self.targets[i]


class _Lookup(nn.Module):
    """A backbone that returns a learnable embedding per image id, and records the ids of
    every training-mode batch (the refreshes run in eval mode)."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.batches: list[list[int]] = []

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long().flatten()
        if self.training:
            self.batches.append(ids.tolist())
        return self.table[ids]


def _families(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """12 classes in 4 well-separated families of 3, 4 images each: (table, labels, family)."""
    g = torch.Generator().manual_seed(seed)
    family = torch.arange(4).repeat_interleave(3)
    centres = 5.0 * F.normalize(torch.randn(4, 8, generator=g), dim=1)[family]
    centres = centres + torch.randn(12, 8, generator=g)
    labels = torch.arange(12).repeat_interleave(4)
    return centres[labels] + 0.2 * torch.randn(48, 8, generator=g), labels, family


def _config(out: Path, loss_name: str, **sections):
    raw = {
        "seed": 2, "output_dir": str(out), "data": {"image_size": 16},
        "model": {"name": "small_cnn", "embedding_size": 8},
        "loss": {"name": loss_name},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "batch": {"p": 4, "k": 2},
        "train": {"max_steps": 7, "checkpoint_every": 4, "log_every": 3, "device": "cpu"},
        "class_tree": {"refresh_every": 3, "classes_per_anchor": 2},
        "magnet": {"refresh_every": 3, "clusters_per_class": 2, "iterations": 50},
    }
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    return config_from_dict(raw)


class _KilledError(Exception):
    pass


def _kill_at(step: int):
    def hook(info) -> None:
        if info.step == step:
            raise _KilledError

    return hook


def _snapshots(model: _Lookup, steps: tuple[int, ...]):
    """``(on_step, snaps)``: snaps[s] is the table after step s (what the refresh at s saw)."""
    snaps = {0: model.table.detach().clone()}

    def on_step(info) -> None:
        if info.step in steps:
            snaps[info.step] = model.table.detach().clone()

    return on_step, snaps


def _sqd(a: list[float], b: list[float]) -> float:
    return sum((u - v) ** 2 for u, v in zip(a, b, strict=True))


# ------------------------------------------------------------------- hierarchical triplet


def _class_distance_loop(unit: list[list[float]], labels: list[int], a: int, b: int) -> float:
    """Mean squared distance between the samples of classes a and b."""
    A = [u for u, y in zip(unit, labels, strict=True) if y == a]
    B = [u for u, y in zip(unit, labels, strict=True) if y == b]
    return sum(_sqd(p, q) for p in A for q in B) / (len(A) * len(B))


def test_class_tree_is_refreshed_from_the_model_and_batches_are_tree_neighbours(
        tmp_path, caplog):
    table, labels, family = _families()
    model = _Lookup(table)
    on_step, snaps = _snapshots(model, (3, 6))
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="facemetric.training.structure"):
        result = train(_config(tmp_path / "run", "hierarchical_triplet"),
                       dataset=_Faces(labels.tolist()), model=model, progress=False,
                       on_step=on_step)
    refreshed = [r.message.split(":")[0] for r in caplog.records if "refreshed" in r.message]
    assert refreshed == ["step 0", "step 3", "step 6"]  # before step 1, then every 3 steps
    assert all("class tree" in r.message and "embed" in r.message for r in caplog.records
               if "refreshed" in r.message)

    # the tree the loss uses is the global one, rebuilt from the model of the last refresh
    state = load_checkpoint(result.checkpoint)
    assert state["steps_per_epoch"] == 6  # 48 images, batches of p·k = 8
    loss = result.loss
    assert isinstance(loss, HierarchicalTripletLoss) and loss.tree is not None
    saved = ClassTree.from_state_dict(state["hard_sampler"]["tree"])
    direct = ClassTree.build(snaps[6], labels, num_levels=loss.num_levels)
    for name in ("classes", "counts", "node_of"):
        assert torch.equal(getattr(saved, name), getattr(direct, name)), name
        assert torch.equal(getattr(loss.tree, name), getattr(direct, name)), name
    for name in ("centres", "spreads", "inner", "thresholds"):
        torch.testing.assert_close(getattr(saved, name), getattr(direct, name), rtol=1e-9,
                                   atol=1e-12)
    assert len(set(saved.merge_level(torch.tensor([0] * 11), torch.arange(1, 12)).tolist())) >= 2

    # every batch: 2 anchors, each followed by its nearest class in the tree of the last
    # refresh (lowest merge level, then smallest mean squared distance, among unused classes)
    assert len(model.batches) == 7
    y, fam = labels.tolist(), family.tolist()
    same_family = 0
    for step, ids in enumerate(model.batches, start=1):
        snap = snaps[3 * ((step - 1) // 3)]
        tree = ClassTree.build(snap, labels, num_levels=loss.num_levels)
        unit = F.normalize(snap.double(), dim=1).tolist()
        classes = [y[i] for i in ids[::2]]
        assert [y[i] for i in ids[1::2]] == classes and len(set(classes)) == 4
        used: set[int] = set()
        for g in range(0, 4, 2):
            anchor, neighbour = classes[g], classes[g + 1]
            free = [c for c in range(12) if c != anchor and c not in used]
            levels = tree.merge_level(torch.full((len(free),), anchor), torch.tensor(free))
            best = min(zip(levels.tolist(), free, strict=True),
                       key=lambda lc: (lc[0], _class_distance_loop(unit, y, anchor, lc[1])))
            assert neighbour == best[1], (step, anchor, neighbour, best)
            if any(fam[c] == fam[anchor] for c in free):
                assert fam[neighbour] == fam[anchor]  # the tree knows the families
                same_family += 1
            used.update((anchor, neighbour))
    assert same_family >= 7


def test_class_tree_run_resumes_exactly(tmp_path):
    table, labels, _ = _families(1)
    data = _Faces(labels.tolist())
    torch.set_num_threads(1)
    straight = train(_config(tmp_path / "a", "hierarchical_triplet"), dataset=data,
                     model=_Lookup(table), progress=False)
    with pytest.raises(_KilledError):  # checkpoint at 4 holds the tree of the step-3 refresh
        train(_config(tmp_path / "b", "hierarchical_triplet"), dataset=data,
              model=_Lookup(table), progress=False, on_step=_kill_at(6))
    cfg = _config(tmp_path / "b", "hierarchical_triplet")
    cfg.data.num_workers = 1  # a worker after the resume: batches drawn ahead are redrawn
    resumed = train(cfg, dataset=data, model=_Lookup(table), progress=False, resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses and all(v > 0 for v in straight.losses)
    assert torch.equal(resumed.model.table, straight.model.table)
    a = load_checkpoint(straight.checkpoint)["hard_sampler"]["tree"]
    b = load_checkpoint(resumed.checkpoint)["hard_sampler"]["tree"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_class_tree_off_trains_on_pk_batches_with_a_batch_tree(tmp_path):
    table, labels, _ = _families()
    cfg = _config(tmp_path / "off", "hierarchical_triplet", class_tree={"enabled": False},
                  train={"max_steps": 2})
    result = train(cfg, dataset=_Faces(labels.tolist()), model=_Lookup(table), progress=False)
    assert result.loss.tree is None and "hard_sampler" not in load_checkpoint(result.checkpoint)


def test_class_tree_config_errors_and_a_miner_sharing_the_loss_units(tmp_path):
    with pytest.raises(ValueError, match=r"classes_per_anchor \(3\) must divide \[batch\] p"):
        _config(tmp_path, "hierarchical_triplet", class_tree={"classes_per_anchor": 3})
    with pytest.raises(ValueError, match="global_index"):
        _config(tmp_path, "hierarchical_triplet", mining={"global_index": True})
    with pytest.raises(ValueError, match="refresh_every"):
        _config(tmp_path, "magnet", magnet={"refresh_every": 0})
    with pytest.raises(ValueError, match="unknown key 'clusters'"):
        _config(tmp_path, "magnet", magnet={"clusters": 2})
    cfg = _config(tmp_path, "hierarchical_triplet", loss={"miner": "batch_hard"})
    from facemetric.training.builders import build_loss

    loss = build_loss(cfg.loss, 12, 8)
    assert loss.miner.distance is loss.distance and loss.normalize
    with pytest.raises(ValueError, match="squared Euclidean"):  # other units are refused
        build_loss(_config(tmp_path, "hierarchical_triplet",
                           loss={"miner": "batch_hard", "distance": "euclidean"}).loss, 12, 8)


# ------------------------------------------------------------------- magnet


class _RecordingMagnet(MagnetLoss):
    """Records the labels and cluster ids each call receives."""

    def __init__(self) -> None:
        super().__init__(alpha=8.0)  # two images per cluster: a small batch variance
        self.calls: list[tuple[list[int], list[int]]] = []

    def forward(self, embeddings, labels, tuples=None, cluster_ids=None):
        assert cluster_ids is not None
        self.calls.append((labels.tolist(), cluster_ids.tolist()))
        return super().forward(embeddings, labels, tuples, cluster_ids=cluster_ids)


def _two_blob_classes(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """8 classes × 2 blobs × 3 images (48): (table, labels, blob)."""
    g = torch.Generator().manual_seed(seed)
    blob = torch.arange(16).repeat_interleave(3)
    centres = torch.randn(16, 8, generator=g)
    return centres[blob] + 0.3 * torch.randn(48, 8, generator=g), blob // 2, blob


def _magnet_config(out: Path, **train_kw):
    return _config(out, "magnet", loss={"alpha": 8.0}, batch={"p": 3, "k": 2},
                   train={"checkpoint_every": 3, "keep_checkpoints": 5, **train_kw})


def test_magnet_clusters_are_refreshed_sampled_from_and_seen_by_the_loss(tmp_path, caplog):
    table, labels, blob = _two_blob_classes()
    model = _Lookup(table)
    on_step, snaps = _snapshots(model, (3, 6))
    recorder = _RecordingMagnet()
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="facemetric.training.structure"):
        result = train(_magnet_config(tmp_path / "run"), dataset=_Faces(labels.tolist()),
                       model=model, loss=recorder, progress=False, on_step=on_step)
    assert [r.message.split(":")[0] for r in caplog.records if "refreshed" in r.message] == [
        "step 0", "step 3", "step 6"]
    assert isinstance(result.loss, IndexedMagnetLoss) and result.loss.loss is recorder
    assert len(recorder.calls) == len(model.batches) == 7
    assert any(v > 0 for v in result.losses)
    y = labels.tolist()
    for refresh, steps in ((3, range(4, 7)), (6, range(7, 8))):
        index = load_checkpoint(tmp_path / "run" / f"checkpoint_{refresh:09d}.pt")[
            "hard_sampler"]["index"]
        assign, centres = index["assignments"].tolist(), index["centres"].tolist()
        cl_label = index["cluster_labels"].tolist()
        rows = snaps[refresh].tolist()
        # a Lloyd fixed point of the embeddings the refresh saw, K = 2 clusters per class
        assert sorted(cl_label) == sorted(list(range(8)) * 2)
        for c, centre in enumerate(centres):
            members = [r for r, a in zip(rows, assign, strict=True) if a == c]
            mean = [sum(col) / len(members) for col in zip(*members, strict=True)]
            assert all(math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-5)
                       for u, v in zip(centre, mean, strict=True))
        for i, row in enumerate(rows):
            own = [c for c in range(len(centres)) if cl_label[c] == y[i]]
            assert assign[i] == min(own, key=lambda c: _sqd(row, centres[c]))
        assert len(set(zip(assign, blob.tolist(), strict=True))) == 16  # the blobs
        for step in steps:
            ids = model.batches[step - 1]
            seen_labels, seen_clusters = recorder.calls[step - 1]
            assert seen_labels == [y[i] for i in ids]
            assert seen_clusters == [assign[i] for i in ids]  # the refreshed assignment
            # a seed cluster, then its 2 nearest clusters of other classes, 2 images each
            groups = [seen_clusters[k] for k in range(0, 6, 2)]
            assert seen_clusters[1::2] == groups
            seed = groups[0]
            impostors = sorted((c for c in range(len(centres)) if cl_label[c] != cl_label[seed]),
                               key=lambda c: _sqd(centres[c], centres[seed]))
            assert groups[1:] == impostors[:2]


def test_magnet_run_resumes_exactly(tmp_path):
    table, labels, _ = _two_blob_classes(1)
    data = _Faces(labels.tolist())
    torch.set_num_threads(1)
    def cfg(out: Path):
        return _magnet_config(out, checkpoint_every=4)

    straight = train(cfg(tmp_path / "a"), dataset=data, model=_Lookup(table), progress=False)
    with pytest.raises(_KilledError):  # checkpoint at 4 holds the step-3 clusters
        train(cfg(tmp_path / "b"), dataset=data, model=_Lookup(table), progress=False,
              on_step=_kill_at(6))
    resumed = train(cfg(tmp_path / "b"), dataset=data, model=_Lookup(table), progress=False,
                    resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses and any(v > 0 for v in straight.losses)
    assert torch.equal(resumed.model.table, straight.model.table)
    a = load_checkpoint(straight.checkpoint)["hard_sampler"]["index"]
    b = load_checkpoint(resumed.checkpoint)["hard_sampler"]["index"]
    assert all(torch.equal(a[k], b[k]) for k in a)
