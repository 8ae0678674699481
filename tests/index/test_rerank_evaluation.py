"""The evaluator with retrieval post-processing: mAP against scikit-learn, and P@1, MAP@R,
mAP, CMC ranks and open-set scores after re-ranking against a per-query loop (cosine
shortlist → loop re-ranking from ``rerank_reference`` → the rest by cosine → metrics by
explicit sums)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rerank_reference import alpha_qe, dba, k_reciprocal, unit
from sklearn.metrics import average_precision_score

from facemetric.evaluation import (
    cmc_curve,
    mean_average_precision,
    open_set_identification,
    retrieval_metrics,
)
from facemetric.index import (
    AlphaQueryExpansion,
    DatabaseAugmentation,
    KReciprocalReranking,
    PostProcessing,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sets(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(15, 10))
    ref_labels = rng.integers(0, 12, size=70)
    refs = centres[ref_labels] + rng.normal(scale=0.9, size=(70, 10))
    q_labels = rng.integers(0, 15, size=25)  # labels 12..14 have no reference
    queries = centres[q_labels] + rng.normal(scale=0.9, size=(25, 10))
    return queries, q_labels, refs, ref_labels


def _metrics(ranked: list[list[int]], q_labels, ref_labels) -> tuple[float, float, float]:
    """P@1, MAP@R and mAP of full rankings, by loops (queries with R = 0 skipped)."""
    p1, mapr, aps = [], [], []
    for i, order in enumerate(ranked):
        rel = [int(ref_labels[j] == q_labels[i]) for j in order]
        r = sum(rel)
        if r == 0:
            continue
        p1.append(rel[0])
        mapr.append(sum(sum(rel[: p + 1]) / (p + 1) for p in range(r) if rel[p]) / r)
        aps.append(sum(sum(rel[: p + 1]) / (p + 1) for p in range(len(rel)) if rel[p]) / r)
    return float(np.mean(p1)), float(np.mean(mapr)), float(np.mean(aps))


def _rankings(queries, refs, size: int, rerank, exclude_self: bool = False) -> list[list[int]]:
    qn, rn = unit(queries), unit(refs)
    out = []
    for i in range(len(qn)):
        cand = [j for j in range(len(rn)) if not (exclude_self and j == i)]
        by_cos = sorted(cand, key=lambda j: -float(qn[i] @ rn[j]))
        out.append(rerank(i, by_cos[:size]) + by_cos[size:])
    return out


@pytest.mark.parametrize("block", [256 * 2**20, 900])
def test_map_matches_scikit_learn(block):
    queries, q_labels, refs, ref_labels = _sets(0)
    sims = unit(queries) @ unit(refs).T
    aps = [average_precision_score(ref_labels == q_labels[i], sims[i])
           for i in range(len(queries)) if (ref_labels == q_labels[i]).any()]
    got = mean_average_precision(queries, q_labels, refs, ref_labels, max_block_bytes=block)
    assert got == pytest.approx(np.mean(aps), abs=1e-12)
    # one set searched against itself: the query is not its own reference
    sims = unit(refs) @ unit(refs).T
    aps = []
    for i in range(len(refs)):
        others = np.arange(len(refs)) != i
        relevant = ref_labels[others] == ref_labels[i]
        if relevant.any():
            aps.append(average_precision_score(relevant, sims[i][others]))
    shared = mean_average_precision(refs, ref_labels, max_block_bytes=block)
    assert shared == pytest.approx(np.mean(aps), abs=1e-12)


def test_k_reciprocal_in_the_evaluator_matches_the_loop():
    queries, q_labels, refs, ref_labels = _sets(1)
    pp = PostProcessing((KReciprocalReranking(6, 3, 0.3),), shortlist_size=20)

    def rerank(i, rows):
        d = k_reciprocal(queries[i], refs, rows, 6, 3, 0.3)
        return sorted(rows, key=lambda r: d[r])

    p1, mapr, m_ap = _metrics(_rankings(queries, refs, 20, rerank), q_labels, ref_labels)
    rep = retrieval_metrics(queries, q_labels, refs, ref_labels, postprocess=pp,
                            max_block_bytes=3000)
    assert rep.precision_at_1 == pytest.approx(p1, abs=1e-12)
    assert rep.map_at_r == pytest.approx(mapr, abs=1e-12)
    got = mean_average_precision(queries, q_labels, refs, ref_labels, postprocess=pp)
    assert got == pytest.approx(m_ap, abs=1e-12)
    # and it changed something (else this test could not fail)
    plain = mean_average_precision(queries, q_labels, refs, ref_labels)
    assert got != pytest.approx(plain, abs=1e-6)


def test_dba_and_alpha_qe_in_the_evaluator_match_the_loop():
    queries, q_labels, refs, ref_labels = _sets(2)
    aug = dba(refs, 3, 3.0)
    pp = PostProcessing((AlphaQueryExpansion(2, 3.0),),
                        augmentation=DatabaseAugmentation(3, 3.0), shortlist_size=15)

    def rerank(i, rows):
        first = sorted(rows, key=lambda r: -float(aug[r] @ unit(queries[i])))
        return alpha_qe(queries[i], aug, first, 2, 3.0)[0]

    p1, mapr, m_ap = _metrics(_rankings(queries, refs, 15, rerank), q_labels, ref_labels)
    rep = retrieval_metrics(queries, q_labels, refs, ref_labels, postprocess=pp)
    assert (rep.precision_at_1, rep.map_at_r) == pytest.approx((p1, mapr), abs=1e-12)
    got = mean_average_precision(queries, q_labels, refs, ref_labels, postprocess=pp)
    assert got == pytest.approx(m_ap, abs=1e-12)


def test_shared_set_re_ranking_never_returns_the_query():
    _, _, refs, ref_labels = _sets(3)
    pp = PostProcessing((KReciprocalReranking(5, 2, 0.3),), shortlist_size=12)

    def rerank(i, rows):
        d = k_reciprocal(refs[i], refs, rows, 5, 2, 0.3)
        return sorted(rows, key=lambda r: d[r])

    ranked = _rankings(refs, refs, 12, rerank, exclude_self=True)
    p1, mapr, m_ap = _metrics(ranked, ref_labels, ref_labels)
    rep = retrieval_metrics(refs, ref_labels, postprocess=pp)
    assert (rep.precision_at_1, rep.map_at_r) == pytest.approx((p1, mapr), abs=1e-12)
    assert mean_average_precision(refs, ref_labels, postprocess=pp) == pytest.approx(
        m_ap, abs=1e-12)


def test_evaluator_refuses_what_would_leak_or_mislead():
    queries, q_labels, refs, ref_labels = _sets(4)
    with pytest.raises(ValueError, match="separate references"):
        retrieval_metrics(refs, ref_labels,
                          postprocess=PostProcessing(augmentation=DatabaseAugmentation()))
    with pytest.raises(ValueError, match="normalize=True"):
        mean_average_precision(queries, q_labels, refs, ref_labels, normalize=False,
                               postprocess=PostProcessing((AlphaQueryExpansion(),)))
    with pytest.raises(ValueError, match="no query"):
        mean_average_precision(np.eye(3), [0, 1, 2])


def test_cmc_and_open_set_after_re_ranking_match_the_loop():
    queries, q_labels, refs, ref_labels = _sets(5)
    pp = PostProcessing((KReciprocalReranking(6, 3, 0.3),), shortlist_size=15)
    qn, rn = unit(queries), unit(refs)
    identities = sorted(set(ref_labels.tolist()))
    ranks, tops, hits = [], [], []
    for i in range(len(qn)):
        by_cos = sorted(range(len(rn)), key=lambda j: -float(qn[i] @ rn[j]))
        d = k_reciprocal(queries[i], refs, by_cos[:15], 6, 3, 0.3)
        listed = list(dict.fromkeys(int(ref_labels[j]) for j in sorted(by_cos[:15],
                                                                       key=d.__getitem__)))
        best = {c: max(float(qn[i] @ rn[j]) for j in range(len(rn)) if ref_labels[j] == c)
                for c in identities}
        rest = sorted((c for c in identities if c not in listed), key=lambda c: -best[c])
        order = listed + rest
        tops.append(best[order[0]])
        if q_labels[i] in best:
            ranks.append(order.index(int(q_labels[i])) + 1)
            if ranks[-1] == 1:
                hits.append(best[order[0]])
    mated = np.isin(q_labels, ref_labels)
    cmc = cmc_curve(refs, ref_labels, queries[mated], q_labels[mated], postprocess=pp)
    assert cmc.probe_ranks.tolist() == ranks
    plain = cmc_curve(refs, ref_labels, queries[mated], q_labels[mated])
    assert plain.probe_ranks.tolist() != ranks  # the re-ranking moved someone
    res = open_set_identification(refs, ref_labels, queries, q_labels, postprocess=pp,
                                  fpir_targets=(0.5,))
    assert res.rank1_rate == pytest.approx(np.mean(np.array(ranks) == 1))
    expected = np.unique(np.r_[np.array(tops)[~mated], hits])[::-1]
    np.testing.assert_allclose(res.curve_thresholds, expected, atol=1e-6)
