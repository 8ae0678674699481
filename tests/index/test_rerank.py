"""Retrieval post-processing against float64 loop references written from the papers
(``rerank_reference``): αQE/AQE and DBA exact values, k-reciprocal re-ranking's d*, their
composition, a known-answer case, the block memory bound, the template-index database and
refused inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rerank_reference import alpha_qe, cosine_shortlist, dba, k_reciprocal, unit

from facemetric.index import (
    AlphaQueryExpansion,
    AverageQueryExpansion,
    DatabaseAugmentation,
    KReciprocalReranking,
    MatrixDatabase,
    PostProcessing,
    Shortlist,
    TemplateDatabase,
    TemplateIndex,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clustered(n_ids: int, per: int, dim: int, seed: int, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    x = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_ids * per, dim))
    return x.astype(np.float32)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = _clustered(10, 5, 12, seed)
    rng = np.random.default_rng(seed + 100)
    q = x[rng.choice(len(x), 6, replace=False)] + 0.5 * rng.normal(size=(6, 12))
    return q.astype(np.float32), x


@pytest.mark.parametrize(("k", "alpha"), [(1, 3.0), (3, 3.0), (4, 0.0), (2, 1.5)])
def test_alpha_query_expansion_matches_loop(k, alpha):
    q, x = _data()
    db = MatrixDatabase(x)
    out = PostProcessing((AlphaQueryExpansion(k, alpha),), shortlist_size=15).apply(
        q, db.shortlist(q, 15), db)
    ref_rows = cosine_shortlist(q, x, 15)
    for i in range(len(q)):
        rows, scores = alpha_qe(q[i], x, ref_rows[i], k, alpha)
        assert out.rows[i].tolist() == rows
        np.testing.assert_allclose(out.scores[i].numpy(), scores, atol=1e-5, rtol=0)
        # the cosine travels with its row
        np.testing.assert_allclose(out.cosine[i].numpy(), unit(x[rows]) @ unit(q[i]),
                                   atol=1e-5, rtol=0)


def test_average_query_expansion_is_alpha_zero():
    q, x = _data(1)
    db = MatrixDatabase(x)
    sl = db.shortlist(q, 12)
    out = PostProcessing((AverageQueryExpansion(3),)).apply(q, sl, db)
    ref_rows = cosine_shortlist(q, x, 12)
    for i in range(len(q)):
        rows, scores = alpha_qe(q[i], x, ref_rows[i], 3, 0.0)
        assert out.rows[i].tolist() == rows
        np.testing.assert_allclose(out.scores[i].numpy(), scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("k", "alpha"), [(1, 3.0), (3, 0.0), (4, 3.0)])
def test_database_augmentation_matches_loop(k, alpha):
    q, x = _data(2)
    ref = dba(x, k, alpha)
    got = DatabaseAugmentation(k, alpha).transform(x, max_block_bytes=4 * 12 * (k + 1) * 7)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, rtol=0)
    # as a post-processing: the shortlist rescored q̂ · x̃, cosine kept
    db = MatrixDatabase(x)
    out = PostProcessing(augmentation=DatabaseAugmentation(k, alpha), shortlist_size=20).apply(
        q, db.shortlist(q, 20), db)
    for i, rows in enumerate(cosine_shortlist(q, x, 20)):
        # (α = 0 gives rows with one shared neighbourhood the very same x̃: compare per row)
        s = {r: float(ref[r] @ unit(q[i])) for r in rows}
        got = out.rows[i].tolist()
        assert sorted(got) == sorted(rows) and (np.diff(out.scores[i].numpy()) <= 0).all()
        np.testing.assert_allclose(out.scores[i].numpy(), [s[r] for r in got], atol=1e-5)
        np.testing.assert_allclose(out.cosine[i].numpy(), unit(x[got]) @ unit(q[i]),
                                   atol=1e-5)


def test_dba_then_alpha_qe_expands_with_augmented_vectors():
    q, x = _data(3)
    aug = dba(x, 3, 3.0)
    db = MatrixDatabase(x)
    pp = PostProcessing((AlphaQueryExpansion(2, 3.0),), augmentation=DatabaseAugmentation(3, 3.0))
    out = pp.apply(q, db.shortlist(q, 15), db)
    for i, rows in enumerate(cosine_shortlist(q, x, 15)):
        first = sorted(rows, key=lambda r: -float(aug[r] @ unit(q[i])))
        order, scores = alpha_qe(q[i], aug, first, 2, 3.0)
        assert out.rows[i].tolist() == order
        np.testing.assert_allclose(out.scores[i].numpy(), scores, atol=1e-5)


@pytest.mark.parametrize(("k1", "k2", "lam", "size"),
                         [(20, 6, 0.3, 30), (4, 1, 0.3, 12), (6, 3, 0.0, 25), (3, 2, 1.0, 10),
                          (50, 6, 0.3, 8)])
def test_k_reciprocal_matches_dense_loop(k1, k2, lam, size):
    q, x = _data(4)
    db = MatrixDatabase(x)
    out = PostProcessing((KReciprocalReranking(k1, k2, lam),)).apply(q, db.shortlist(q, size), db)
    for i, rows in enumerate(cosine_shortlist(q, x, size)):
        ref = k_reciprocal(q[i], x, rows, k1, k2, lam)
        got = dict(zip(out.rows[i].tolist(), (-out.scores[i]).tolist(), strict=True))
        assert set(got) == set(rows)
        np.testing.assert_allclose([got[r] for r in rows], [ref[r] for r in rows], atol=1e-5)
        assert (np.diff(out.scores[i].numpy()) <= 0).all()


def test_k_reciprocal_with_padded_shortlist_ignores_the_pads():
    q, x = _data(5)
    db = MatrixDatabase(x)
    sl = db.shortlist(q, 10)
    pad = torch.full((len(q), 3), -1)
    inf = torch.full((len(q), 3), -np.inf)
    padded = Shortlist(torch.cat([sl.rows, pad], 1), torch.cat([sl.scores, inf], 1),
                       torch.cat([sl.cosine, inf], 1))
    out = PostProcessing((KReciprocalReranking(4, 2, 0.3),)).apply(q, padded, db)
    plain = PostProcessing((KReciprocalReranking(4, 2, 0.3),)).apply(q, sl, db)
    assert (out.rows[:, 10:] == -1).all() and torch.isinf(out.scores[:, 10:]).all()
    assert torch.equal(out.rows[:, :10], plain.rows)
    torch.testing.assert_close(out.scores[:, :10], plain.scores)


def _circle(deg: float, dim: int = 6) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[0], v[1] = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return v


def test_k_reciprocal_fixes_a_true_match_ranked_second():
    """Identity A sits at 0–3°, the query (of A) at 20°; a stranger x at 34° is the query's
    nearest by cosine, but x's own neighbourhood is its four look-alikes at 38–41°, which
    does not hold the query: x is not a k-reciprocal neighbour and drops below A."""
    a = [_circle(d) for d in (0, 1, 2, 3)]
    stranger = _circle(34)
    lookalikes = [_circle(d) for d in (38, 39, 40, 41)]
    x = np.stack([*a, stranger, *lookalikes])
    q = _circle(20)[None]
    db = MatrixDatabase(x)
    sl = db.shortlist(q, len(x))
    assert int(sl.rows[0, 0]) == 4 and int(sl.rows[0, 1]) == 3  # cosine: stranger first
    out = PostProcessing((KReciprocalReranking(4, 1, 0.3),)).apply(q, sl, db)
    assert int(out.rows[0, 0]) in (0, 1, 2, 3)
    assert out.rows[0].tolist().index(4) > 3  # the stranger falls behind all of A
    # the reported cosine of the new top row is still its cosine, not the re-ranking score
    top = int(out.rows[0, 0])
    assert float(out.cosine[0, 0]) == pytest.approx(float(unit(x[top]) @ unit(q[0])), abs=1e-6)


class _Spy:
    """A refiner that records the query blocks it is given (and changes nothing)."""

    def __init__(self, per_query: int) -> None:
        self.per_query, self.blocks = per_query, []

    def refine(self, queries, shortlist, database):
        self.blocks.append(queries.shape[0])
        return shortlist

    def bytes_per_query(self, k: int, dim: int) -> int:
        return self.per_query


def test_blocks_honour_the_memory_bound_and_do_not_change_results():
    q, x = _data(6)
    q = np.concatenate([q] * 5)  # 30 queries
    db = MatrixDatabase(x)
    sl = db.shortlist(q, 20)
    steps = (KReciprocalReranking(6, 3, 0.3), AlphaQueryExpansion(2, 3.0))
    whole = PostProcessing(steps).apply(q, sl, db)
    spy = _Spy(1000)
    small = PostProcessing((spy, *steps), augmentation=None, max_block_bytes=60_000)
    per_query = 4 * 20 * (3 + 12) + 1000 + sum(s.bytes_per_query(20, 12) for s in steps)
    bound = small.block_queries(20, 12)
    assert bound == 60_000 // per_query and 1 <= bound < 30
    out = small.apply(q, sl, db)
    assert max(spy.blocks) == bound and sum(spy.blocks) == 30
    assert all(b * per_query <= 60_000 for b in spy.blocks)
    assert torch.equal(out.rows, whole.rows)
    torch.testing.assert_close(out.scores, whole.scores)
    # a bound below one query's needs still makes progress, one query at a time
    spy.blocks.clear()
    PostProcessing((spy,), max_block_bytes=1).apply(q, sl, db)
    assert spy.blocks == [1] * 30


def test_template_index_database_gives_the_matrix_answer():
    q, x = _data(7)
    ids = np.arange(len(x)) * 10 + 7  # template ids are not row numbers
    index = TemplateIndex(x.shape[1])
    index.add(ids, np.arange(len(x)) // 5, x)
    tdb, mdb = TemplateDatabase(index), MatrixDatabase(x)
    pp = PostProcessing((KReciprocalReranking(5, 2, 0.3), AlphaQueryExpansion(2, 3.0)),
                        augmentation=DatabaseAugmentation(2, 3.0))
    via_index = pp.apply(q, tdb.shortlist(q, 15), tdb)
    via_matrix = pp.apply(q, mdb.shortlist(q, 15), mdb)
    assert torch.equal(via_index.rows, torch.from_numpy(ids)[via_matrix.rows])
    torch.testing.assert_close(via_index.scores, via_matrix.scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not in the index"):
        index.vectors([7, 8])


def test_identity_post_processing_and_empty_shortlists_change_nothing():
    q, x = _data(8)
    db = MatrixDatabase(x)
    sl = db.shortlist(q, 5)
    assert PostProcessing().apply(q, sl, db) is sl
    empty = Shortlist(torch.empty(len(q), 0, dtype=torch.int64), torch.empty(len(q), 0),
                      torch.empty(len(q), 0))
    assert PostProcessing((KReciprocalReranking(),)).apply(q, empty, db) is empty


def test_bad_inputs_are_refused():
    q, x = _data(9)
    db = MatrixDatabase(x)
    sl = db.shortlist(q, 5)
    pp = PostProcessing((AlphaQueryExpansion(),))
    bad = q.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pp.apply(bad, sl, db)
    with pytest.raises(ValueError, match="NaN"):
        MatrixDatabase(np.where(np.arange(12) == 0, np.inf, x))
    with pytest.raises(ValueError, match="all zeros"):
        MatrixDatabase(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="empty"):
        MatrixDatabase(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="got 5 queries for 6"):
        pp.apply(q[:5], sl, db)
    with pytest.raises(ValueError, match="share one"):
        pp.apply(q, Shortlist(sl.rows, sl.scores[:, :2], sl.cosine), db)
    for make in (lambda: AlphaQueryExpansion(0), lambda: AlphaQueryExpansion(2, -1.0),
                 lambda: AlphaQueryExpansion(2, float("nan")), lambda: AverageQueryExpansion(0),
                 lambda: DatabaseAugmentation(0), lambda: KReciprocalReranking(0),
                 lambda: KReciprocalReranking(20, 0), lambda: KReciprocalReranking(lam=1.5),
                 lambda: PostProcessing(shortlist_size=0), lambda: AlphaQueryExpansion(2.5),
                 lambda: PostProcessing(max_block_bytes=0)):
        with pytest.raises(ValueError, match="must"):
            make()
    with pytest.raises(ValueError, match="not a refiner"):
        PostProcessing((object(),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        db.shortlist(q, 0)
