"""Retrieval metrics against a hand-worked case and a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facemetric.evaluation import retrieval_metrics


def brute_retrieval(queries, query_labels, references, reference_labels, ks, shared):
    """Full sort per query, metrics by explicit loops."""
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rn = references / np.linalg.norm(references, axis=1, keepdims=True)
    p1, rp, mapr, used = [], [], [], 0
    recall = {k: [] for k in ks}
    for i, (q, lab) in enumerate(zip(qn, query_labels, strict=True)):
        cand = [j for j in range(len(rn)) if not (shared and j == i)]
        sims = [float(rn[j] @ q) for j in cand]
        ranked = [cand[j] for j in np.argsort(sims)[::-1]]
        rel = [int(reference_labels[j] == lab) for j in ranked]
        r = sum(rel)
        if r == 0:
            continue
        used += 1
        p1.append(rel[0])
        rp.append(sum(rel[:r]) / r)
        ap = 0.0
        for pos in range(r):
            if rel[pos]:
                ap += sum(rel[: pos + 1]) / (pos + 1)
        mapr.append(ap / r)
        for k in ks:
            recall[k].append(float(any(rel[:k])))
    return np.mean(p1), np.mean(rp), np.mean(mapr), {k: np.mean(v) for k, v in recall.items()}, used


def test_by_hand():
    # unit vectors at these angles; neighbours by angular distance
    angles = np.deg2rad([0, 12, 20, 30, 90])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array(["A", "A", "B", "A", "B"])
    # q0 : A(12) B(20) A(30) B(90)  R=2  rel 1 0 1 0  P@1 1  RP 1/2  AP@R (1)/2     = 1/2
    # q12: B(20) A(0)  A(30) B(90)  R=2  rel 0 1 1 0  P@1 0  RP 1/2  AP@R (1/2)/2   = 1/4
    # q20: A(12) A(30) A(0)  B(90)  R=1  rel 0 0 0 1  P@1 0  RP 0    AP@R 0
    # q30: B(20) A(12) A(0)  B(90)  R=2  rel 0 1 1 0  P@1 0  RP 1/2  AP@R 1/4
    # q90: A(30) B(20) A(12) A(0)   R=1  rel 0 1 0 0  P@1 0  RP 0    AP@R 0
    rep = retrieval_metrics(emb, labels, recall_ks=(1, 2, 4))
    assert rep.precision_at_1 == pytest.approx(1 / 5)
    assert rep.r_precision == pytest.approx(1.5 / 5)
    assert rep.map_at_r == pytest.approx(1.0 / 5)
    assert rep.recall_at_k == pytest.approx({1: 1 / 5, 2: 4 / 5, 4: 1.0})
    assert (rep.num_queries, rep.num_skipped) == (5, 0)


@pytest.mark.parametrize("block_bytes", [256 * 2**20, 3000])
def test_shared_set_matches_brute_force(block_bytes):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 25, size=180)
    labels[0] = 1000  # a label seen once: skipped
    centres = rng.normal(size=(1001, 8))
    emb = centres[labels] + rng.normal(scale=1.2, size=(180, 8))
    ks = (1, 3, 10)
    rep = retrieval_metrics(
        torch.from_numpy(emb).double(), labels, recall_ks=ks, max_block_bytes=block_bytes
    )
    p1, rp, mapr, recall, used = brute_retrieval(emb, labels, emb, labels, ks, shared=True)
    assert rep.num_queries == used == 179 and rep.num_skipped == 1
    assert rep.precision_at_1 == pytest.approx(p1, abs=1e-12)
    assert rep.r_precision == pytest.approx(rp, abs=1e-12)
    assert rep.map_at_r == pytest.approx(mapr, abs=1e-12)
    assert rep.recall_at_k == pytest.approx(recall, abs=1e-12)
    assert 0 < rep.map_at_r < rep.r_precision < rep.precision_at_1 < 1


def test_separate_references_match_brute_force():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(12, 6))
    ref_labels = rng.integers(0, 10, size=90)
    refs = centres[ref_labels] + rng.normal(scale=1.0, size=(90, 6))
    q_labels = rng.integers(0, 12, size=40)  # labels 10, 11 have no reference
    queries = centres[q_labels] + rng.normal(scale=1.0, size=(40, 6))
    ks = (1, 5)
    rep = retrieval_metrics(queries, q_labels, refs, ref_labels, recall_ks=ks, max_block_bytes=2000)
    p1, rp, mapr, recall, used = brute_retrieval(queries, q_labels, refs, ref_labels, ks, False)
    assert rep.num_queries == used and rep.num_skipped == int((q_labels >= 10).sum())
    assert rep.precision_at_1 == pytest.approx(p1, abs=1e-12)
    assert rep.r_precision == pytest.approx(rp, abs=1e-12)
    assert rep.map_at_r == pytest.approx(mapr, abs=1e-12)
    assert rep.recall_at_k == pytest.approx(recall, abs=1e-12)


def test_query_never_retrieves_itself():
    # Two far-apart pairs: without excluding the query, it would be its own nearest
    # neighbour; with it excluded every metric is perfect.
    emb = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    rep = retrieval_metrics(emb, [0, 0, 1, 1], recall_ks=(1,))
    assert rep.precision_at_1 == rep.map_at_r == rep.r_precision == 1.0
    # A different-label duplicate of the query is not the query: it is retrieved (and wrong).
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    rep = retrieval_metrics(emb, [0, 1, 2, 0], recall_ks=(1,))
    assert (rep.num_queries, rep.num_skipped) == (2, 2)
    assert rep.precision_at_1 == rep.map_at_r == 0.0


def test_errors():
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(np.eye(3), [0, 1, 2], references=np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [1.0, 0.0]]), [0, 0])
