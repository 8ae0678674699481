"""The service is a thin layer: on real LFW photos its answers (verify, identify, enroll,
embed) equal the Python API's for the same input, sent as multipart or as base64 JSON; the
resources (collections → persons → faces) page, read and delete as the store does."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_helpers import assert_envelope, assert_same, unique

from facemetric.recognizer import Recognizer


def _without_ids(enrollment: dict[str, Any]) -> dict[str, Any]:
    """Face ids differ between two galleries; whether there is one does not."""
    out = dict(enrollment)
    out["images"] = [{**o, "face_id": o["face_id"] is not None,
                      "detail": re.sub(r"face \d+", "face N", o["detail"])}
                     for o in enrollment["images"]]
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def photos(lfw_people) -> dict[str, list[bytes]]:
    return {name: [p.read_bytes() for p in paths] for name, paths in
            list(lfw_people.items())[:5]}


def test_enroll_identify_verify_embed_equal_the_python_api(
        server, client, admin, collection, photos, service_model, tmp_path):
    local = Recognizer(service_model, tmp_path / "local.db", collection=collection)
    names = list(photos)
    faces = f"/v1/collections/{collection}/persons/{{}}/faces"
    # enroll: photos 1-2 plus photo 1 again (a duplicate within the request)
    for i, name in enumerate(names[:4]):
        images = [*photos[name][:2], photos[name][0]]
        if i % 2:
            r = client.post(faces.format(name), json={
                "images": [_b64(b) for b in images], "policy": "largest",
                "metadata": {"source": "lfw"}}, headers=admin)
        else:
            r = client.post(faces.format(name), files=[("images", b) for b in images],
                            data={"policy": "largest", "metadata": '{"source": "lfw"}'},
                            headers=admin)
        assert r.status_code == 201, r.text
        want = local.enroll(name, images, policy="largest", metadata={"source": "lfw"})
        assert_same(_without_ids(r.json()),
                    _without_ids({"collection": collection, **want.to_dict()}))
        assert r.json()["images"][2]["problem"] == "duplicate"
    # the same photo again, in a later request: refused as already enrolled, nothing stored
    again = client.post(faces.format(names[0]), files={"images": photos[names[0]][0]},
                        headers=admin)
    body = assert_envelope(again, 422, "nothing_enrolled")
    want = local.enroll(names[0], [photos[names[0]][0]]).to_dict()
    assert_same(_without_ids(body["error"]["details"]),
                _without_ids({"collection": collection, **want}))
    assert client.get(f"/v1/collections/{collection}/persons/{names[1]}",
                      headers=admin).json()["metadata"] == {"source": "lfw"}

    # identify: the server's answer equals a Recognizer's on the server's own gallery file
    python = Recognizer(service_model, server.gallery, collection=collection)
    for name in names:  # names[4] was never enrolled
        probe = photos[name][3]
        for options in ({"k": 3, "far": 0.01}, {"k": 5, "policy": "all"}, {}):
            r = client.post(f"/v1/collections/{collection}/identify",
                            json={"image": _b64(probe), **options}, headers=admin)
            assert r.status_code == 200, r.text
            want = python.identify(probe, **options).to_dict()
            assert_same(r.json(), {"collection": collection, **want})
        if name in names[:4]:
            enrolled = client.post(f"/v1/collections/{collection}/identify",
                                   files={"image": photos[name][0]}, headers=admin).json()
            assert enrolled["faces"][0]["best"] == name  # the enrolled photo itself
            assert enrolled["faces"][0]["candidates"][0]["score"] == pytest.approx(1, abs=1e-5)

    # verify: genuine and impostor pairs, both encodings, several policies and FARs
    pairs = [(photos[names[0]][2], photos[names[0]][3], {}),
             (photos[names[0]][2], photos[names[1]][2], {"far": 0.01}),
             (photos[names[2]][1], photos[names[2]][3], {"policy": "single"}),
             (photos[names[3]][0], photos[names[4]][0], {"policy": "centre", "far": 0.001})]
    for i, (a, b, options) in enumerate(pairs):
        if i % 2:
            r = client.post("/v1/verify", json={"a": _b64(a), "b": _b64(b), **options},
                            headers=admin)
        else:
            r = client.post("/v1/verify", files={"a": a, "b": b},
                            data={k: str(v) for k, v in options.items()}, headers=admin)
        assert r.status_code == 200, r.text
        assert_same(r.json(), python.verify(a, b, **options).to_dict())

    # embed: boxes, scores and unit embeddings
    images = [photos[names[0]][0], photos[names[4]][1]]
    r = client.post("/v1/embed", files=[("images", b) for b in images], headers=admin)
    assert r.status_code == 200
    got = r.json()
    assert got["model"] == python.contract.fingerprint() and got["embedding_size"] == 32
    for out, want in zip(got["images"], python.embed(images), strict=True):
        assert out["problem"] is None and len(out["faces"]) == len(want.faces)
        for face, ref in zip(out["faces"], want.faces, strict=True):
            assert face["box"] == ref.box_dict()
            np.testing.assert_allclose(face["embedding"], ref.embedding, atol=1e-5)
    python.close()
    local.close()


def test_no_face_is_an_answer_not_an_error(client, admin, collection, tmp_path):
    """A readable image without a face: 200 with the problem (verify/identify), as the
    Python API answers; 422 for an enrollment (nothing stored)."""
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (120, 120), (128, 128, 128)).save(blank)
    data = blank.read_bytes()
    r = client.post(f"/v1/collections/{collection}/identify", files={"image": data},
                    headers=admin)
    assert r.status_code == 200 and r.json()["problem"] == "no_face" and r.json()["faces"] == []
    r = client.post("/v1/verify", files={"a": data, "b": data}, headers=admin)
    assert r.status_code == 200 and r.json()["same"] is None
    assert [i["problem"] for i in r.json()["images"]] == ["no_face", "no_face"]
    body = assert_envelope(client.post(f"/v1/collections/{collection}/persons/X/faces",
                                       files={"images": data}, headers=admin),
                           422, "nothing_enrolled")
    assert body["error"]["details"]["images"][0]["problem"] == "no_face"


def test_collections_persons_faces_as_resources(client, admin, photos):
    name = unique("res")
    r = client.post("/v1/collections", json={"name": name}, headers=admin)
    assert r.status_code == 201 and r.json()["person_count"] == 0
    assert_envelope(client.post("/v1/collections", json={"name": name}, headers=admin), 409,
                    "already_exists")
    base = f"/v1/collections/{name}"
    persons = [f"p{i:02d}" for i in range(7)]
    for p in persons:
        r = client.post(f"{base}/persons", json={"name": p, "metadata": {"i": p}},
                        headers=admin)
        assert r.status_code == 201 and r.json()["face_count"] == 0
    assert_envelope(client.post(f"{base}/persons", json={"name": "p00"}, headers=admin), 409,
                    "already_exists")
    assert_envelope(client.post(f"{base}/persons", json={"name": "a/b"}, headers=admin), 422,
                    "invalid_input")
    # cursor paging: every person once, in order, bounded number of pages
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 3} if cursor is None else {"limit": 3, "cursor": cursor}
        page = client.get(f"{base}/persons", params=params, headers=admin).json()
        seen += [p["name"] for p in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == persons
    # faces of a person: enroll, list (paged), get, delete one, then the person
    first = next(iter(photos.values()))
    r = client.post(f"{base}/persons/p00/faces", files=[("images", b) for b in first[:3]],
                    data={"policy": "largest"}, headers=admin)
    assert r.status_code == 201
    ids = [o["face_id"] for o in r.json()["images"] if o["accepted"]]
    assert len(ids) >= 2
    page = client.get(f"{base}/persons/p00/faces", params={"limit": 1}, headers=admin).json()
    assert [f["id"] for f in page["items"]] == ids[:1] and page["next_cursor"]
    rest = client.get(f"{base}/persons/p00/faces", headers=admin,
                      params={"cursor": page["next_cursor"]}).json()
    assert [f["id"] for f in rest["items"]] == ids[1:] and rest["next_cursor"] is None
    face = client.get(f"{base}/persons/p00/faces/{ids[0]}", headers=admin).json()
    assert face["person"] == "p00" and len(face["source_sha256"]) == 64
    assert_envelope(client.get(f"{base}/persons/p01/faces/{ids[0]}", headers=admin), 404)
    assert client.delete(f"{base}/persons/p00/faces/{ids[0]}", headers=admin).status_code == 200
    assert_envelope(client.get(f"{base}/persons/p00/faces/{ids[0]}", headers=admin), 404)
    assert client.get(f"{base}/persons/p00", headers=admin).json()["face_count"] == len(ids) - 1
    deleted = client.delete(f"{base}/persons/p00", headers=admin).json()
    assert deleted == {"deleted": "p00", "faces_removed": len(ids) - 1}
    assert_envelope(client.get(f"{base}/persons/p00", headers=admin), 404, "not_found")
    # the identify index follows: the deleted person is never a candidate
    r = client.post(f"{base}/identify", files={"image": first[0]}, headers=admin).json()
    assert all(c["person"] != "p00" for f in r["faces"] for c in f["candidates"])
    # collections page too, and a deleted one is gone
    listed = client.get("/v1/collections", params={"limit": 1000}, headers=admin).json()
    assert name in [c["name"] for c in listed["items"]]
    assert client.delete(base, headers=admin).json()["deleted"] == name
    assert_envelope(client.get(base, headers=admin), 404, "not_found")
    assert_envelope(client.post(f"{base}/identify", files={"image": first[0]}, headers=admin),
                    404, "not_found")


def test_health_reports_the_model_and_the_gallery(client, service_model):
    from facemetric.inference import load_model

    health = client.get("/v1/health").json()
    contract = load_model(Path(service_model)).contract
    assert health["model"]["fingerprint"] == contract.fingerprint()
    assert health["calibrated_fars"] == [0.001, 0.01]
    assert health["gallery"]["backend"] == "sqlite" and health["gallery"]["collections"] >= 0
    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/verify"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    assert set(spec["paths"]["/v1/cluster"]["post"]["requestBody"]["content"]) == {
        "application/json", "multipart/form-data"}


def test_concurrent_searches_and_changes_of_one_collection(server, admin, collection, photos):
    """Searches from several threads while persons are enrolled and removed: every answer
    is a 200 naming the right person (the index is never seen half-updated)."""
    import threading

    import httpx

    names = list(photos)
    base = f"{server.url}/v1/collections/{collection}"
    with httpx.Client(timeout=60) as c:
        for name in names[:2]:
            assert c.post(f"{base}/persons/{name}/faces", headers=admin,
                          files={"images": photos[name][0]},
                          data={"policy": "largest"}).status_code == 201
    answers: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def search(name: str) -> None:
        with httpx.Client(timeout=60) as c:
            for _ in range(8):
                r = c.post(f"{base}/identify", files={"image": photos[name][0]}, headers=admin)
                best = r.json()["faces"][0]["best"] if r.status_code == 200 else None
                with lock:
                    answers.append((r.status_code, best if best == name else f"{best}≠{name}"))

    threads = [threading.Thread(target=search, args=(names[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    with httpx.Client(timeout=60) as c:
        for _ in range(4):  # churn: another person comes and goes
            r = c.post(f"{base}/persons/{names[2]}/faces", headers=admin,
                       files=[("images", b) for b in photos[names[2]][:2]],
                       data={"policy": "largest"})
            assert r.status_code == 201, r.text
            assert c.delete(f"{base}/persons/{names[2]}", headers=admin).status_code == 200
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == 32
    assert all(status == 200 and best in names[:2] for status, best in answers), answers
