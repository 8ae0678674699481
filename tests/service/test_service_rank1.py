"""ORL identities enrolled through REST: the service's rank-1 identification equals the
offline evaluation's (``cmc_curve``) on the same split and the same embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from facemetric.evaluation.identification import cmc_curve
from facemetric.recognizer import Recognizer

pytestmark = [pytest.mark.data]

IDENTITIES = 15
GALLERY = (1, 2, 3)
PROBES = (4, 5, 6)


def test_rest_rank1_equals_offline_cmc(orl_root, client, admin, collection, service_model):
    people = {f"s{i}": orl_root / f"s{i}" for i in range(1, IDENTITIES + 1)}
    python = Recognizer(service_model)
    gallery_emb, gallery_lab, probe_emb, probe_lab, rest_hits = [], [], [], [], []
    for name, folder in people.items():
        shots = [(folder / f"{k}.pgm").read_bytes() for k in GALLERY]
        r = client.post(f"/v1/collections/{collection}/persons/{name}/faces",
                        files=[("images", s) for s in shots], headers=admin)
        assert r.status_code in (201, 422), r.text
        outcomes = (r.json() if r.status_code == 201 else r.json()["error"]["details"])["images"]
        local = python.embed(shots, policy="single")
        for outcome, found in zip(outcomes, local, strict=True):
            # the server accepts exactly the images the Python API finds one face in
            # (no duplicates among distinct ORL photos at this model's resolution)
            assert outcome["accepted"] == found.ok, (name, outcome, found.describe())
            if found.ok:
                gallery_emb.append(found.faces[0].embedding)
                gallery_lab.append(name)
    enrolled = set(gallery_lab)
    assert len(enrolled) >= IDENTITIES - 2
    for name, folder in people.items():
        if name not in enrolled:
            continue
        for k in PROBES:
            shot = (folder / f"{k}.pgm").read_bytes()
            r = client.post(f"/v1/collections/{collection}/identify", files={"image": shot},
                            data={"k": "1"}, headers=admin)
            assert r.status_code == 200, r.text
            found = python.embed([shot])[0]
            assert (r.json()["problem"] is None) == found.ok
            if not found.ok:
                continue
            probe_emb.append(found.faces[0].embedding)
            probe_lab.append(name)
            rest_hits.append(r.json()["faces"][0]["candidates"][0]["person"] == name)
    assert len(probe_lab) >= 2 * len(enrolled)
    offline = cmc_curve(np.stack(gallery_emb), np.array(gallery_lab), np.stack(probe_emb),
                        np.array(probe_lab))
    np.testing.assert_array_equal(np.asarray(rest_hits), offline.probe_ranks == 1)
    assert float(np.mean(rest_hits)) == pytest.approx(float(offline.curve[0]), abs=1e-12)
    # a real model's numbers are not the point here, but the projection is no coin toss
    assert offline.curve[0] > 3 / len(enrolled)
