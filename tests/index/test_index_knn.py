"""knn_table against float64 numpy brute force: exact tables, the IVF join with nprobe tuned
on measured recall, the join probing every cell (= exact), and the exact fallback for rows
whose probed cells are too small."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from index_reference import brute_knn, clustered, recall, top_k, unit

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
    assert not table.exact and table.nlist == round(2 * np.sqrt(len(x)))
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


def test_ivf_probing_every_cell_is_exact():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 24)).astype(np.float32)
    rows = rng.choice(2000, 300, replace=False)
    table = knn_table(x, 5, rows=rows, method="ivf", nlist=20, nprobe=20, sample=100)
    ref_s, ref_i = brute_knn(x, 5, rows=rows)
    np.testing.assert_allclose(table.scores.numpy(), ref_s, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(table.ids.numpy(), ref_i)
    assert table.sample_recall == 1.0


def test_rows_whose_cells_are_too_small_fall_back_to_exact():
    # ~3 rows a cell and one probe: no home cell holds 10 other rows
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    table = knn_table(x, 10, method="ivf", nlist=100, train_per_cell=3, nprobe=1, sample=0)
    assert table.nlist == 100 and "exact" in table.seconds
    ref_s, _ = brute_knn(x, 10)
    assert (table.ids >= 0).all()
    _check_rows(table, x, np.arange(300))
    # those rows are exact: their scores are the brute-force top-10
    filled = (table.scores.numpy() >= ref_s[:, -1:] - 1e-6).all(axis=1)
    assert filled.mean() > 0.5
    np.testing.assert_allclose(np.sort(table.scores.numpy()[filled], axis=1)[:, ::-1],
                               top_k(ref_s[filled], 10)[0], atol=1e-5, rtol=0)


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
    bad = x.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match="zeros"):
        knn_table(bad, 3)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        knn_table(bad, 3)
