"""``POST /v1/cluster`` on real LFW photos: the answer equals
:func:`facemetric.clustering.cluster_images` (the Python API behind ``facemetric cluster``)
for the same images and options, sent as multipart or as base64 JSON; two faces of one
photo never share a cluster even when they are the same face (cannot-link); images without
a face are listed, not fatal; bad options and unusable requests get their own errors."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from service_helpers import assert_envelope, assert_same

from facemetric.clustering import ClusterOptions, cluster_images
from facemetric.recognizer import Recognizer

pytestmark = [pytest.mark.data]


def _side_by_side(a: bytes, b: bytes) -> bytes:
    """One JPEG holding photo ``a`` left of photo ``b``."""
    from PIL import Image

    left, right = (Image.open(io.BytesIO(x)).convert("RGB") for x in (a, b))
    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _blank() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (120, 120), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def batch(lfw_people) -> list[bytes]:
    """Two photos each of four persons, the first person's first photo twice in one
    picture (two identical faces), and a picture without a face: 10 images, the server's
    per-request limit."""
    people = [[p.read_bytes() for p in paths[:2]] for paths in list(lfw_people.values())[:4]]
    twice = _side_by_side(people[0][0], people[0][0])
    return [*(photo for person in people for photo in person), twice, _blank()]


@pytest.fixture(scope="module")
def local(service_model) -> Recognizer:
    return Recognizer(service_model)


@pytest.mark.parametrize("options", [
    {}, {"method": "hdbscan", "min_size": 2}, {"far": 0.01, "linkage": "complete",
                                               "min_size": 1, "neighbours": 5}])
def test_cluster_equals_the_python_api(client, admin, batch, local, options):
    want = cluster_images(local, batch, ClusterOptions(**options)).to_dict()
    r = client.post("/v1/cluster", headers=admin, files=[("images", b) for b in batch],
                    data={k: str(v) for k, v in options.items()})
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)
    r = client.post("/v1/cluster", headers=admin, json={
        "images": [base64.b64encode(b).decode() for b in batch], **options})
    assert r.status_code == 200, r.text
    assert_same(r.json(), want)


def test_faces_of_one_photo_never_share_a_cluster(client, admin, batch, local):
    body = client.post("/v1/cluster", headers=admin, data={"min_size": "1"},
                       files=[("images", b) for b in batch]).json()
    twice = len(batch) - 2
    faces = [f for f in body["faces"] if f["image"] == twice]
    assert len(faces) >= 2
    # the same pixels: without the constraint they would be one person (cosine ~1) ...
    found = local.embed([batch[twice]], policy="all")[0].faces
    a, b = (f.embedding for f in sorted(found, key=lambda f: f.box[0])[:2])
    assert float(np.dot(a, b)) > 0.99
    # ... but cannot-link keeps every face of that image in a cluster of its own
    clusters = [f["cluster"] for f in faces if f["cluster"] >= 0]
    assert len(clusters) == len(set(clusters)) == len(faces)
    assert body["refused_merges"] >= 1
    # the faceless picture is reported, and the rest is still clustered
    assert body["problems"] == [{"image": len(batch) - 1, "problem": "no_face",
                                 "detail": body["problems"][0]["detail"]}]
    assert body["threshold"]["far"] == 1e-3 and body["clusters"]


def test_cluster_errors(client, admin, batch, server):
    files = [("images", b) for b in batch[:2]]
    body = assert_envelope(client.post("/v1/cluster", headers=admin, files=files,
                                       data={"far": "1e-6"}), 422, "far_not_calibrated")
    assert body["error"]["details"]["calibrated_fars"]
    assert_envelope(client.post("/v1/cluster", headers=admin, files=files,
                                data={"method": "kmeans"}), 422, "invalid_request")
    assert_envelope(client.post("/v1/cluster", headers=admin, json={
        "images": [base64.b64encode(batch[0]).decode()], "min_size": 0}),
        422, "invalid_request")
    assert_envelope(client.post("/v1/cluster", headers=admin, files=[
        ("images", b"not an image"), ("images", b"\x89PNG\r\n")]), 422, "unreadable_image")
    assert_envelope(client.post("/v1/cluster", files=files), 401, "missing_key")
    too_many = [("images", batch[0])] * 11
    assert_envelope(client.post("/v1/cluster", headers=admin, files=too_many), 413,
                    "too_many_images")
    assert httpx.get(f"{server.url}/v1/health", timeout=30).status_code == 200
