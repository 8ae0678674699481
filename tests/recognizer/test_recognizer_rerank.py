"""``Recognizer`` with retrieval post-processing on real LFW photos: persons come in the
order of their first template after re-ranking (checked against the float64 loop
re-ranking of the same embeddings), each with their best template cosine, and the
calibrated threshold applies to that cosine."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from test_recognizer import _encoder, _table

from facemetric.index import AlphaQueryExpansion, KReciprocalReranking, PostProcessing
from facemetric.recognizer import UNKNOWN, Recognizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "index"))
from rerank_reference import alpha_qe, k_reciprocal

pytestmark = [pytest.mark.data]


@pytest.fixture(scope="module")
def people(lfw_root: Path) -> dict[str, list[Path]]:
    """The first six DevTest identities with at least three photos (first three each)."""
    root = lfw_root / "lfw-deepfunneled"
    found: dict[str, list[Path]] = {}
    for line in (lfw_root / "peopleDevTest.txt").read_text().split("\n")[1:]:
        if line.strip() and int(line.split()[1]) >= 3 and len(found) < 6:
            found[line.split()[0]] = sorted((root / line.split()[0]).glob("*.jpg"))[:3]
    return found


def _enrolled(rec: Recognizer, people: dict[str, list[Path]], names: list[str]
              ) -> tuple[np.ndarray, list[str]]:
    """Templates (embedded again through the pipeline) and their owners' names."""
    emb, owner = [], []
    for name in names:
        for f in rec.embed(people[name][:2], "centre"):
            emb.append(f.faces[0].embedding.astype(np.float64))
            owner.append(name)
    return np.stack(emb), owner


def test_identify_ranks_persons_by_re_ranked_templates_and_keeps_cosines(people, tmp_path):
    enc = _encoder()
    names = list(people)
    plain = Recognizer(enc, tmp_path / "g.db", thresholds=_table(enc, {1e-3: 0.5}))
    for name in names:
        assert plain.enroll(name, people[name][:2], policy="centre").accepted == 2
    templates, owner = _enrolled(plain, people, names)
    probes = [people[n][2] for n in names[:4]]
    queries = np.stack([f.faces[0].embedding for f in plain.embed(probes, "centre")])
    cos = queries.astype(np.float64) @ templates.T
    steps = {
        "k-reciprocal": (KReciprocalReranking(4, 2, 0.3),
                         lambda i, rows: sorted(rows, key=k_reciprocal(
                             queries[i], templates, rows, 4, 2, 0.3).__getitem__)),
        "aqe": (AlphaQueryExpansion(2, 3.0),
                lambda i, rows: alpha_qe(queries[i], templates, rows, 2, 3.0)[0]),
    }
    for refiner, loop in steps.values():
        rec = Recognizer(enc, tmp_path / "g.db", thresholds=_table(enc, {1e-3: 0.5}),
                         postprocess=PostProcessing((refiner,), shortlist_size=20))
        answers = rec.identify_many(probes, k=10, policy="centre")
        for i, ans in enumerate(answers):
            by_cos = sorted(range(len(templates)), key=lambda j, i=i: -cos[i, j])
            persons = list(dict.fromkeys(owner[j] for j in loop(i, by_cos)))
            cands = ans.faces[0].candidates
            assert [c.person for c in cands] == persons
            best_cos = {n: max(cos[i, j] for j in range(len(owner)) if owner[j] == n)
                        for n in names}
            np.testing.assert_allclose([c.score for c in cands],
                                       [best_cos[p] for p in persons], atol=1e-5)
            assert ans.faces[0].best == (persons[0] if best_cos[persons[0]] >= 0.5 else UNKNOWN)
        rec.close()
    # the threshold is a cosine: set it just above the re-ranked top person's cosine and
    # that person is no longer accepted, whatever their re-ranking score
    rec = Recognizer(enc, tmp_path / "g.db", postprocess=PostProcessing(
        (KReciprocalReranking(4, 2, 0.3),)), thresholds=_table(enc, {1e-3: 0.0}))
    top = rec.identify(probes[0], k=3, policy="centre").faces[0].candidates[0]
    strict = Recognizer(enc, tmp_path / "g.db", postprocess=PostProcessing(
        (KReciprocalReranking(4, 2, 0.3),)), thresholds=_table(enc, {1e-3: top.score + 1e-4}))
    assert strict.identify(probes[0], k=3, policy="centre").faces[0].best == UNKNOWN
    rec.close()
    strict.close()
    plain.close()


def test_post_processing_needs_max_person_scores(tmp_path):
    with pytest.raises(ValueError, match="person_score='max'"):
        Recognizer(_encoder(), tmp_path / "g.db", person_score="mean",
                   postprocess=PostProcessing((AlphaQueryExpansion(),)))
