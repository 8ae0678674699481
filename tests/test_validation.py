"""Input checks: every bad batch gets a ValueError that names the problem."""

from __future__ import annotations

import pytest
import torch

from facemetric.validation import check_embeddings, check_labels


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_are_refused(bad):
    x = torch.randn(5, 4)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 5 rows"):
        check_embeddings(x)


def test_a_sum_that_overflows_is_not_mistaken_for_nan():
    x = torch.full((4, 4), 3.0e38)  # every entry finite, their float32 sum is inf
    assert not torch.isfinite(x.sum())
    check_embeddings(x)


def test_half_precision_overflowing_sum_passes():
    check_embeddings(torch.full((8, 16), 60000.0, dtype=torch.float16))


def test_shapes_dtypes_and_lengths():
    with pytest.raises(ValueError, match="shape \\(batch, dim\\)"):
        check_embeddings(torch.randn(4))
    with pytest.raises(ValueError, match="empty"):
        check_embeddings(torch.randn(0, 4))
    with pytest.raises(ValueError, match="floating point"):
        check_embeddings(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="differ in length"):
        check_embeddings(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer tensor"):
        check_labels(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        check_labels(torch.tensor([0, 3]), 2, num_classes=3)
