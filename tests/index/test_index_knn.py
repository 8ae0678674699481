"""knn_table against float64 numpy brute force: exact tables, the IVF join with nprobe tuned
on measured recall, the join probing every cell (= exact), and the exact fallback for rows
whose probed cells are too small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from index_reference import brute_knn, clustered, recall, unit

from facemetric.index import knn_table


@pytest.fixture(autouse=True)
def _one_thread():
    # results do not depend on it; on a shared 2-core machine 2-thread small GEMMs stall
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_rows(table, vectors: np.ndarray, rows: np.ndarray) -> None:
    """No self, no repeats, and every score the float64 cosine of its pair."""
    ids = table.ids.numpy()
    assert (ids >= 0).all() and (ids != rows[:, None]).all()
    assert all(len(set(r)) == ids.shape[1] for r in ids.tolist())
    u = unit(vectors)
    cos = np.einsum("qd,qkd->qk", u[rows], u[ids])
    np.testing.assert_allclose(table.scores.numpy(), cos, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [None, 8_000])  # 8 kB: many small blocks
def test_exact_table_matches_brute_force(block):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32) * rng.uniform(0.5, 3, (300, 1))
    options = {"max_block_bytes": block} if block else {}
    table = knn_table(x, 7, **options)
    assert table.exact and table.ids.shape == (300, 7) and table.sample_recall == 1.0
    ref_s, ref_i = brute_knn(x, 7)
    np.testing.assert_array_equal(table.ids.numpy(), ref_i)
    np.testing.assert_allclose(table.scores.numpy(), ref_s, atol=1e-5, rtol=0)
    # a subset of rows, and every other row (k = n - 1)
    rows = np.array([5, 299, 0, 5])
    sub = knn_table(torch.from_numpy(x), 299, rows=rows, **options)
    ref_s, ref_i = brute_knn(x, 299, rows=rows)
    np.testing.assert_allclose(sub.scores.numpy(), ref_s, atol=1e-5, rtol=0)
    assert np.mean(sub.ids.numpy() == ref_i) > 0.99
    _check_rows(sub, x, rows)


def test_ivf_with_tuned_nprobe_reaches_the_recall():
    # 12k vectors in families of 12 (a face set's identities come in look-alike groups)
    x, _ = clustered(1000, 12, 32, 0.7, seed=1)
    table = knn_table(x, 10, method="ivf", target_recall=0.92, seed=3)
    assert not table.exact and table.nlist == round(np.sqrt(len(x)))
    assert 1 <= table.nprobe < table.nlist  # approximate, not a full scan
    _, truth = brute_knn(x, 10)
    measured = recall(table.ids.numpy(), truth)
    assert measured >= 0.9, (measured, table.nprobe)
    assert abs(measured - table.sample_recall) <= 0.03  # the sample tells the truth
    _check_rows(table, x, np.arange(len(x)))
    # one probe fewer would have missed the target on the sample: it is the smallest
    fewer = knn_table(x, 10, method="ivf", nprobe=table.nprobe - 1, seed=3)
    assert fewer.sample_recall < 0.92 or table.nprobe == 1
    assert set(table.seconds) >= {"kmeans", "tune", "assign", "join"}


@pytest.mark.parametrize("workers", [1, 2])  # 2: the join split over two threads
def test_ivf_probing_every_cell_is_exact(workers):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 24)).astype(np.float32)
    rows = rng.choice(2000, 300, replace=False)
    table = knn_table(x, 5, rows=rows, method="ivf", nlist=20, nprobe=20, sample=100,
                      workers=workers)
    ref_s, ref_i = brute_knn(x, 5, rows=rows)
    np.testing.assert_allclose(table.scores.numpy(), ref_s, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(table.ids.numpy(), ref_i)
    assert table.sample_recall == 1.0


def test_rows_whose_cells_are_too_small_probe_more_cells():
    # ~3 rows a cell and one probe: no home cell holds 10 other rows, so every row is
    # searched again with 2, 4, 8 … cells until it has 10 neighbours
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    table = knn_table(x, 10, method="ivf", nlist=100, train_per_cell=3, nprobe=1, sample=0)
    assert table.nlist == 100 and table.nprobe == 1 and "refill" in table.seconds
    assert (table.ids >= 0).all()
    _check_rows(table, x, np.arange(300))
    _, truth = brute_knn(x, 10)
    assert recall(table.ids.numpy(), truth) > 0.5  # probing 16+ of 100 cells in 8-D
    # half the cells hold ~20 rows, fewer than 30 others: doubling reaches every cell,
    # where the refill is brute force
    tiny = knn_table(x[:40], 30, method="ivf", nlist=20, train_per_cell=2, nprobe=10,
                     sample=0)
    ref_s, ref_i = brute_knn(x[:40], 30)
    np.testing.assert_allclose(tiny.scores.numpy(), ref_s, atol=1e-5, rtol=0)
    assert np.mean(tiny.ids.numpy() == ref_i) > 0.99


def test_bad_inputs_are_refused():
    x = np.random.default_rng(5).normal(size=(20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="k must be in"):
        knn_table(x, 20)
    with pytest.raises(ValueError, match="rows must lie"):
        knn_table(x, 3, rows=[0, 20])
    with pytest.raises(ValueError, match="method"):
        knn_table(x, 3, method="hnsw")
    with pytest.raises(ValueError, match="sample=0"):
        knn_table(x, 3, method="ivf", sample=0)
    with pytest.raises(ValueError, match="workers"):
        knn_table(x, 3, workers=0)
    for method in ("exact", "ivf"):  # no rows asked: an empty table
        assert knn_table(x, 3, rows=np.empty(0, np.int64), method=method).ids.shape == (0, 3)
    bad = x.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match="zeros"):
        knn_table(bad, 3)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        knn_table(bad, 3)
