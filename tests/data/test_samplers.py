"""PKSampler: batch layout, per-epoch coverage, small identities, determinism, errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from facemetric.data.samplers import PKSampler


def _labels() -> list[int]:
    # 23 identities with 1..12 images each, interleaved in the dataset
    sizes = {i: 1 + (i * 5) % 12 for i in range(23)}
    labels = [i for i, n in sizes.items() for _ in range(n)]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
    return [labels[j] for j in order]


def _groups(batch: list[int], k: int) -> list[list[int]]:
    return [batch[i : i + k] for i in range(0, len(batch), k)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_batch_is_p_distinct_identities_times_k(drop_last):
    labels = _labels()
    sampler = PKSampler(labels, p=4, k=3, drop_last=drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len(batch) == 12 == sampler.batch_size
        blocks = _groups(batch, 3)
        ids = [labels[block[0]] for block in blocks]
        assert len(set(ids)) == 4
        for block, identity in zip(blocks, ids, strict=True):
            assert all(labels[i] == identity for i in block)


def test_epoch_covers_every_eligible_identity():
    labels = _labels()
    counts = Counter(labels)
    eligible = {i for i, n in counts.items() if n >= 2}
    sampler = PKSampler(labels, p=4, k=3)
    assert sampler.num_identities == len(eligible) == 21  # two identities have one image
    seen = Counter(labels[b[j]] for b in sampler for j in range(0, 12, 3))
    assert set(seen) == eligible  # one-image identities never appear
    assert len(sampler) == 6  # ceil(21 / 4)
    # 21 = 5·4 + 1: the last batch is completed with 3 identities seen a second time
    assert sorted(seen.values()) == [1] * 18 + [2] * 3

    dropping = PKSampler(labels, p=4, k=3, drop_last=True)
    seen = Counter(labels[b[j]] for b in dropping for j in range(0, 12, 3))
    assert len(dropping) == 5 and len(seen) == 20 and set(seen.values()) == {1}


def test_images_distinct_when_enough_and_all_used_when_too_few():
    labels = _labels()
    counts = Counter(labels)
    for batch in PKSampler(labels, p=5, k=4, seed=3):
        for block in _groups(batch, 4):
            n = counts[labels[block[0]]]
            if n >= 4:
                assert len(set(block)) == 4
            else:  # every image of the identity, the rest repeats of them
                assert len(set(block)) == n


def test_single_image_identities_are_repeated_with_min_images_one():
    labels = [0, 1, 1, 2, 2, 2]
    sampler = PKSampler(labels, p=3, k=2, min_images=1)
    (batch,) = list(sampler)
    blocks = {labels[b[0]]: b for b in _groups(batch, 2)}
    assert blocks[0] == [0, 0]
    assert sorted(blocks[1]) == [1, 2]


def test_min_images_filters_identities():
    labels = _labels()
    counts = Counter(labels)
    sampler = PKSampler(labels, p=2, k=2, min_images=10)
    wanted = {i for i, n in counts.items() if n >= 10}
    assert sampler.num_identities == len(wanted)
    assert {labels[i] for b in sampler for i in b} == wanted


def test_deterministic_and_set_epoch_reshuffles():
    labels = _labels()
    a = list(PKSampler(labels, p=4, k=3, seed=5))
    b = list(PKSampler(labels, p=4, k=3, seed=5))
    assert a == b
    sampler = PKSampler(labels, p=4, k=3, seed=5)
    assert list(sampler) == list(sampler)  # same epoch, same batches
    sampler.set_epoch(1)
    c = list(sampler)
    assert c != a
    sampler.set_epoch(0)
    assert list(sampler) == a
    assert list(PKSampler(labels, p=4, k=3, seed=6)) != a


def test_replicas_split_one_epoch():
    labels = _labels()
    whole = PKSampler(labels, p=3, k=2, drop_last=True, seed=1)  # 21 // 3 = 7 batches
    parts = [
        PKSampler(labels, p=3, k=2, drop_last=True, seed=1, num_replicas=2, rank=r) for r in (0, 1)
    ]
    assert [len(s) for s in parts] == [3, 3]  # 7 // 2, the same for both processes
    ids = [frozenset(labels[i] for i in b) for b in whole]
    part_ids = [[frozenset(labels[i] for i in b) for b in s] for s in parts]
    assert part_ids[0] == ids[0:6:2] and part_ids[1] == ids[1:6:2]
    assert not set(part_ids[0]) & set(part_ids[1])

    wrap = [PKSampler(labels, p=3, k=2, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in wrap] == [4, 4]  # ceil(7 / 2): the 8th batch is the 1st again
    assert [len(list(s)) for s in wrap] == [4, 4]


def test_works_as_a_dataloader_batch_sampler():
    labels = torch.tensor(_labels())
    loader = DataLoader(TensorDataset(labels), batch_sampler=PKSampler(labels, p=4, k=2))
    for (batch_labels,) in loader:
        assert batch_labels.shape == (8,)
        assert torch.equal(batch_labels[0::2], batch_labels[1::2])
        assert batch_labels[0::2].unique().numel() == 4


def test_accepts_numpy_and_tensor_labels():
    labels = _labels()
    ref = list(PKSampler(labels, p=4, k=2))
    assert list(PKSampler(np.asarray(labels), p=4, k=2)) == ref
    assert list(PKSampler(torch.tensor(labels), p=4, k=2)) == ref


def test_too_few_identities_is_a_clear_error():
    with pytest.raises(ValueError, match="at least p=4 identities with >= 2 images"):
        PKSampler([0, 0, 1, 1, 2, 2, 3], p=4, k=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1, "k": 2}, "p >= 2"),
        ({"p": 2, "k": 1}, "k >= 2"),
        ({"p": 2, "k": 2, "min_images": 0}, "min_images"),
        ({"p": 2, "k": 2, "seed": -1}, "seed"),
        ({"p": 2, "k": 2, "num_replicas": 2, "rank": 2}, "rank"),
        ({"p": 2, "k": 2, "num_replicas": 5, "drop_last": True}, "processes"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PKSampler([0, 0, 1, 1, 2, 2, 3, 3], **kwargs)


@pytest.mark.parametrize("labels", [[[0, 1], [2, 3]], [0.0, 1.0, 1.0], [True, False, True]])
def test_bad_labels(labels):
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        PKSampler(labels, p=2, k=2)


def test_negative_epoch():
    with pytest.raises(ValueError, match="epoch"):
        PKSampler([0, 0, 1, 1], p=2, k=2).set_epoch(-1)
