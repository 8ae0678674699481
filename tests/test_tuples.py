"""Index tuples: masks, all pairs/triplets against loops, conversions and checks."""

from __future__ import annotations

import pytest
import torch

from facemetric.tuples import (
    Pairs,
    Triplets,
    all_pairs,
    all_triplets,
    as_pairs,
    check_tuples,
    pair_masks,
    same_label_mask,
)


def _labels() -> torch.Tensor:
    return torch.tensor([3, 1, 3, 0, 1, 3, 7, 0, 1])  # 7 is a singleton


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_same_label_mask_matches_loops():
    labels = _labels().tolist()
    pos, neg = same_label_mask(_labels())
    n = len(labels)
    assert pos.tolist() == [[i != j and labels[i] == labels[j] for j in range(n)] for i in range(n)]
    assert neg.tolist() == [[labels[i] != labels[j] for j in range(n)] for i in range(n)]


def test_all_pairs_matches_loops():
    labels = _labels().tolist()
    n = len(labels)
    pairs = all_pairs(_labels())
    want_pos = [(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    want_neg = [(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]]
    assert list(zip(pairs.pos_a.tolist(), pairs.pos_b.tolist(), strict=True)) == want_pos
    assert list(zip(pairs.neg_a.tolist(), pairs.neg_b.tolist(), strict=True)) == want_neg
    assert (pairs.num_pos, pairs.num_neg) == (len(want_pos), len(want_neg))
    assert pairs.pos_a.dtype == torch.int64


def test_all_triplets_matches_loops():
    labels = _labels().tolist()
    n = len(labels)
    t = all_triplets(_labels())
    want = [
        (a, p, k)
        for a in range(n)
        for p in range(n)
        for k in range(n)
        if a != p and labels[a] == labels[p] and labels[k] != labels[a]
    ]
    assert (
        list(zip(t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), strict=True)) == want
    )
    assert len(t) == len(want) == 86  # 3·2·6 + 3·2·6 + 2·1·7


def test_no_tuples_without_positives():
    labels = torch.arange(5)
    assert all_pairs(labels).num_pos == 0 and all_pairs(labels).num_neg == 20
    assert len(all_triplets(labels)) == 0


def test_triplets_to_pairs_gives_the_distinct_pairs():
    t = Triplets(_t([0, 0, 0, 2, 2]), _t([1, 1, 3, 4, 4]), _t([5, 6, 5, 7, 7]))
    pairs = t.to_pairs()
    pos = list(zip(pairs.pos_a.tolist(), pairs.pos_b.tolist(), strict=True))
    neg = list(zip(pairs.neg_a.tolist(), pairs.neg_b.tolist(), strict=True))
    assert pos == [(0, 1), (0, 3), (2, 4)]
    assert neg == [(0, 5), (0, 6), (2, 7)]
    converted = as_pairs(t)
    assert torch.equal(converted.pos_a, pairs.pos_a) and torch.equal(converted.neg_b, pairs.neg_b)
    empty = Triplets(_t([]), _t([]), _t([])).to_pairs()
    assert empty.num_pos == empty.num_neg == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_pairs_matches_loops_in_lexicographic_order(seed):
    g = torch.Generator().manual_seed(seed)
    a, p, n = (torch.randint(0, 7 + 50 * seed, (60,), generator=g) for _ in range(3))
    pairs = Triplets(a, p, n).to_pairs()
    want_pos = sorted(set(zip(a.tolist(), p.tolist(), strict=True)))
    want_neg = sorted(set(zip(a.tolist(), n.tolist(), strict=True)))
    assert list(zip(pairs.pos_a.tolist(), pairs.pos_b.tolist(), strict=True)) == want_pos
    assert list(zip(pairs.neg_a.tolist(), pairs.neg_b.tolist(), strict=True)) == want_neg
    assert pairs.pos_a.dtype == pairs.neg_b.dtype == torch.int64


def test_as_pairs():
    p = all_pairs(_labels())
    assert as_pairs(p) is p
    with pytest.raises(ValueError, match="expected Pairs or Triplets"):
        as_pairs((1, 2))  # type: ignore[arg-type]


def test_pair_masks_marks_exactly_the_given_pairs():
    p = Pairs(_t([0, 2]), _t([1, 0]), _t([1]), _t([3]))
    pos, neg = pair_masks(p, 4)
    assert pos.nonzero().tolist() == [[0, 1], [2, 0]]
    assert neg.nonzero().tolist() == [[1, 3]]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="equal lengths"):
        Pairs(_t([0, 1]), _t([1]), _t([]), _t([]))
    with pytest.raises(ValueError, match="equal lengths"):
        Pairs(_t([0]), _t([1]), _t([0, 2]), _t([3]))
    with pytest.raises(ValueError, match="equal lengths"):
        Triplets(_t([0]), _t([1]), _t([2, 3]))


def test_check_tuples():
    check_tuples(all_triplets(_labels()), 9)
    check_tuples(all_pairs(_labels()), 9)
    check_tuples(Triplets(_t([]), _t([]), _t([])), 1)
    with pytest.raises(ValueError, match=r"\[0, 9\).*got \[9, 9\]"):
        check_tuples(Triplets(_t([0]), _t([1]), _t([9])), 9)
    with pytest.raises(ValueError, match="another batch"):
        check_tuples(Pairs(_t([0]), _t([1]), _t([-1]), _t([2])), 9)
    with pytest.raises(ValueError, match="for a batch of 4"):
        check_tuples(all_pairs(_labels()), 4)
